"""The `alert` stage of `arus bench`: latency from a triggering reading's MQTT publish to its alert on
the operators' SSE stream (GET /v1/alerts/stream), p50/p99.

gateway + worker (with a threshold rule from ARUS_RULES_FILE, `for: 1`) + sink (alerts and
alert_events) + api run on the stage's own topics. One reading above the level per fresh device, at a
steady rate over MQTT QoS 1, so each opens its own alert (no re-open window or flap suppression in the
way). An SSE client in this process notes when each `opened` event arrives; latency = that arrival
minus the wall-clock time just before the publish. The whole path is counted: MQTT, gateway, Kafka,
worker batch, Kafka, sink flush and commit, PostgreSQL NOTIFY, the API's read and fan-out, HTTP.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.request

from bench.stack import drop_mqtt_session
from bench.stages import Context, Details, Figures, ProbePublisher, StageError, _now_ms, _require_alive
from bench.stats import latency_summary
from infra import embedded

ALERT_RULES = """rules:
  - id: {rule}
    kind: water_level
    metric: waterLevel
    type: threshold
    levels:
      - {{severity: critical, above: 5.0, clear_below: 4.0}}
    for: 1
"""
REGION = "35.09.19.1004"  # Kaliwates
WARM_DEVICES = 60


class SSEWatch:
    """Reads the SSE stream in a thread: wall-clock arrival of each `opened` event by entity."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.opened: dict[str, float] = {}
        self.connected = threading.Event()
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import httpx

        try:
            with httpx.stream("GET", self.url, timeout=httpx.Timeout(10, read=120)) as resp:
                if resp.status_code != 200:
                    self.error = f"HTTP {resp.status_code}"
                    return
                event, data = "", ""
                for line in resp.iter_lines():
                    if self._stop.is_set():
                        return
                    if line.startswith(":"):
                        self.connected.set()
                    elif line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data = line[5:].strip()
                    elif line == "":
                        if event in ("opened", "reopened") and data:
                            arrived = time.time()
                            alert = json.loads(data).get("alert") or {}
                            self.opened.setdefault(str(alert.get("entity")), arrived)
                        event, data = "", ""
        except Exception as exc:  # reported by the stage
            if not self._stop.is_set():
                self.error = f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=3)


def alert_stage(ctx: Context) -> tuple[Figures, Details]:
    import psycopg

    from infra.devices import hash_secret

    s = ctx.sizes
    stack = ctx.services()
    prefix = ctx.prefix("alert")
    ctx.topics(prefix)
    tag = ctx.tag("alert")
    devices = [f"{tag}-{i:04d}" for i in range(s.alert_n)]
    warm = [f"{tag}-warm{i}" for i in range(WARM_DEVICES)]
    secret = hash_secret("bench")
    with psycopg.connect(stack.dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO devices (device_id, kind, region_code, secret_hash) VALUES (%s, 'water_level', %s, %s)"
            " ON CONFLICT (device_id) DO UPDATE SET kind = EXCLUDED.kind, revoked_at = NULL",
            [(d, REGION, secret) for d in devices + warm])
    rule = f"bench-alert-{ctx.run_id}"
    rules_path = ctx.base / "alert-rules.yaml"
    rules_path.write_text(ALERT_RULES.format(rule=rule))
    port = embedded.free_port()
    env = stack.env(prefix, ARUS_RULES_FILE=str(rules_path), ARUS_HTTP_PORT=str(port))
    base = f"http://127.0.0.1:{port}"
    watch: SSEWatch | None = None
    sent: dict[str, float] = {}
    ready_s = 0.0
    try:
        with ctx.stage_procs() as procs:
            sut = [ctx.arus(procs, "sink", env), ctx.arus(procs, "worker", env), ctx.arus(procs, "gateway", env),
                   ctx.arus(procs, "api", env)]
            t0 = time.monotonic()
            while True:
                _require_alive(*sut)
                with contextlib.suppress(OSError), urllib.request.urlopen(f"{base}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
                if time.monotonic() - t0 > 60:
                    raise StageError(f"api not answering after 60s\n{sut[3].log_tail()}")
                time.sleep(0.2)
            watch = SSEWatch(f"{base}/v1/alerts/stream?rule={rule}")
            if not watch.connected.wait(30):
                raise StageError(f"SSE stream not connected: {watch.error}")
            probe = ProbePublisher(stack.mqtt_url, f"{prefix}probe")

            def trigger(device: str) -> None:
                body = json.dumps({"ts": _now_ms(), "values": {"waterLevel": 6.0}}).encode()
                probe.client.publish(f"jember/v1/{device}/telemetry", body, qos=1).wait_for_publish(5)

            try:
                # warm-up: a triggering reading (fresh device) every 3 s until one reaches the stream
                for i, d in enumerate(warm):
                    _require_alive(*sut)
                    trigger(d)
                    deadline = time.monotonic() + 3.0
                    while time.monotonic() < deadline and not watch.opened:
                        time.sleep(0.02)
                    if watch.opened:
                        ready_s = time.monotonic() - t0
                        break
                    ctx.tick(f"waiting for the first alert on the SSE stream ({i + 1} tries) ...")
                else:
                    raise StageError("no alert reached the SSE stream during warm-up\n"
                                     + "\n".join(p.log_tail(15) for p in sut))
                ctx.say(f"alert: path ready after {ready_s:.1f}s; {s.alert_n} triggering readings at "
                        f"{s.alert_rate:g}/s")
                interval = 1.0 / s.alert_rate
                next_t = time.monotonic()
                for d in devices:
                    now = time.monotonic()
                    if next_t > now:
                        time.sleep(next_t - now)
                    next_t += interval
                    sent[d] = time.time()
                    trigger(d)
                    ctx.tick(f"published {len(sent)}/{s.alert_n}, alerts seen "
                             f"{sum(1 for x in sent if x in watch.opened)}")
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and not all(d in watch.opened for d in devices):
                    _require_alive(*sut)
                    time.sleep(0.05)
            finally:
                probe.close()
    finally:
        if watch is not None:
            watch.close()
        drop_mqtt_session(stack.mqtt_url, env["ARUS_GATEWAY_CLIENT_ID"])
    assert watch is not None
    seen = [d for d in devices if d in watch.opened]
    if not seen:
        raise StageError("no alert of the measured readings reached the SSE stream")
    summary = latency_summary([(watch.opened[d] - sent[d]) * 1000 for d in seen])
    details: Details = {
        "readings": s.alert_n, "alerts_seen": len(seen), "missing": s.alert_n - len(seen), "rate": s.alert_rate,
        "ready_after_s": round(ready_s, 2), "latency_ms": summary, "rule": ALERT_RULES.format(rule=rule),
        "how": __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
    }
    figures: Figures = {"alert_latency_p50_ms": summary["p50"], "alert_latency_p99_ms": summary["p99"]}
    if len(seen) < s.alert_n:
        details["error"] = f"{s.alert_n - len(seen)} alert(s) never reached the stream within 30 s"
        figures["alert_latency_p99_ms"] = None  # a p99 of those that arrived would hide the missing ones
    return figures, details
