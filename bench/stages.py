"""The stages of `arus bench`. Each takes the run's Context and returns (figures, details); an
exception fails that stage only. Every stage has its own topic prefix and consumer groups, and the
processes it starts are stopped when it ends, whatever happened."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from bench import data
from bench.query import query
from bench.stack import KafkaWatch, Proc, Procs, Stack, drop_mqtt_session, metric, scrape
from bench.stats import Sample, latency_summary, steady_window
from infra import embedded

Figures = dict[str, Any]
Details = dict[str, Any]


class StageError(RuntimeError):
    pass


@dataclass
class Sizes:
    devices: int = 2000
    partitions: int = 4
    transport_n: int = 300_000
    gateway_n: int = 100_000
    worker_n: int = 300_000
    sink_n: int = 300_000
    rate: float = 10_000.0
    seconds: float = 30.0
    latency_rate: float = 1_000.0
    latency_seconds: float = 15.0
    publishers: int = 2
    window_keys: int = 200_000
    warmup_s: float = 3.0
    publisher: str = "raw"  # raw (a minimal MQTT client, ~7 us/message) or paho (~70 us/message)
    alert_n: int = 300  # alert stage: triggering readings (one fresh device each)
    alert_rate: float = 20.0  # alert stage: of them per second
    soak_minutes: float = 10.0
    soak_rate: float = 2_000.0
    query_devices: int = 500
    query_days: int = 365
    query_agg_days: int = 7
    query_raw_hours: int = 24
    query_reps: int = 20

    @classmethod
    def quick(cls) -> Sizes:
        return cls(devices=400, transport_n=20_000, gateway_n=5_000, worker_n=20_000, sink_n=20_000,
                   rate=1_000.0, seconds=5.0, latency_rate=200.0, latency_seconds=5.0, publishers=1,
                   window_keys=10_000, warmup_s=1.0, alert_n=40, soak_minutes=1.0, soak_rate=500.0,
                   query_devices=100, query_days=30, query_agg_days=2, query_raw_hours=6, query_reps=5)


@dataclass
class Context:
    base: Path
    sizes: Sizes
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    profile_dir: Path | None = None
    stack: Stack | None = None
    procs: Procs | None = None
    watch: KafkaWatch | None = None
    registered: bool = False
    _last_line: dict[str, float] = field(default_factory=dict)
    _stage_t0: float = 0.0
    stage: str = ""

    # -- output
    def say(self, text: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def tick(self, text: str, every: float = 1.0, force: bool = False) -> None:
        """One progress line per second per stage."""
        now = time.monotonic()
        if force or now - self._last_line.get(self.stage, 0.0) >= every:
            self._last_line[self.stage] = now
            print(f"  [{self.stage:<9} {now - self._stage_t0:6.1f}s] {text}", file=sys.stderr, flush=True)

    # -- services
    def services(self) -> Stack:
        if self.stack is None:
            stack = Stack(self.base)
            self.stack = stack  # set first, so a partial start is still stopped
            stack.start(self.say)
            from infra.db import migrate

            migrate(stack.dsn)
            self.watch = KafkaWatch(stack.kafka)
        return self.stack

    def prefix(self, stage: str) -> str:
        return f"bench{self.run_id}{stage[:3]}."

    def tag(self, stage: str) -> str:
        """Device id prefix of a stage's fleet (registered devices share the run's fleet)."""
        return f"b{self.run_id}{stage[:2]}"

    @property
    def fleet_tag(self) -> str:
        return f"b{self.run_id}"

    def topics(self, prefix: str) -> dict[str, str]:
        from infra.kafka_admin import ensure_topics
        from infra.settings import Settings
        from infra.topics import all_topics

        stack = self.services()
        settings = Settings(topic_prefix=prefix, partitions=self.sizes.partitions)
        names = all_topics(settings)
        ensure_topics(stack.kafka, list(names.values()), self.sizes.partitions)
        return names

    def register_fleet(self) -> list[data.Device]:
        """The run's devices (and a probe device) in the registry. Inserted directly with one shared
        secret hash: add_device's PBKDF2 (100k iterations) would take minutes for 2,000 devices."""
        devices = data.fleet(self.fleet_tag, self.sizes.devices)
        if not self.registered:
            import psycopg

            from infra.devices import hash_secret

            secret = hash_secret("bench")
            rows = [(d.device_id, d.kind, d.region, secret) for d in devices]
            rows.append((self.probe_device, "water_level", devices[0].region, secret))
            with psycopg.connect(self.services().dsn, autocommit=True) as conn, conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO devices (device_id, kind, region_code, secret_hash) VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (device_id) DO UPDATE SET kind = EXCLUDED.kind,"
                    " region_code = EXCLUDED.region_code, revoked_at = NULL", rows)
            self.registered = True
        return devices

    @property
    def probe_device(self) -> str:
        return f"{self.fleet_tag}-probe"

    @contextlib.contextmanager
    def stage_procs(self) -> Iterator[Procs]:
        """Processes of one stage: all stopped when it ends, even on error or Ctrl-C."""
        logs = self.base / "logs"
        procs = Procs(logs)
        self.procs = procs
        try:
            yield procs
        finally:
            procs.stop_all()
            self.procs = None

    # -- load generators
    def loadgen(self, procs: Procs, name: str, mode: str, spec: dict[str, Any], timeout: float,
                label: Callable[[dict[str, Any]], str] | None = None) -> dict[str, Any]:
        """Run `python -m bench.loadgen MODE` to completion with a progress line per second."""
        work = self.base / "loadgen"
        work.mkdir(parents=True, exist_ok=True)
        spec_path = work / f"{name}.spec.json"
        out_path = work / f"{name}.out.json"
        spec_path.write_text(json.dumps(spec))
        p = procs.python(name, ["-m", "bench.loadgen", mode, str(spec_path), str(out_path)], dict(os.environ))
        deadline = time.monotonic() + timeout
        prog = Path(str(out_path) + ".progress")
        while p.alive():
            if time.monotonic() > deadline:
                raise StageError(f"{name} did not finish in {timeout:.0f}s\n{p.log_tail()}")
            time.sleep(0.1)
            with contextlib.suppress(OSError, ValueError):
                doc = json.loads(prog.read_text())
                self.tick(label(doc) if label else f"{name}: {doc.get('count', 0):,}")
        procs.stop(p)
        if p.popen.returncode != 0 or not out_path.exists():
            raise StageError(f"{name} failed (exit {p.popen.returncode})\n{p.log_tail()}")
        result: dict[str, Any] = json.loads(out_path.read_text())
        return result

    def start_loadgen(self, procs: Procs, name: str, mode: str, spec: dict[str, Any]) -> tuple[Proc, Path]:
        work = self.base / "loadgen"
        work.mkdir(parents=True, exist_ok=True)
        spec_path = work / f"{name}.spec.json"
        out_path = work / f"{name}.out.json"
        spec_path.write_text(json.dumps(spec))
        p = procs.python(name, ["-m", "bench.loadgen", mode, str(spec_path), str(out_path)], dict(os.environ))
        return p, out_path

    def arus(self, procs: Procs, service: str, env: dict[str, str]) -> Proc:
        return procs.python(service, ["-m", "arus.cli", service], env)

    def profiler(self, procs: Procs, target: Proc, name: str) -> Proc | None:
        """py-spy record on a running process (collapsed stacks), when --profile DIR was given."""
        if self.profile_dir is None:
            return None
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(pyspy).exists():
            self.say("py-spy not found (pip install py-spy): no profile")
            return None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        out = self.profile_dir / f"{name}.collapsed.txt"
        return procs.start(f"py-spy-{name}", [pyspy, "record", "--pid", str(target.pid), "--rate", "250",
                                              "--format", "raw", "--nonblocking", "--output", str(out)],
                           dict(os.environ))

    def finish_profile(self, procs: Procs, prof: Proc | None, name: str) -> str | None:
        if prof is None or self.profile_dir is None:
            return None
        for _ in range(200):  # py-spy writes its file when the target exits
            if not prof.alive():
                break
            time.sleep(0.05)
        procs.stop(prof)
        out = self.profile_dir / f"{name}.collapsed.txt"
        if not out.exists():
            return None
        from bench.profile import render, summarise

        summary = self.profile_dir / f"{name}.summary.txt"
        summary.write_text(render(summarise(out.read_text()), top=30) + "\n")
        self.say(f"profile of the {name}: {summary}")
        return str(summary)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _require_alive(*procs: Proc) -> None:
    for p in procs:
        if not p.alive():
            raise StageError(f"{p.name} exited with {p.popen.returncode}\n{p.log_tail()}")


