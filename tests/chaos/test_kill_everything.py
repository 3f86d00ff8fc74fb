"""Kill the gateway, the worker and the sink at random moments while 100,000 MQTT messages (each with
a per-device sequence number) stream through, restarting each: the database ends holding exactly the
input (rows = distinct natural keys = what was published, every sequence number once) and the
1-minute aggregates equal SQL over those rows. Once with SIGKILL, once with SIGTERM."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from bench import data
from infra.devices import hash_secret
from tests.helpers import pg_fetch, pg_scalar, wait_pipeline_ready, wait_until

MESSAGES = 100_000
RATE = 4_000  # messages/s: ~25 s of stream
DEVICES = 200
SERVICES = ("gateway", "worker", "sink")


def _register(dsn: str, tag: str) -> list[data.Device]:
    devices = data.fleet(tag, DEVICES)
    secret = hash_secret("chaos")
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany("INSERT INTO devices (device_id, kind, region_code, secret_hash) VALUES (%s, %s, %s, %s)",
                        [(d.device_id, d.kind, d.region, secret) for d in devices])
    return devices


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_killing_every_service_mid_stream_loses_and_doubles_nothing(
    sig: signal.Signals, arus_env, spawn_arus, fresh_database_url, mqtt_url, tmp_path: Path,
) -> None:
    env = arus_env(database_url=fresh_database_url, ARUS_GATEWAY_CLIENT_ID=f"gw-{uuid.uuid4().hex[:8]}",
                   ARUS_WORKER_SESSION_TIMEOUT_MS="2000", ARUS_CHECKPOINT_INTERVAL_MS="300")
    dsn = env["ARUS_DATABASE_URL"]
    tag = f"chaos{uuid.uuid4().hex[:6]}"
    _register(dsn, tag)
    procs = {name: spawn_arus(name, env=env, name=f"{name}-0") for name in SERVICES}
    wait_pipeline_ready(dsn, mqtt_url)

    spec = tmp_path / "publish.json"
    out = tmp_path / "published.json"
    spec.write_text(json.dumps({"mqtt_url": mqtt_url, "tag": tag, "devices": DEVICES, "rate": RATE,
                                "seconds": MESSAGES / RATE, "client_id": f"{tag}-pub", "window": 2000,
                                "seed": 1, "client": "raw"}))
    publisher = subprocess.Popen([sys.executable, "-m", "bench.loadgen", "publish", str(spec), str(out)],  # noqa: S603
                                 cwd=Path(__file__).resolve().parents[2])
    rng = random.Random(sig)
    kills = []
    try:
        restarts = 0
        while publisher.poll() is None:
            time.sleep(rng.uniform(2.0, 5.0))  # random moments, not a synchronisation
            if publisher.poll() is not None:
                break
            name = rng.choice(SERVICES)
            victim = procs[name]
            if sig == signal.SIGKILL:
                victim.kill()
            else:
                assert victim.stop() == 0, f"{name} must stop cleanly on SIGTERM:\n{victim.log_tail()}"
            kills.append(name)
            restarts += 1
            procs[name] = spawn_arus(name, env=env, name=f"{name}-{restarts}")
        assert publisher.wait(timeout=120) == 0, "the publisher failed"
    finally:
        if publisher.poll() is None:
            publisher.kill()
    assert len(set(kills)) >= 2, f"kills {kills}: the stream was too short to hit several services"
    result = json.loads(out.read_text())
    assert result["published"] == result["acked"] == MESSAGES
    like = f"{tag}-%"

    def landed() -> tuple[int, int]:
        row = pg_fetch(dsn, "SELECT count(*), count(DISTINCT event_id) FROM readings WHERE device_id LIKE %s", [like])[0]
        return int(row[0]), int(row[1])

    wait_until(lambda: landed() == (result["rows"], MESSAGES), 240,
               message=f"every published reading lands (expected {result['rows']} rows, {MESSAGES} events)")
    # every per-device sequence number exactly once: event ids are {device}/{ts}/{seq}
    seqs = pg_scalar(dsn, "SELECT count(DISTINCT split_part(event_id, '/', 1) || '/' || split_part(event_id, '/', 3))"
                          " FROM readings WHERE device_id LIKE %s", [like])
    assert seqs == MESSAGES
    truth = sorted(pg_fetch(dsn, """
        SELECT device_id, metric, date_bin('1 minute', time, 'epoch'), count(*), round(sum(value)::numeric, 6)
        FROM readings WHERE device_id LIKE %s GROUP BY 1, 2, 3""", [like]))

    def aggregates() -> list[tuple]:
        return sorted(pg_fetch(dsn, """
            SELECT key, metric, bucket, count, round(sum::numeric, 6) FROM aggregates
            WHERE scope = 'device' AND key LIKE %s""", [like]))

    wait_until(lambda: aggregates() == truth, 120, message="device aggregates equal SQL over the rows")
    for name, p in procs.items():
        assert p.alive(), f"{name} died:\n{p.log_tail()}"
