"""`arus dlq list` / `arus dlq replay`: a reading refused because its device was not registered yet
lands exactly once after the device is registered and its dead letter is replayed (twice)."""

from __future__ import annotations

import base64
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import psycopg

from arus.dlq import DeadLetter, plan_replay
from infra.devices import add_device
from infra.settings import Settings
from tests.helpers import pg_fetch, pg_scalar, publish_mqtt, wait_pipeline_ready, wait_until

ROOT = Path(__file__).resolve().parents[2]


def arus(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "arus.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"arus {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_replayed_dead_letter_lands_once(arus_env, spawn_arus, fresh_database_url, mqtt_url):
    env = arus_env(database_url=fresh_database_url, ARUS_WORKER_SESSION_TIMEOUT_MS="2000",
                   ARUS_CHECKPOINT_INTERVAL_MS="300")
    dsn = env["ARUS_DATABASE_URL"]
    procs = [spawn_arus(name, env=env) for name in ("gateway", "worker", "sink")]
    wait_pipeline_ready(dsn, mqtt_url)

    device = f"wl-{uuid.uuid4().hex[:6]}"
    observed = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=20)
    publish_mqtt(mqtt_url, [(f"jember/v1/{device}/telemetry",
                        orjson.dumps({"ts": observed.isoformat(), "values": {"waterLevel": 1.5}}))])
    wait_until(lambda: pg_scalar(dsn, "SELECT count(*) FROM dead_letters WHERE device_id = %s"
                                      " AND reason = 'unknown_device'", [device]), 60,
               message="the unregistered device's reading is dead-lettered")

    with psycopg.connect(dsn, autocommit=True) as conn:
        add_device(conn, device, "water_level", "35.09.19.1001")

    listed = arus(env, "dlq", "list", "--reason", "unknown_device")
    assert device in listed and "unknown_device" in listed
    as_json = orjson.loads(arus(env, "dlq", "list", "--device", device, "--json"))
    assert [d["reason"] for d in as_json] == ["unknown_device"]
    assert as_json[0]["time"].endswith("+07:00") and as_json[0]["replayed_at"] is None
    assert orjson.loads(arus(env, "dlq", "list", "--device", "no-such-device", "--json")) == []

    dry = arus(env, "dlq", "replay", "--device", device, "--dry-run")
    assert "would replay 1" in dry
    assert pg_scalar(dsn, "SELECT replayed_at FROM dead_letters WHERE device_id = %s", [device]) is None

    first = arus(env, "dlq", "replay", "--device", device)
    assert "replayed 1" in first, first
    wait_until(lambda: pg_scalar(dsn, "SELECT count(*) FROM readings WHERE device_id = %s", [device]), 60,
               message="the replayed reading lands")
    assert pg_scalar(dsn, "SELECT replayed_at FROM dead_letters WHERE device_id = %s"
                          " AND reason = 'unknown_device'", [device]) is not None

    second = arus(env, "dlq", "replay", "--device", device, "--reason", "unknown_device")
    assert "replayed 1" in second, second
    # the worker answers the second copy with a `duplicate` dead letter: then it has been processed
    wait_until(lambda: pg_scalar(dsn, "SELECT count(*) FROM dead_letters WHERE device_id = %s"
                                      " AND reason = 'duplicate'", [device]), 60,
               message="the second replay is recognised as a duplicate")
    rows = pg_fetch(dsn, "SELECT time, metric, value FROM readings WHERE device_id = %s", [device])
    assert rows == [(observed, "waterLevel", 1.5)]

    for p in procs:
        assert p.alive(), f"{p.name} died:\n{p.log_tail()}"


def _letter(**kw) -> DeadLetter:
    base = dict(id="dl-x", time=datetime.now(UTC), reason="payload_too_large", message="m", source="gateway",
                device_id="wl-1", topic="jember/v1/wl-1/telemetry", partition=None, offset=None,
                raw="", raw_encoding="utf-8", replayed_at=None)
    base.update(kw)
    return DeadLetter(**base)  # type: ignore[arg-type]


def test_replay_plan_decodes_gateway_payloads_and_skips_what_cannot_be_replayed():
    settings = Settings(topic_prefix="p.")
    good = orjson.dumps({"ts": 1_700_000_000_000, "values": {"waterLevel": 1.0}})
    rows = [
        _letter(id="a", raw=base64.b64encode(good).decode(), raw_encoding="base64"),
        _letter(id="b", raw="{not json"),
        _letter(id="c", raw=base64.b64encode(b"\xff\xfe").decode(), raw_encoding="base64"),
        _letter(id="d", source="worker", topic="p.telemetry", raw=good.decode()),
        _letter(id="e", source="worker", topic="p.ingest", raw=orjson.dumps({"subject": "wl-1"}).decode()),
        _letter(id="f", source="worker", topic="p.ingest", raw="not an envelope"),
        _letter(id="g", topic="jember/v1/wl-1/status", raw="online"),
        _letter(id="h", raw="###", raw_encoding="base64"),
    ]
    plan = plan_replay(rows, settings, now_ms=1_700_000_001_000)
    assert set(plan.records) == {"a", "e", "g"}
    [(key, value)] = plan.records["a"]
    env = orjson.loads(value)
    assert key == b"wl-1" and env["subject"] == "wl-1" and env["data"]["values"] == {"waterLevel": 1.0}
    assert plan.records["e"] == [(b"wl-1", b'{"subject":"wl-1"}')]
    assert "malformed_json" in plan.skipped["b"] and "not_utf8" in plan.skipped["c"]
    assert "not ingest input" in plan.skipped["d"] and "envelope" in plan.skipped["f"]
    assert "base64" in plan.skipped["h"]