def _metrics_env(port_var: str) -> tuple[int, dict[str, str]]:
    port = embedded.free_port()
    return port, {port_var: str(port)}


# --------------------------------------------------------------------------- (a) transport


def transport(ctx: Context) -> tuple[Figures, Details]:
    s = ctx.sizes
    stack = ctx.services()
    prefix = ctx.prefix("transport")
    topic = ctx.topics(prefix)["ingest"]
    assert ctx.watch is not None
    with ctx.stage_procs() as procs:
        spec = {"bootstrap": stack.kafka, "topic": topic, "kind": "envelopes", "n": s.transport_n,
                "tag": ctx.tag("transport"), "devices": s.devices, "end_ms": _now_ms() - 60_000}
        prod = ctx.loadgen(procs, "transport-produce", "produce", spec, timeout=600,
                           label=lambda d: f"produce {d.get('count', 0):,}/{s.transport_n:,}")
        landed = ctx.watch.total(topic)
        if landed != s.transport_n:
            raise StageError(f"{landed} records in {topic}, expected {s.transport_n}")
        cons = ctx.loadgen(procs, "transport-consume", "consume",
                           {"bootstrap": stack.kafka, "topic": topic, "expected": s.transport_n}, timeout=600,
                           label=lambda d: f"consume {d.get('count', 0):,}/{s.transport_n:,}")
    if cons["count"] < s.transport_n:
        raise StageError(f"consumed {cons['count']} of {s.transport_n}")
    figures = {"transport_eps": round(cons["eps"]), "transport_produce_eps": round(prod["eps"])}
    details = {"messages": s.transport_n, "bytes_per_message": round(prod["bytes"] / prod["count"]),
               "produce": {k: prod[k] for k in ("seconds", "eps", "cpu_seconds")},
               "consume": {k: cons[k] for k in ("seconds", "eps", "cpu_seconds")},
               "how": "aiokafka, 4 partitions, acks=all, one record batch per partition per send; "
                      "consume without a group from the beginning, orjson.loads of every value"}
    return figures, details


# --------------------------------------------------------------------------- (b) gateway


