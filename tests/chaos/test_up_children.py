"""Kill the children of `arus up` (gateway, worker, sink, api) at random moments while 100,000 sequenced
MQTT messages stream through; `arus up`'s supervisor restarts each one. The database ends holding
exactly the input: rows = distinct natural keys = what was published, every sequence number once."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from infra import embedded
from tests.chaos.test_kill_everything import DEVICES, MESSAGES, RATE, _register
from tests.helpers import pg_fetch, pg_scalar, wait_pipeline_ready, wait_until

ROOT = Path(__file__).resolve().parents[2]
CHILDREN = ("gateway", "worker", "sink", "api")


def _child(up: subprocess.Popen[bytes], name: str) -> psutil.Process | None:
    for p in psutil.Process(up.pid).children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "arus.cli" in cmd and cmd[cmd.index("arus.cli") + 1:][:1] == [name] and p.status() != psutil.STATUS_ZOMBIE:
            return p
    return None


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_killing_the_children_of_arus_up_loses_and_doubles_nothing(
    sig: signal.Signals, arus_env, fresh_database_url, mqtt_url, tmp_path: Path,
) -> None:
    env = arus_env(database_url=fresh_database_url, ARUS_GATEWAY_CLIENT_ID=f"gw-{uuid.uuid4().hex[:8]}",
                   ARUS_WORKER_SESSION_TIMEOUT_MS="2000", ARUS_CHECKPOINT_INTERVAL_MS="300")
    env["ARUS_DATA_DIR"] = str(tmp_path / "data")
    dsn = env["ARUS_DATABASE_URL"]
    tag = f"upchaos{uuid.uuid4().hex[:6]}"
    _register(dsn, tag)
    log = tmp_path / "up.log"
    up = embedded.popen_in_group([sys.executable, "-m", "arus.cli", "up"], log, env=env, cwd=ROOT,
                                 deathsig=signal.SIGKILL)
    publisher: subprocess.Popen[bytes] | None = None
    try:
        wait_until(lambda: "Ctrl-C stops everything" in log.read_text() or up.poll() is not None, 120,
                   message="arus up printed its table")
        assert up.poll() is None, log.read_text()
        wait_pipeline_ready(dsn, mqtt_url)
        spec, out = tmp_path / "publish.json", tmp_path / "published.json"
        spec.write_text(json.dumps({"mqtt_url": mqtt_url, "tag": tag, "devices": DEVICES, "rate": RATE,
                                    "seconds": MESSAGES / RATE, "client_id": f"{tag}-pub", "window": 2000,
                                    "seed": 2, "client": "raw"}))
        publisher = subprocess.Popen([sys.executable, "-m", "bench.loadgen", "publish", str(spec), str(out)],  # noqa: S603
                                     cwd=ROOT)
        rng = random.Random(int(sig))
        kills: list[str] = []
        while publisher.poll() is None:
            time.sleep(rng.uniform(2.0, 4.0))  # random moments, not a synchronisation
            name = rng.choice(CHILDREN)
            victim = _child(up, name)
            if victim is None or publisher.poll() is not None:
                continue  # still being restarted by the supervisor
            victim.send_signal(sig)
            kills.append(name)
        assert publisher.wait(timeout=120) == 0, "the publisher failed"
        assert len(set(kills)) >= 2, f"kills {kills}: the stream was too short to hit several children"
        result = json.loads(out.read_text())
        assert result["published"] == result["acked"] == MESSAGES
        like = f"{tag}-%"

        def landed() -> tuple[int, int]:
            row = pg_fetch(dsn, "SELECT count(*), count(DISTINCT event_id) FROM readings WHERE device_id LIKE %s",
                           [like])[0]
            return int(row[0]), int(row[1])

        wait_until(lambda: landed() == (result["rows"], MESSAGES), 240,
                   message=f"every published reading lands (expected {result['rows']} rows, {MESSAGES} events)")
        seqs = pg_scalar(dsn, "SELECT count(DISTINCT split_part(event_id, '/', 1) || '/' || "
                              "split_part(event_id, '/', 3)) FROM readings WHERE device_id LIKE %s", [like])
        assert seqs == MESSAGES
        # the supervisor brought every killed child back
        wait_until(lambda: all(_child(up, n) is not None for n in CHILDREN), 60, message="every child running again")
        assert "restart" in log.read_text()
    finally:
        if publisher is not None and publisher.poll() is None:
            publisher.kill()
        up.send_signal(signal.SIGINT)
        embedded.stop_process(up, timeout=60)
