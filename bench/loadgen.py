"""Load generators and measuring clients, each run as its own process so that neither the GIL nor
the CPU of the load distorts the system under test:

    python -m bench.loadgen MODE SPEC_JSON OUT_JSON

MODE is one of produce, consume, publish, copy, window-state. SPEC_JSON is a file with the
parameters; the result is written to OUT_JSON, and OUT_JSON.progress holds {"count": n} updated
about twice a second while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import os
import random
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import orjson

from bench import data


class Progress:
    def __init__(self, out: Path) -> None:
        self.path = Path(str(out) + ".progress")
        self.last = 0.0

    def __call__(self, count: int, force: bool = False, **extra: Any) -> None:
        now = time.monotonic()
        if force or now - self.last >= 0.5:
            self.last = now
            tmp = self.path.with_suffix(".tmp")
            tmp.write_bytes(orjson.dumps({"count": count, **extra}))
            os.replace(tmp, self.path)


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


# --------------------------------------------------------------------------- Kafka produce


def _records(spec: dict[str, Any]) -> tuple[list[tuple[bytes, bytes]], data.PreloadStats]:
    devices = data.fleet(spec["tag"], spec["devices"], spec.get("seed", 1))
    st = data.PreloadStats()
    if spec["kind"] == "envelopes":
        gen = data.preload_envelopes(devices, spec["n"], spec["end_ms"], seed=spec.get("seed", 1),
                                     duplicate_rate=spec.get("duplicate_rate", 0.01),
                                     unknown_rate=spec.get("unknown_rate", 0.002), stats=st)
    else:
        gen = data.preload_readings(devices, spec["n"], spec["start_ms"], seed=spec.get("seed", 2), stats=st)
    return list(gen), st


async def produce(spec: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """Produce records as fast as aiokafka can: one record batch per partition at a time, as the
    worker and the gateway do (create_batch/send_batch), with a bounded number in flight."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.partitioner import murmur2

    records, st = _records(spec)
    producer = AIOKafkaProducer(bootstrap_servers=spec["bootstrap"], acks="all", linger_ms=5,
                                max_batch_size=1 << 20, max_request_size=4 << 20, request_timeout_ms=30000)
    await producer.start()
    try:
        topic = spec["topic"]
        parts = sorted(await producer.partitions_for(topic))
        cache: dict[bytes, int] = {}
        by_p: dict[int, list[tuple[bytes, bytes]]] = {p: [] for p in parts}
        for key, value in records:
            p = cache.get(key)
            if p is None:
                p = cache[key] = parts[(murmur2(key) & 0x7FFFFFFF) % len(parts)]
            by_p[p].append((key, value))
        cpu0, t0 = _cpu(), time.perf_counter()
        pending: list[asyncio.Future[Any]] = []
        sent = 0
        # Round-robin over partitions in slices, so all partitions fill at the same pace.
        pos = dict.fromkeys(parts, 0)
        while any(pos[p] < len(by_p[p]) for p in parts):
            for p in parts:
                items = by_p[p]
                i = pos[p]
                if i >= len(items):
                    continue
                batch = producer.create_batch()
                while i < len(items) and batch.append(key=items[i][0], value=items[i][1], timestamp=None) is not None:
                    i += 1
                sent += i - pos[p]
                pos[p] = i
                pending.append(await producer.send_batch(batch, topic, partition=p))
                if len(pending) >= 32:
                    await pending.pop(0)
                progress(sent)
        await asyncio.gather(*pending)
        seconds = time.perf_counter() - t0
        cpu = _cpu() - cpu0
    finally:
        await producer.stop()
    progress(len(records), force=True)
    return {"count": len(records), "seconds": seconds, "eps": len(records) / seconds, "cpu_seconds": cpu,
            "bytes": sum(len(v) for _, v in records), "stats": vars(st)}


# --------------------------------------------------------------------------- Kafka consume