class ProbePublisher:
    """A single MQTT client used to check that a path is up (not a load generator)."""

    def __init__(self, mqtt_url: str, client_id: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from producers.gateway import parse_mqtt_url

        target = parse_mqtt_url(mqtt_url)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        if target.username:
            self.client.username_pw_set(target.username, target.password)
        self.client.connect(target.host, target.port, keepalive=30)
        self.client.loop_start()
        self.seq = 0

    def send(self, device_id: str) -> None:
        self.seq += 1
        body = data.payload(_now_ms(), self.seq, {"waterLevel": 1.0, "flow": 2.0})
        self.client.publish(f"jember/v1/{device_id}/telemetry", body, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _wait_path(ctx: Context, probe: ProbePublisher, device: str, arrived: Callable[[], bool],
               procs: list[Proc], timeout: float, what: str) -> float:
    """Publish probe readings one at a time until `arrived()`; returns the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        _require_alive(*procs)
        probe.send(device)
        wait_until = time.monotonic() + 1.0
        while time.monotonic() < wait_until:
            if arrived():
                return time.monotonic() - t0
            time.sleep(0.05)
        ctx.tick(f"waiting for {what} ...")
    raise StageError(f"{what} not ready after {timeout:.0f}s")


def gateway(ctx: Context) -> tuple[Figures, Details]:
    s = ctx.sizes
    stack = ctx.services()
    prefix = ctx.prefix("gateway")
    names = ctx.topics(prefix)
    ingest = names["ingest"]
    watch = ctx.watch
    assert watch is not None
    port, extra = _metrics_env("ARUS_GATEWAY_METRICS_PORT")
    env = stack.env(prefix, **extra)
    client_id = env["ARUS_GATEWAY_CLIENT_ID"]
    try:
        with ctx.stage_procs() as procs:
            gw = ctx.arus(procs, "gateway", env)
            probe = ProbePublisher(stack.mqtt_url, f"{prefix}probe")
            try:
                ready_s = _wait_path(ctx, probe, f"{ctx.tag('gateway')}-probe",
                                     lambda: watch.total(ingest) > 0, [gw], 60, "gateway")
            finally:
                probe.close()
            base = watch.total(ingest)
            n_pub = max(1, s.publishers)
            pubs = []
            for i in range(n_pub):
                lo, hi = i * s.devices // n_pub, (i + 1) * s.devices // n_pub
                spec = {"mqtt_url": stack.mqtt_url, "tag": ctx.tag("gateway"), "devices": s.devices,
                        "slice": [lo, hi], "count": s.gateway_n // n_pub, "client_id": f"{prefix}pub{i}",
                        "window": 1000, "client": s.publisher}
                pubs.append(ctx.start_loadgen(procs, f"gateway-publisher{i}", "publish", spec))
            total = (s.gateway_n // n_pub) * n_pub
            samples: list[Sample] = []
            t0 = time.monotonic()
            last_progress = (0, t0)
            prof = None
            while True:
                landed = watch.total(ingest) - base
                now = time.monotonic()
                samples.append(Sample(now, landed, gw.cpu_seconds()))
                if landed and prof is None and ctx.profile_dir is not None:
                    prof = ctx.profiler(procs, gw, "gateway")
                published = sum(_progress(out) for _, out in pubs)
                ctx.tick(f"published {published:,}  landed in ingest {landed:,}/{total:,}  "
                         f"gateway cpu {gw.cpu_seconds():.1f}s")
                if landed >= total:
                    break
                if landed > last_progress[0]:
                    last_progress = (landed, now)
                elif now - last_progress[1] > 60:
                    raise StageError(f"no progress for 60s: {landed} of {total} landed\n{gw.log_tail()}")
                _require_alive(gw)
                for p, _ in pubs:
                    if not p.alive() and p.popen.returncode not in (0, None):
                        raise StageError(f"{p.name} failed\n{p.log_tail()}")
                time.sleep(0.2)
            for p, _ in pubs:
                if p.alive():
                    with contextlib.suppress(Exception):
                        p.popen.wait(timeout=60)
            results = [json.loads(out.read_text()) for _, out in pubs if out.exists()]
            pub_cpu = sum(r.get("cpu_seconds", 0) for r in results)
            pub_eps = sum(r.get("eps", 0) for r in results)
            page = scrape(port)
            gw_rss = gw.rss_bytes()
            procs.stop(gw)
            profile = ctx.finish_profile(procs, prof, "gateway")
    finally:
        drop_mqtt_session(stack.mqtt_url, client_id)
    w = steady_window(samples, total)
    if w is None or not w.rate:
        raise StageError("no envelope landed")
    figures = {"gateway_eps": round(w.rate)}
    details = {
        "messages": total, "ready_after_s": round(ready_s, 2), "seconds": round(w.seconds, 2),
        "gateway_cpu_seconds": round(w.cpu, 2), "gateway_eps_per_cpu_s": round(w.per_cpu or 0),
        "gateway_rss_mb": round((gw_rss or 0) / 2**20, 1), "publishers": n_pub,
        "publish_eps": round(pub_eps), "publishers_cpu_seconds": round(pub_cpu, 2), "publisher_client": s.publisher,
        "gateway_batches_mean": _hist_mean(page, "arus_gateway_batch_messages"),
        "profile": profile,
        "how": "QoS 1 publishers (separate processes, 1000 in flight each) -> mosquitto -> "
               "`arus gateway` -> Kafka; counted by the ingest topic's high watermark",
    }
    return figures, details


def _progress(out: Path) -> int:
    try:
        return int(json.loads(Path(str(out) + ".progress").read_text()).get("count", 0))
    except (OSError, ValueError):
        return 0


def _hist_mean(page: dict[str, float], name: str) -> float | None:
    total, count = metric(page, name + "_sum"), metric(page, name + "_count")
    return round(total / count, 4) if count else None


# --------------------------------------------------------------------------- (c) worker


def worker(ctx: Context) -> tuple[Figures, Details]:
    s = ctx.sizes
    stack = ctx.services()
    ctx.register_fleet()
    prefix = ctx.prefix("worker")
    names = ctx.topics(prefix)
    watch = ctx.watch
    assert watch is not None
    with ctx.stage_procs() as procs:
        spec = {"bootstrap": stack.kafka, "topic": names["ingest"], "kind": "envelopes", "n": s.worker_n,
                "tag": ctx.fleet_tag, "devices": s.devices, "end_ms": _now_ms() - 60_000}
        pre = ctx.loadgen(procs, "worker-preload", "produce", spec, timeout=900,
                          label=lambda d: f"preload {d.get('count', 0):,}/{s.worker_n:,} envelopes into ingest")
        st = pre["stats"]
        expect_tel, expect_dlq = st["valid"], st["duplicates"] + st["unknown"]
        in_ingest = watch.total(names["ingest"])
        if in_ingest != s.worker_n:
            raise StageError(f"{in_ingest} envelopes in ingest, expected {s.worker_n}")
        port, extra = _metrics_env("ARUS_WORKER_METRICS_PORT")
        w_proc = ctx.arus(procs, "worker", stack.env(prefix, **extra))
        prof = None
        samples: list[Sample] = []
        total = expect_tel + expect_dlq
        last_progress = (0, time.monotonic())
        while True:
            hw = watch.highwater(names["telemetry"], names["dlq"])
            done = hw[names["telemetry"]] + hw[names["dlq"]]
            now = time.monotonic()
            cpu = w_proc.cpu_seconds()
            samples.append(Sample(now, done, cpu))
            if done and prof is None and ctx.profile_dir is not None:
                prof = ctx.profiler(procs, w_proc, "worker")
            w = steady_window(samples, total)
            rate = f"{w.rate:,.0f} ev/s, {w.per_cpu:,.0f} ev/cpu-s" if w and w.rate and w.per_cpu else "starting"
            ctx.tick(f"out: telemetry {hw[names['telemetry']]:,}/{expect_tel:,} dlq {hw[names['dlq']]:,}/"
                     f"{expect_dlq:,}  cpu {cpu:.1f}s  {rate}")
            if hw[names["telemetry"]] >= expect_tel and hw[names["dlq"]] >= expect_dlq:
                break
            if done > last_progress[0]:
                last_progress = (done, now)
            elif now - last_progress[1] > 90:
                raise StageError(f"worker made no progress for 90s ({done} of {total})\n{w_proc.log_tail()}")
            _require_alive(w_proc)
            time.sleep(0.1)
        page = scrape(port)
        rss = w_proc.rss_bytes()
        agg = watch.highwater(names["aggregates"])[names["aggregates"]]
        procs.stop(w_proc)
        total_cpu = w_proc.cpu_seconds()
        profile = ctx.finish_profile(procs, prof, "worker")
    w = steady_window(samples, total)
    if w is None or not w.per_cpu or not w.rate:
        raise StageError("no output observed")
    figures = {"worker_eps_per_core": round(w.per_cpu), "worker_eps_wall": round(w.rate)}
    details = {
        "envelopes": s.worker_n, "devices": s.devices, "valid": expect_tel, "duplicates": st["duplicates"],
        "unknown_device": st["unknown"], "rows": st["rows"], "event_time_span_s": (st["last_ms"] - st["first_ms"]) // 1000,
        "seconds": round(w.seconds, 2), "cpu_seconds": round(w.cpu, 2),
        "cpu_utilisation": round(w.cpu / w.seconds, 2) if w.seconds else None,
        "whole_process_cpu_seconds": round(total_cpu, 2), "cpu_seconds_outside_window": round(total_cpu - w.cpu, 2),
        "eps_per_cpu_including_startup": round(s.worker_n / total_cpu) if total_cpu else None,
        "aggregates_out": agg, "rss_mb": round((rss or 0) / 2**20, 1),
        "batch_seconds_mean": _hist_mean(page, "arus_worker_batch_seconds"),
        "checkpoint_seconds_mean": _hist_mean(page, "arus_worker_checkpoint_seconds"),
        "profile": profile,
        "how": "preload ingest, start one `arus worker`; interval = from the last observation before the "
               "first output to the first observation with every output (telemetry + dead letters) in "
               "Kafka; CPU = psutil user+system of the worker process over that interval",
    }
    return figures, details


# --------------------------------------------------------------------------- (d) sink


def sink(ctx: Context) -> tuple[Figures, Details]:
    import psycopg

    s = ctx.sizes
    stack = ctx.services()
    prefix = ctx.prefix("sink")
    names = ctx.topics(prefix)
    tag = ctx.tag("sink")
    # two days back, so these rows never share a time range with the live stages
    start_ms = _now_ms() - 2 * 86_400_000
    start_ms -= start_ms % 60_000
    with ctx.stage_procs() as procs:
        spec = {"bootstrap": stack.kafka, "topic": names["telemetry"], "kind": "readings", "n": s.sink_n,
                "tag": tag, "devices": s.devices, "start_ms": start_ms}
        pre = ctx.loadgen(procs, "sink-preload", "produce", spec, timeout=900,
                          label=lambda d: f"preload {d.get('count', 0):,}/{s.sink_n:,} readings messages")
        rows_expected = pre["stats"]["rows"]
        last_ms = pre["stats"]["last_ms"]
        port, extra = _metrics_env("ARUS_SINK_METRICS_PORT")
        sk = ctx.arus(procs, "sink", stack.env(prefix, **extra))
        prof = None
        samples: list[Sample] = []
        last_progress = (0.0, time.monotonic())
        while True:
            page = scrape(port)
            rows = metric(page, "arus_sink_rows_written_total", table="readings")
            now = time.monotonic()
            cpu = sk.cpu_seconds()
            samples.append(Sample(now, rows, cpu))
            if rows and prof is None and ctx.profile_dir is not None:
                prof = ctx.profiler(procs, sk, "sink")
            w = steady_window(samples, rows_expected)
            rate = f"{w.rate:,.0f} rows/s, {w.per_cpu:,.0f} rows/cpu-s" if w and w.rate and w.per_cpu else "starting"
            ctx.tick(f"rows written {rows:,.0f}/{rows_expected:,}  cpu {cpu:.1f}s  {rate}")
            if rows >= rows_expected:
                break
            if rows > last_progress[0]:
                last_progress = (rows, now)
            elif now - last_progress[1] > 90:
                raise StageError(f"sink made no progress for 90s ({rows} of {rows_expected})\n{sk.log_tail()}")
            _require_alive(sk)
            time.sleep(0.2)  # each scrape costs the sink a little CPU: 5 a second is plenty
        flush_mean = _hist_mean(page, "arus_sink_flush_seconds")
        batch_mean = _hist_mean(page, "arus_sink_batch_rows")
        replays = metric(page, "arus_sink_errors_total", kind="replay_upsert")
        procs.stop(sk)
        profile = ctx.finish_profile(procs, prof, "sink")
        with psycopg.connect(stack.dsn, autocommit=True) as conn:
            landed = conn.execute(
                "SELECT count(*) FROM readings WHERE time BETWEEN %s AND %s AND device_id LIKE %s",
                (datetime.fromtimestamp(start_ms / 1000, UTC), datetime.fromtimestamp(last_ms / 1000, UTC),
                 tag + "-%")).fetchone()
        landed_rows = int(landed[0]) if landed else 0
        copy_spec = {"dsn": stack.dsn, "tag": tag, "devices": s.devices, "n": s.sink_n, "start_ms": start_ms,
                     "chunk": 20_000, "breakdown": True}
        cp = ctx.loadgen(procs, "copy-baseline", "copy", copy_spec, timeout=900,
                         label=lambda d: f"plain COPY {d.get('count', 0):,}/{rows_expected:,} rows")
    if landed_rows != rows_expected:
        raise StageError(f"{landed_rows} rows in readings, expected {rows_expected}")
    w = steady_window(samples, rows_expected)
    if w is None or not w.rate:
        raise StageError("no rows observed")
    figures = {"sink_rows_per_s": round(w.rate), "sink_rows_per_cpu_s": round(w.per_cpu or 0),
               "copy_rows_per_s": round(cp["rows_per_s"])}
    details = {
        "messages": s.sink_n, "rows": rows_expected, "rows_landed": landed_rows, "seconds": round(w.seconds, 2),
        "cpu_seconds": round(w.cpu, 2), "flush_seconds_mean": flush_mean, "rows_per_flush_mean": batch_mean,
        "flushes_that_met_existing_rows": replays,
        "copy": {k: cp[k] for k in ("rows", "landed", "seconds", "rows_per_s", "cpu_seconds", "chunk")},
        "postgres_breakdown": cp.get("breakdown"),
        "sink_vs_copy": round(w.rate / cp["rows_per_s"], 2) if cp.get("rows_per_s") else None,
        "profile": profile,
        "how": "preload jember.telemetry with ReadingMsg, start one `arus sink`; rows counted by its "
               "arus_sink_rows_written_total{table=readings}; then verified with count(*); COPY baseline: "
               "the same rows, binary COPY in 20,000-row transactions into an UNLOGGED table without "
               "indexes (consumers.sink.copy_raw), from a separate process",
    }
    return figures, details


# --------------------------------------------------------------------------- (e, f) the whole pipeline


def _pipeline(ctx: Context, stage: str, rate: float, seconds: float, publishers: int) -> dict[str, Any]:
    """gateway + worker + sink running, publishers at `rate` for `seconds`; everything it measured."""
    import psycopg

    s = ctx.sizes
    stack = ctx.services()
    devices = ctx.register_fleet()
    prefix = ctx.prefix(stage)
    names = ctx.topics(prefix)
    watch = ctx.watch
    assert watch is not None
    sink_port, sink_env = _metrics_env("ARUS_SINK_METRICS_PORT")
    gw_port, gw_env = _metrics_env("ARUS_GATEWAY_METRICS_PORT")
    wk_port, wk_env = _metrics_env("ARUS_WORKER_METRICS_PORT")
    env = stack.env(prefix)
    client_id = env["ARUS_GATEWAY_CLIENT_ID"]
    like = ctx.fleet_tag + "-%"
    try:
        with ctx.stage_procs() as procs, psycopg.connect(stack.dsn, autocommit=True) as conn:
            sk = ctx.arus(procs, "sink", {**env, **sink_env})
            wk = ctx.arus(procs, "worker", {**env, **wk_env})
            gw = ctx.arus(procs, "gateway", {**env, **gw_env})
            sut = [sk, wk, gw]
            probe = ProbePublisher(stack.mqtt_url, f"{prefix}probe")
            t_probe = datetime.now(UTC)
            try:
                ready_s = _wait_path(
                    ctx, probe, ctx.probe_device,
                    lambda: conn.execute("SELECT 1 FROM readings WHERE time >= %s AND device_id = %s LIMIT 1",
                                         (t_probe, ctx.probe_device)).fetchone() is not None,
                    sut, 180, "gateway -> worker -> sink")
            finally:
                probe.close()
            ctx.say(f"{stage}: pipeline ready after {ready_s:.1f}s; publishing {rate:,.0f} msg/s for {seconds:.0f}s")
            base_rows = metric(scrape(sink_port), "arus_sink_rows_written_total", table="readings")
            base_hw = watch.highwater(names["ingest"], names["telemetry"])
            timeline: list[dict[str, Any]] = []
            last_tl = 0.0
            psutil.cpu_percent(interval=None)
            cpu0 = {p.name: p.cpu_seconds() for p in sut}
            svc0 = stack.cpu_seconds()
            n_pub = max(1, publishers)
            pubs = []
            for i in range(n_pub):
                lo, hi = i * len(devices) // n_pub, (i + 1) * len(devices) // n_pub
                spec = {"mqtt_url": stack.mqtt_url, "tag": ctx.fleet_tag, "devices": s.devices,
                        "slice": [lo, hi], "rate": rate / n_pub, "seconds": seconds,
                        "client_id": f"{prefix}pub{i}", "window": 5000, "seed": 1, "client": s.publisher}
                pubs.append(ctx.start_loadgen(procs, f"{stage}-publisher{i}", "publish", spec))
            t_start = time.monotonic()
            results: list[dict[str, Any]] | None = None
            expected_rows = 0
            last_progress = (0.0, time.monotonic())
            while True:
                now = time.monotonic()
                rows = metric(scrape(sink_port), "arus_sink_rows_written_total", table="readings") - base_rows
                published = sum(_progress(o) for _, o in pubs)
                if now - last_tl >= 1.0:  # where the backlog builds up: one point per second
                    last_tl = now
                    hw = watch.highwater(names["ingest"], names["telemetry"])
                    cpu = {p.name: p.cpu_seconds() - cpu0[p.name] for p in sut}
                    sink_page, wk_page = scrape(sink_port), scrape(wk_port)
                    point = {"t": round(now - t_start, 2), "published": published,
                             **{f"{p.name}_rss_mb": round((p.rss_bytes() or 0) / 2**20, 1) for p in sut},
                             "sink_lag": int(metric_sum(sink_page, "arus_sink_consumer_lag")),
                             "worker_lag": int(metric_sum(wk_page, "arus_worker_consumer_lag")),
                             "worker_rejected": int(metric_sum(wk_page, "arus_worker_rejected_total")),
                             "ingest": hw[names["ingest"]] - base_hw[names["ingest"]],
                             "telemetry": hw[names["telemetry"]] - base_hw[names["telemetry"]],
                             "rows": int(rows), "machine_cpu_pct": psutil.cpu_percent(interval=None),
                             **{f"{k}_cpu_s": round(v, 2) for k, v in cpu.items()}}
                    timeline.append(point)
                    ctx.tick(f"published {published:,}  ingest {point['ingest']:,}  telemetry "
                             f"{point['telemetry']:,}  rows {rows:,.0f}  machine cpu {point['machine_cpu_pct']:.0f}%"
                             "  " + " ".join(f"{k} {v:.1f}s" for k, v in cpu.items()))
                if results is None and all(not p.alive() for p, _ in pubs):
                    results = [json.loads(o.read_text()) for _, o in pubs if o.exists()]
                    if len(results) != n_pub or any("error" in r for r in results):
                        raise StageError("a publisher failed\n" + "\n".join(p.log_tail() for p, _ in pubs))
                    expected_rows = sum(r["rows"] for r in results)
                if results is not None and rows >= expected_rows:
                    break
                if rows > last_progress[0]:
                    last_progress = (rows, now)
                elif now - last_progress[1] > 60 and results is not None:
                    break  # lost or stuck: the database check below says what is missing
                elif now - last_progress[1] > 120:
                    raise StageError("no rows for 120s\n" + "\n".join(p.log_tail() for p in sut))
                _require_alive(*sut)
                time.sleep(0.25)
            t_done = time.monotonic()
            cpu = {p.name: round(p.cpu_seconds() - cpu0[p.name], 2) for p in sut}
            cpu.update({k: round(v - svc0.get(k, 0.0), 2) for k, v in stack.cpu_seconds().items()})
            cpu["publishers"] = 0.0  # filled in from their own reports below
            rss = {p.name: round((p.rss_bytes() or 0) / 2**20, 1) for p in sut}
            pages = {"sink": scrape(sink_port), "worker": scrape(wk_port), "gateway": scrape(gw_port)}
            for p in (gw, wk, sk):  # upstream first, each drains into the next
                procs.stop(p)
            t_first = min(r["t_first"] for r in results)
            t_last = max(r["t_last"] for r in results)
            published_msgs = sum(r["published"] for r in results)
            acked = sum(r["acked"] for r in results)
            lo_t = datetime.fromtimestamp(t_first - 1, UTC)
            row = conn.execute(
                "SELECT count(*), count(DISTINCT event_id) FROM readings WHERE time >= %s AND device_id LIKE %s"
                " AND device_id <> %s", (lo_t, like, ctx.probe_device)).fetchone()
            n_rows, n_events = (int(row[0]), int(row[1])) if row else (0, 0)
            lat = conn.execute(
                "SELECT extract(epoch FROM max(ingested_at) - min(time)) * 1000, extract(epoch FROM max(ingested_at))"
                " FROM readings WHERE time >= %s AND device_id LIKE %s AND device_id <> %s GROUP BY event_id",
                (lo_t, like, ctx.probe_device)).fetchall()
            dead = conn.execute(
                "SELECT reason, count(*) FROM dead_letters WHERE time >= %s AND device_id LIKE %s GROUP BY reason",
                (lo_t, like)).fetchall()
    finally:
        drop_mqtt_session(stack.mqtt_url, client_id)
    latencies = [float(r[0]) for r in lat]
    landed_at = sorted(float(r[1]) for r in lat)
    warm = min(s.warmup_s, max(0.0, (t_last - t_first) / 4))
    w0, w1 = t_first + warm, t_last
    in_window = sum(1 for t in landed_at if w0 <= t <= w1)
    sustained = in_window / (w1 - w0) if w1 > w0 else None
    drain_s = (landed_at[-1] - t_last) if landed_at else None
    wall = t_done - t_start
    cpu["publishers"] = round(sum(r.get("cpu_seconds", 0.0) for r in results), 2)
    return {
        "rate_target": rate, "seconds_target": seconds, "publishers": n_pub, "publisher_client": s.publisher, "ready_after_s": round(ready_s, 2),
        "published": published_msgs, "acked": acked, "publish_seconds": round(t_last - t_first, 2),
        "publish_eps": round(published_msgs / (t_last - t_first)) if t_last > t_first else None,
        "publisher_results": [{k: r[k] for k in ("published", "acked", "eps", "cpu_seconds")} for r in results],
        "rows_expected": expected_rows, "rows_landed": n_rows, "events_landed": n_events,
        "lost_events": published_msgs - n_events, "lost_rows": expected_rows - n_rows,
        "sustained_eps": round(sustained) if sustained else None,
        "sustained_window_s": round(w1 - w0, 2),
        "drain_after_last_publish_s": round(drain_s, 3) if drain_s is not None else None,
        "wall_seconds": round(wall, 2),
        "cpu_seconds": cpu,
        "cpu_cores_used": {k: round(v / wall, 2) for k, v in cpu.items()},
        "rss_mb": rss, "latency_ms": latency_summary(latencies),
        "dead_letters": {r[0]: int(r[1]) for r in dead},
        "sink_flush_seconds_mean": _hist_mean(pages["sink"], "arus_sink_flush_seconds"),
        "sink_rows_per_flush_mean": _hist_mean(pages["sink"], "arus_sink_batch_rows"),
        "gateway_produce_latency_mean_s": _hist_mean(pages["gateway"], "arus_gateway_produce_latency_seconds"),
        "worker_batch_seconds_mean": _hist_mean(pages["worker"], "arus_worker_batch_seconds"),
        "timeline": timeline,
    }


def metric_sum(page: dict[str, float], name: str) -> float:
    """Sum of every labelled sample of one metric in a scraped page."""
    return sum(v for k, v in page.items() if k == name or k.startswith(name + "{"))


_SOAK_ENDS_S = 180.0  # RSS at each end of a soak: the median over this span (a quarter of a short run)


def _slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute."""
    n = len(points)
    if n < 2:
        return None
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    if var == 0:
        return None
    return sum((t - mx) * (v - my) for t, v in points) / var * 60


def soak_summary(timeline: list[dict[str, Any]], names: list[str], warmup_fraction: float = 0.25,
                 fill_s: float = 0.0) -> dict[str, Any]:
    """RSS per process after warm-up: both ends, peak, growth and slope. Flat means the median of the
    last `_SOAK_ENDS_S` (3 minutes; a quarter of a shorter span) is within 10% (or 10 MB) of the median
    of the first one after warm-up, and the slope of the second half is under 1 MB/min.

    Warm-up is the first quarter, or `fill_s` (the time the worker's open windows take to fill: window
    + allowed lateness) when the run is at least twice that long; a shorter run says `filled: False`.
    """
    if not timeline:
        return {}
    t_end = timeline[-1]["t"]
    filled = fill_s <= 0 or 2 * fill_s <= t_end
    t_warm = max(t_end * warmup_fraction, fill_s if filled else 0.0)
    warm = [p for p in timeline if p["t"] >= t_warm]
    half = [p for p in timeline if p["t"] >= max(t_end / 2, t_warm)]
    out: dict[str, Any] = {}
    for name in names:
        key = f"{name}_rss_mb"
        series = [(p["t"], p[key]) for p in warm if key in p]
        if not series:
            continue
        # The worker's RSS swings by ~100 MB within minutes (state snapshots come and go), so one sample
        # at each end measures the swing, not growth: compare the medians of the first and last spans.
        span = min(_SOAK_ENDS_S, (series[-1][0] - series[0][0]) / 4)
        first = statistics.median(v for t, v in series if t <= series[0][0] + span)
        last = statistics.median(v for t, v in series if t >= series[-1][0] - span)
        slope = _slope_per_minute([(p["t"], p[key]) for p in half if key in p])
        growth = last - first
        out[name] = {"warmup_s": round(t_warm, 1), "filled": filled, "rss_after_warmup_mb": round(first, 1),
                     "rss_end_mb": round(last, 1), "ends_median_of_s": round(span, 1),
                     "rss_first_sample_after_warmup_mb": series[0][1], "rss_last_sample_mb": series[-1][1],
                     "rss_peak_after_warmup_mb": max(v for _, v in series),
                     "growth_mb": round(growth, 1),
                     "second_half_slope_mb_per_min": round(slope, 2) if slope is not None else None,
                     "flat": (growth <= max(10.0, 0.1 * first)) and (slope is None or slope < 1.0)}
    return out


def soak(ctx: Context) -> tuple[Figures, Details]:
    s = ctx.sizes
    d = _pipeline(ctx, "soak", s.soak_rate, s.soak_minutes * 60, 1)
    from infra.settings import Settings

    cfg = Settings()  # the services' windows: the bench does not change them
    summary = soak_summary(d["timeline"], ["gateway", "worker", "sink"],
                           fill_s=cfg.window_seconds + cfg.allowed_lateness_s)
    d["rss"] = summary
    d["max_sink_lag"] = max((p.get("sink_lag", 0) for p in d["timeline"]), default=0)
    d["max_worker_lag"] = max((p.get("worker_lag", 0) for p in d["timeline"]), default=0)
    d["how"] = ("every service running, QoS 1 publisher at a steady rate for the given minutes; RSS of each "
                "process, consumer lag and dead letters sampled every second; RSS must be flat after warm-up: "
                "the first quarter, or window + allowed lateness (the worker's open windows filling) when "
                "the run is at least twice that (growth of the 3-minute medians at both ends <= max(10 MB, "
                "10%) and second-half slope < 1 MB/min)")
    flat = bool(summary) and all(v["flat"] for v in summary.values())
    lossless = d["lost_events"] == 0 and d["lost_rows"] == 0
    figures = {"soak_rss_flat": flat, "soak_lost_events": d["lost_events"],
               "soak_rss_growth_mb_max": max((v["growth_mb"] for v in summary.values()), default=None)}
    if not (flat and lossless):
        d["error"] = f"rss flat: {flat}, lost events: {d['lost_events']}"
    return figures, d


def e2e(ctx: Context) -> tuple[Figures, Details]:
    s = ctx.sizes
    d = _pipeline(ctx, "e2e", s.rate, s.seconds, s.publishers)
    lossless = d["lost_events"] == 0 and d["lost_rows"] == 0
    d["nothing_lost"] = lossless
    d["how"] = ("gateway + worker + sink + embedded services running; QoS 1 publishers at the target "
                "rate; e2e_eps = distinct events whose rows were written (ingested_at) between warm-up and "
                "the last publish, per second of that window; then every published reading is looked up")
    figures = {"e2e_eps": d["sustained_eps"] if lossless else None,
               "e2e_publish_to_row_p99_ms": d["latency_ms"]["p99"]}
    if not lossless:
        d["error"] = f"lost {d['lost_events']} events / {d['lost_rows']} rows"
        figures["e2e_eps_with_loss"] = d["sustained_eps"]
    return figures, d


def latency(ctx: Context) -> tuple[Figures, Details]:
    s = ctx.sizes
    d = _pipeline(ctx, "latency", s.latency_rate, s.latency_seconds, 1)
    d["how"] = ("moderate rate; latency of an event = the row's ingested_at (PostgreSQL now(), i.e. the start "
                "of the sink transaction that wrote it) minus the publish time carried in the payload's ts; "
                "the row is visible at that transaction's commit, about one flush later "
                "(sink_flush_seconds_mean)")
    figures = {"publish_to_row_p50_ms": d["latency_ms"]["p50"], "publish_to_row_p99_ms": d["latency_ms"]["p99"]}
    return figures, d


def alert(ctx: Context) -> tuple[Figures, Details]:
    from bench.alert import alert_stage  # its own module: publish -> alert on the SSE stream

    return alert_stage(ctx)


# --------------------------------------------------------------------------- window state


def window_state(ctx: Context) -> tuple[Figures, Details]:
    with ctx.stage_procs() as procs:
        res = ctx.loadgen(procs, "window-state", "window-state", {"keys": ctx.sizes.window_keys}, timeout=900,
                          label=lambda d: f"folded {d.get('count', 0):,} readings")
    figures = {"window_state_bytes_per_key": round(res["bytes_per_key"], 1)}
    res["mb_per_million_keys"] = round(res["bytes_per_key"], 1)  # bytes/key == MB per million keys
    res["how"] = ("tracemalloc of one TelemetryPartition fed through fold() at steady state: one reading "
                  "per 10 s per device, 60 s windows kept for 600 s of allowed lateness, a checkpoint "
                  "(flush + delta snapshot) every 20,000 readings; state bytes / device window keys")
    return figures, res


STAGES: dict[str, Callable[[Context], tuple[Figures, Details]]] = {
    "transport": transport,
    "gateway": gateway,
    "worker": worker,
    "sink": sink,
    "e2e": e2e,
    "latency": latency,
    "alert": alert,
    "window_state": window_state,
    "soak": soak,
    "query": query,
}
OPT_IN = {"soak", "query"}  # not part of a plain `arus bench`: `arus bench soak --minutes N`
# The figures each stage is responsible for (null when the stage fails).
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "transport": ("transport_eps", "transport_produce_eps"),
    "gateway": ("gateway_eps",),
    "worker": ("worker_eps_per_core", "worker_eps_wall"),
    "sink": ("sink_rows_per_s", "sink_rows_per_cpu_s", "copy_rows_per_s"),
    "e2e": ("e2e_eps",),
    "latency": ("publish_to_row_p50_ms", "publish_to_row_p99_ms"),
    "alert": ("alert_latency_p50_ms", "alert_latency_p99_ms"),
    "window_state": ("window_state_bytes_per_key",),
    "soak": ("soak_rss_flat", "soak_lost_events", "soak_rss_growth_mb_max"),
    "query": ("query_year_daily_p95_ms", "query_day_minutes_p95_ms", "query_api_worst_p95_ms"),
}
