"""Kill `arus api` at random moments while an agency system posts 4,000 complaint events in batches
(retrying a batch whose answer it did not get, as docs/agencies.md asks of clients), restart it: the
database ends holding every event exactly once (count = distinct event ids = input). SIGKILL and SIGTERM."""

from __future__ import annotations

import random
import signal
import threading
import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import httpx
import pytest

from tests.helpers import pg_scalar, wait_until
from tests.integration.test_agency_ingest import add_agency

EVENTS = 4_000
BATCH = 100
WIB = ZoneInfo("Asia/Jakarta")


def complaint(i: int, tag: str, opened: datetime) -> dict:
    return {"specversion": "1.0", "id": f"{tag}-{i}", "source": "lapor-chaos", "type": "jember.complaint.v1",
            "time": (opened + timedelta(seconds=i)).astimezone(WIB).isoformat(), "region": "35.09.19",
            "data": {"complaint_id": f"{tag}-c{i}", "status": "opened", "category": "jalan",
                     "agency": "DPUBMSDA", "channel": "web"}}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_killing_the_api_mid_ingest_loses_and_doubles_nothing(arus_env, spawn_arus, fresh_database_url, sig):
    env = arus_env(database_url=fresh_database_url, ARUS_WORKER_SESSION_TIMEOUT_MS="2000",
                   ARUS_CHECKPOINT_INTERVAL_MS="300")
    dsn = env["ARUS_DATABASE_URL"]
    for name in ("worker", "sink"):
        spawn_arus(name, env=env)
    base = f"http://127.0.0.1:{env['ARUS_HTTP_PORT']}"

    def start_api():
        p = spawn_arus("api", env=env)
        wait_until(lambda: httpx.get(f"{base}/healthz", timeout=2).status_code == 200, 60, message="api answers")
        return p

    api = start_api()
    key = add_agency(env, "pengaduan-chaos")
    tag = f"kill-{uuid.uuid4().hex[:6]}"
    opened = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=3)
    events = [complaint(i, tag, opened) for i in range(EVENTS)]
    acked = [0]  # batches answered 202
    retries = [0]
    errors: list[BaseException] = []
    done = threading.Event()

    def client() -> None:  # an agency system: a batch is done when its 202 arrived, else sent again
        try:
            with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=10) as http:
                for start in range(0, EVENTS, BATCH):
                    while True:
                        try:
                            r = http.post(f"{base}/v1/events", json=events[start:start + BATCH])
                        except httpx.TransportError:
                            retries[0] += 1
                            done.wait(0.05)  # the client's retry back-off while the api restarts
                            continue
                        if r.status_code == 202:
                            assert r.json()["accepted"] == BATCH, r.text
                            acked[0] += 1
                            break
                        retries[0] += 1  # 5xx while stopping: send the batch again
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    # four random moments of the stream, by the client's progress (the client waits while the api is down)
    moments = sorted(random.Random(7).sample(range(3, EVENTS // BATCH - 2), 4))
    for moment in moments:
        wait_until(lambda m=moment: done.is_set() or acked[0] >= m, 120, interval=0.01, message="ingest progresses")
        assert not done.is_set(), f"the client finished before batch {moment}: {errors}"
        api.kill() if sig == signal.SIGKILL else api.stop()
        api = start_api()
    thread.join(300)
    assert not thread.is_alive() and not errors, errors
    assert retries[0] >= 1  # the kills were felt by the client

    def landed() -> bool:
        return pg_scalar(dsn, "SELECT count(*) FROM service_events WHERE event_id LIKE %s", [f"{tag}-%"]) == EVENTS

    wait_until(landed, 180, interval=0.3, message="every event stored")
    count, distinct = (pg_scalar(dsn, "SELECT count(*) FROM service_events WHERE event_id LIKE %s", [f"{tag}-%"]),
                       pg_scalar(dsn, "SELECT count(DISTINCT event_id) FROM service_events WHERE event_id LIKE %s",
                                 [f"{tag}-%"]))
    assert count == distinct == EVENTS
    assert api.alive()