async def consume(spec: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """Read a topic from the beginning without a group and decode every value with orjson."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=spec["bootstrap"], group_id=None, enable_auto_commit=False,
        auto_offset_reset="earliest", max_partition_fetch_bytes=8 << 20, fetch_max_bytes=32 << 20,
        fetch_max_wait_ms=20,
    )
    await consumer.start()
    try:
        topic = spec["topic"]
        await consumer.topics()  # loads the metadata of every topic
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        expected = spec["expected"]
        count = 0
        nbytes = 0
        loads = orjson.loads
        cpu0, t0 = _cpu(), time.perf_counter()
        first = None
        idle_deadline = time.monotonic() + 30
        while count < expected and time.monotonic() < idle_deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=20000)
            for msgs in batch.values():
                if first is None:
                    first = time.perf_counter()
                for m in msgs:
                    loads(m.value)
                    nbytes += len(m.value)
                count += len(msgs)
                idle_deadline = time.monotonic() + 30
            progress(count)
        seconds = time.perf_counter() - t0
        cpu = _cpu() - cpu0
    finally:
        await consumer.stop()
    progress(count, force=True)
    return {"count": count, "seconds": seconds, "eps": count / seconds if seconds else None,
            "cpu_seconds": cpu, "bytes": nbytes, "first_record_after_s": (first - t0) if first else None}


# --------------------------------------------------------------------------- MQTT publish


class PahoClient:
    """paho-mqtt, the reference device-side client: costs ~70 us of CPU per QoS 1 message."""

    def __init__(self, target: Any, client_id: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
                                  protocol=mqtt.MQTTv311)
        if target.username:
            self.client.username_pw_set(target.username, target.password)
        # 0 = no limit in paho; the caller's window bounds what is unacknowledged. A paho limit would make
        # every PUBACK scan all queued messages (_update_inflight): about 1,000 msg/s per client at most.
        self.client.max_inflight_messages_set(0)
        self.client.max_queued_messages_set(0)
        self.cond = threading.Condition()
        self.acked = 0
        self.client.on_publish = self._on_publish
        self.client.connect(target.host, target.port, keepalive=60)
        self.client.loop_start()
        deadline = time.monotonic() + 15
        while not self.client.is_connected():
            if time.monotonic() > deadline:
                raise RuntimeError("cannot connect to the MQTT broker")
            time.sleep(0.01)

    def _on_publish(self, _c: Any, _u: Any, _mid: int, _rc: Any, _p: Any) -> None:
        with self.cond:
            self.acked += 1
            self.cond.notify()

    def publish(self, topic: str, body: bytes) -> None:
        self.client.publish(topic, body, qos=1)

    def flush(self) -> None:
        pass

    def wait_acked(self, at_least: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.acked < at_least and time.monotonic() < deadline:
                self.cond.wait(0.2)
        return self.acked

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class RawClient:
    """A minimal MQTT 3.1.1 QoS 1 publisher on a plain socket: many PUBLISH packets per write, the
    PUBACKs counted in bulk. About ten times cheaper than paho, so that the load generator takes as
    little as possible of the machine the platform is measured on."""

    def __init__(self, target: Any, client_id: str) -> None:
        import socket

        if target.tls:
            raise RuntimeError("the raw publisher does not do TLS; use --publisher paho")
        self.sock = socket.create_connection((target.host, target.port), timeout=15)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        flags = 0x02  # clean session
        payload = self._str(client_id.encode())
        if target.username is not None:
            flags |= 0x80
            payload += self._str(target.username.encode())
            if target.password is not None:
                flags |= 0x40
                payload += self._str(target.password.encode())
        var = self._str(b"MQTT") + bytes([4, flags]) + (0).to_bytes(2, "big")  # keep-alive off
        self.sock.sendall(b"\x10" + self._len(len(var) + len(payload)) + var + payload)
        ack = self._recv_exact(4)
        if ack[0] != 0x20 or ack[3] != 0:
            raise RuntimeError(f"MQTT broker refused the connection (CONNACK {ack.hex()})")
        self.sock.setblocking(False)
        self.buf = bytearray()
        self.inbuf = bytearray()
        self.pid = 0
        self.acked = 0

    @staticmethod
    def _str(b: bytes) -> bytes:
        return len(b).to_bytes(2, "big") + b

    @staticmethod
    def _len(n: int) -> bytes:
        out = bytearray()
        while True:
            byte, n = n % 128, n // 128
            out.append(byte | (0x80 if n else 0))
            if not n:
                return bytes(out)

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise RuntimeError("the MQTT broker closed the connection")
            data += chunk
        return data

    def publish(self, topic: str, body: bytes) -> None:
        self.pid = self.pid % 65535 + 1
        t = topic.encode()
        self.buf += b"\x32" + self._len(2 + len(t) + 2 + len(body))
        self.buf += len(t).to_bytes(2, "big") + t + self.pid.to_bytes(2, "big") + body

    def flush(self) -> None:
        import select

        data, self.buf = bytes(self.buf), bytearray()
        pos = 0
        while pos < len(data):
            try:
                pos += self.sock.send(data[pos:] if pos else data)
            except BlockingIOError:
                self._read()  # the broker may be waiting for us to take its PUBACKs
                select.select([self.sock], [self.sock], [], 0.05)
        self._read()

    def _read(self) -> None:
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                raise RuntimeError("the MQTT broker closed the connection")
            self.inbuf += chunk
        buf, i = self.inbuf, 0
        while i + 2 <= len(buf):
            # remaining length (varint) after the first byte
            n, shift, j = 0, 0, i + 1
            while j < len(buf):
                b = buf[j]
                n |= (b & 0x7F) << shift
                shift += 7
                j += 1
                if not b & 0x80:
                    break
            else:
                break
            if j + n > len(buf):
                break
            if buf[i] >> 4 == 4:  # PUBACK
                self.acked += 1
            i = j + n
        del buf[:i]

    def wait_acked(self, at_least: int, timeout: float) -> int:
        import select

        deadline = time.monotonic() + timeout
        self.flush()
        while self.acked < at_least and time.monotonic() < deadline:
            select.select([self.sock], [], [], 0.05)
            self._read()
        return self.acked

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.setblocking(True)
            self.sock.sendall(b"\xe0\x00")
            self.sock.close()


def publish(spec: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """A fleet of devices publishing over one MQTT connection, QoS 1, at most `window` messages
    unacknowledged: as fast as that allows (`count`), or at `rate` messages per second for `seconds`.
    The payload's `ts` is the publish time in epoch ms (strictly increasing per device), so latency can
    be read off the rows."""
    from producers.gateway import parse_mqtt_url

    devices = data.fleet(spec["tag"], spec["devices"], spec.get("seed", 1))
    lo, hi = spec.get("slice", [0, len(devices)])
    devices = devices[lo:hi]
    rng = random.Random(f"pub-{spec.get('client_id')}")
    target = parse_mqtt_url(spec["mqtt_url"])
    window = int(spec.get("window", 1000))
    kind = spec.get("client", "raw")
    client: PahoClient | RawClient = (PahoClient if kind == "paho" else RawClient)(target, spec["client_id"])

    topics = [f"jember/v1/{d.device_id}/telemetry" for d in devices]
    last_ts = [0] * len(devices)
    seqs = [0] * len(devices)
    count = spec.get("count")
    rate = spec.get("rate")
    total = int(count) if count is not None else int(rate * spec["seconds"])
    sent = rows = 0
    per_second: dict[int, int] = {}
    cpu0 = _cpu()
    t0_wall = time.time()
    t0 = time.perf_counter()
    i = 0
    while sent < total:
        if rate:
            due = min(total, int((time.perf_counter() - t0) * rate) + 1)
            if due <= sent:
                client.flush()
                time.sleep(max(0.0, min(0.002, (sent + 1) / rate - (time.perf_counter() - t0))))
                continue
        else:
            due = total
        burst = 0
        while sent < due and burst < 200:
            if sent - client.acked >= window:
                client.wait_acked(sent - window + 1, 30)
                if sent - client.acked >= window:
                    raise RuntimeError(f"{window} messages unacknowledged for 30s")
            d = i % len(devices)
            i += 1
            now_ms = time.time_ns() // 1_000_000
            ts = now_ms if now_ms > last_ts[d] else last_ts[d] + 1
            last_ts[d] = ts
            seqs[d] += 1
            values = data.values_for(rng, devices[d])
            client.publish(topics[d], data.payload(ts, seqs[d], values))
            sent += 1
            burst += 1
            rows += len(values)
            sec = ts // 1000
            per_second[sec] = per_second.get(sec, 0) + 1
        client.flush()
        progress(sent, acked=client.acked)
    t_last_wall = time.time()
    publish_seconds = time.perf_counter() - t0
    acked = client.wait_acked(sent, 60)
    ack_seconds = time.perf_counter() - t0
    cpu = _cpu() - cpu0
    client.close()
    progress(sent, force=True, acked=acked)
    return {"client": kind, "published": sent, "acked": acked, "rows": rows, "t_first": t0_wall,
            "t_last": t_last_wall, "seconds": publish_seconds, "ack_seconds": ack_seconds,
            "eps": sent / publish_seconds, "cpu_seconds": cpu, "per_second": per_second}


# --------------------------------------------------------------------------- COPY baseline


async def copy(spec: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """Plain binary COPY of the sink stage's rows (same generator, same seed) into an UNLOGGED table
    without indexes: what PostgreSQL takes in when nothing else is asked of it. With `breakdown`, the
    same rows also go through the sink's own SQL path on a shadow copy of `readings` (same indexes),
    timed step by step: where a flush's time goes inside PostgreSQL."""
    from consumers.rows import READINGS_COLUMNS, parse_reading
    from consumers.sink import RAW_SCRATCH, copy_raw
    from infra.db import aconnect
    from schemas.results import Ok

    devices = data.fleet(spec["tag"], spec["devices"], spec.get("seed", 1))
    rows = []
    for _key, value in data.preload_readings(devices, spec["n"], spec["start_ms"], seed=spec.get("seed", 2)):
        result = parse_reading(value)
        assert isinstance(result, Ok)
        rows.extend(result.value)
    chunk = int(spec.get("chunk", 20000))
    conn = await aconnect(spec["dsn"], autocommit=True)
    breakdown: dict[str, Any] = {}
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {RAW_SCRATCH}")
        cpu0, t0 = _cpu(), time.perf_counter()
        for i in range(0, len(rows), chunk):
            await copy_raw(conn, rows[i:i + chunk])
            progress(min(i + chunk, len(rows)))
        seconds = time.perf_counter() - t0
        cpu = _cpu() - cpu0
        cur = await conn.execute(f"SELECT count(*) FROM {RAW_SCRATCH}")
        row = await cur.fetchone()
        landed = int(row[0]) if row else 0
        await conn.execute(f"DROP TABLE IF EXISTS {RAW_SCRATCH}")
        if spec.get("breakdown"):
            breakdown = await _sink_path_breakdown(conn, rows, chunk, READINGS_COLUMNS, progress)
    finally:
        await conn.close()
    return {"rows": len(rows), "landed": landed, "seconds": seconds, "rows_per_s": len(rows) / seconds,
            "cpu_seconds": cpu, "chunk": chunk, "breakdown": breakdown}


async def _sink_path_breakdown(conn: Any, rows: list[Any], chunk: int, columns: tuple[str, ...],
                               progress: Progress) -> dict[str, Any]:
    """The sink's flush statements (consumers/sink.py: COPY into a TEMP staging table, INSERT ... SELECT
    ... ON CONFLICT DO NOTHING, commit) against `bench_readings_shadow` (LIKE readings INCLUDING ALL),
    each step timed; then the same rows again (a replay: every row conflicts); then a plain COPY into
    the indexed shadow table (no staging, no conflict handling)."""
    from psycopg import sql

    from consumers.rows import READINGS_TYPES

    shadow, stage = "bench_readings_shadow", "bench_stage_readings"
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    await conn.execute(f"DROP TABLE IF EXISTS {shadow}")
    await conn.execute(f"CREATE TABLE {shadow} (LIKE readings INCLUDING ALL)")
    ddl = sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS").format(
        sql.Identifier(stage),
        sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t))
                           for c, t in zip(columns, READINGS_TYPES, strict=True)))
    await conn.execute(ddl)
    copy_stage = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(sql.Identifier(stage), cols)
    insert = sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} ON CONFLICT (device_id, metric, time) DO NOTHING"
                     ).format(sql.Identifier(shadow), cols, cols, sql.Identifier(stage))

    async def staged() -> dict[str, float]:
        t = {"copy_into_staging_s": 0.0, "insert_on_conflict_s": 0.0, "commit_s": 0.0}
        for i in range(0, len(rows), chunk):
            part = rows[i:i + chunk]
            a = time.perf_counter()
            async with conn.transaction():
                async with conn.cursor() as cur:
                    async with cur.copy(copy_stage) as cp:
                        cp.set_types(list(READINGS_TYPES))
                        for r in part:
                            await cp.write_row(r)
                    b = time.perf_counter()
                    await cur.execute(insert)
                c = time.perf_counter()
            d = time.perf_counter()
            t["copy_into_staging_s"] += b - a
            t["insert_on_conflict_s"] += c - b
            t["commit_s"] += d - c
            progress(i + len(part))
        total = sum(t.values())
        return {**{k: round(v, 3) for k, v in t.items()}, "total_s": round(total, 3),
                "rows_per_s": round(len(rows) / total)}

    first = await staged()
    replay = await staged()
    await conn.execute(f"TRUNCATE {shadow}")
    copy_direct = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(sql.Identifier(shadow), cols)
    a = time.perf_counter()
    for i in range(0, len(rows), chunk):
        async with conn.transaction(), conn.cursor() as cur, cur.copy(copy_direct) as cp:
            cp.set_types(list(READINGS_TYPES))
            for r in rows[i:i + chunk]:
                await cp.write_row(r)
    direct = time.perf_counter() - a
    await conn.execute(f"DROP TABLE IF EXISTS {shadow}")
    return {"staged_upsert": first, "staged_upsert_replay": replay,
            "copy_into_indexed_table": {"total_s": round(direct, 3), "rows_per_s": round(len(rows) / direct)}}


# --------------------------------------------------------------------------- window state memory


def window_state(spec: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """Bytes of TelemetryPartition state per active window key, by tracemalloc, at steady state:
    every device reports every 10 s, windows of 60 s stay open for the allowed lateness (600 s), the
    runtime checkpoints (flush + delta snapshot) every `checkpoint_every` readings (a second's worth at
    the worker's target rate of 20,000 events/s)."""
    from schemas.regions import kecamatan_of
    from stream_processors import windows as W
    from stream_processors.outputs import Outputs
    from stream_processors.telemetry import TelemetryPartition
    from stream_processors.validation import Reading, TimePolicy

    window_ms = int(spec.get("window_s", 60)) * 1000
    lateness_ms = int(spec.get("lateness_s", 600)) * 1000
    interval = data.READING_INTERVAL_MS
    target = int(spec["keys"])
    avg_metrics = sum(len(data.KIND_METRICS[k]) * w for k, w in data.KIND_MIX) / sum(w for _, w in data.KIND_MIX)
    open_windows = (window_ms + lateness_ms) / window_ms + 0.5
    n_devices = max(1, math.ceil(target / (avg_metrics * open_windows)))
    devices = data.fleet("ws", n_devices)
    rng = random.Random(3)
    values = [data.values_for(rng, d) for d in devices]
    rounds = (window_ms + lateness_ms + window_ms) // interval
    start = 1_700_000_000_000 - 1_700_000_000_000 % window_ms
    gc.collect()
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    p = TelemetryPartition(0, "bench.ingest", window_ms, lateness_ms, TimePolicy(7 * 86400_000, 300_000),
                           lambda: {})
    out = Outputs()
    order = sorted(range(n_devices), key=lambda i: devices[i].offset_ms)
    folded = 0
    every = int(spec.get("checkpoint_every", 20_000))
    t0 = time.perf_counter()
    for r in range(rounds):
        base_t = start + r * interval
        for i in order:
            d = devices[i]
            t = base_t + d.offset_ms
            if folded % every == 0:
                p.flush(out)
                p.snapshot(False)
                out.clear()
            # fresh strings per reading, as JSON decoding makes them (metric names are shared: orjson
            # caches short keys)
            dev_id = d.device_id.encode().decode()
            region = d.region
            p.fold(Reading(f"{dev_id}/{t}", dev_id, d.kind, region, kecamatan_of(region), t, dict(values[i]),
                           t + 40), b"", folded, t + 50, out)
            folded += 1
        progress(folded)
    p.flush(out)
    p.snapshot(False)
    out.clear()
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    state = current - base
    keys = len(p.devices)
    times = [len(W.times_of(a)) for a in p.devices.values()]
    return {
        "devices": n_devices, "readings": folded, "device_window_keys": keys, "region_window_keys": len(p.regions),
        "state_bytes": state, "bytes_per_key": state / keys if keys else None,
        "peak_bytes": peak - base, "readings_per_window_mean": sum(times) / len(times) if times else None,
        "seconds": time.perf_counter() - t0, "window_s": window_ms // 1000, "lateness_s": lateness_ms // 1000,
    }


# --------------------------------------------------------------------------- entry


MODES = {"produce": produce, "consume": consume, "publish": publish, "copy": copy, "window-state": window_state}


def main(argv: list[str]) -> int:
    mode, spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    out = Path(out_path)
    progress = Progress(out)
    fn = MODES[mode]
    try:
        result = asyncio.run(fn(spec, progress)) if asyncio.iscoroutinefunction(fn) else fn(spec, progress)
    except Exception as exc:  # the orchestrator reports it as the stage's error
        out.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        raise
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main(sys.argv[1:]))
