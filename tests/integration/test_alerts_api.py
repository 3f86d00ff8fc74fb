"""Alerts over HTTP against a real `arus api`, PostgreSQL and Tansu: operators and their tokens,
listing with filters, detail with history, acknowledge/resolve (auth, conflicts, idempotent retries,
the command envelope on the ingest topic, 202 when Kafka is down), the SSE stream (live fan-out,
Last-Event-ID replay without gap or duplicate, heartbeats), the webhook and its dead letter.

Alert rows are written straight into alerts/alert_events, as the stream's sink would."""

from __future__ import annotations

import asyncio
import http.server
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest

from infra import embedded
from schemas.alerts import COMMAND_TYPE
from tests.alert_helpers import ROOT, SSEReader, add_event, add_operator, insert_alert
from tests.helpers import pg_fetch, pg_scalar, wait_until


def _uid(prefix: str = "al") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def api(arus_env, spawn_arus, fresh_database_url):
    """A running `arus api` on its own database; returns (base url, env, dsn)."""

    def start(create_topics: bool = True, **extra: str) -> tuple[str, dict[str, str], str]:
        env = arus_env(database_url=fresh_database_url, create_topics=create_topics, ARUS_SSE_HEARTBEAT_S="0.5",
                       **extra)
        spawn_arus("api", env=env)
        base = f"http://127.0.0.1:{env['ARUS_HTTP_PORT']}"
        wait_until(lambda: httpx.get(f"{base}/healthz", timeout=2).status_code == 200, 30, message="api answers")
        return base, env, fresh_database_url

    return start


def _arus(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "arus.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_operators_cli_stores_only_a_hash(arus_env, fresh_database_url):
    env = arus_env(database_url=fresh_database_url, create_topics=False)
    token = add_operator(env, "budi.bpbd")
    assert token.startswith("budi.bpbd.") and len(token) > 30
    stored = pg_scalar(fresh_database_url, "SELECT token_hash FROM operators WHERE name = 'budi.bpbd'")
    assert stored and token not in stored and token.split(".")[-1] not in stored
    from infra.devices import verify_secret

    assert verify_secret(token, stored) and not verify_secret(token + "x", stored)
    listing = _arus(env, "operators", "list")
    assert listing.returncode == 0 and "budi.bpbd" in listing.stdout and "active" in listing.stdout
    assert _arus(env, "operators", "revoke", "budi.bpbd").returncode == 0
    assert "revoked" in _arus(env, "operators", "list").stdout
    assert _arus(env, "operators", "revoke", "budi.bpbd").returncode == 1  # already revoked
    bad = _arus(env, "operators", "add", "no spaces allowed")
    assert bad.returncode == 2 and "invalid operator name" in bad.stderr
    # re-adding issues a new token and reactivates
    token2 = add_operator(env, "budi.bpbd")
    assert token2 != token
    assert pg_scalar(fresh_database_url, "SELECT revoked_at FROM operators WHERE name = 'budi.bpbd'") is None


def test_list_filters_sorting_and_detail(api):
    base, env, dsn = api()
    t0 = datetime.now(UTC) - timedelta(minutes=30)
    ids = {name: _uid(name) for name in ("crit", "warn", "major", "info", "resolved", "air", "ack")}
    insert_alert(dsn, ids["warn"], severity="warning", updated_at=t0 + timedelta(minutes=1))
    insert_alert(dsn, ids["crit"], severity="critical", updated_at=t0)
    insert_alert(dsn, ids["major"], severity="major", kecamatan="35.09.20", region="35.09.20.1007",
                 updated_at=t0 + timedelta(minutes=2))
    insert_alert(dsn, ids["info"], severity="info", updated_at=t0 + timedelta(minutes=3))
    insert_alert(dsn, ids["resolved"], severity="critical", state="resolved", transition="resolved")
    insert_alert(dsn, ids["air"], severity="warning", kind="air_quality", rule="pm25-hour", metric="pm25",
                 kecamatan="35.09.21", region="35.09.21.1001", updated_at=t0 + timedelta(minutes=5))
    insert_alert(dsn, ids["ack"], severity="warning", state="acknowledged", updated_at=t0 + timedelta(minutes=6))

    def get(**params: Any) -> dict[str, Any]:
        r = httpx.get(f"{base}/v1/alerts", params=params, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    body = get()
    order = [a["id"] for a in body["alerts"]]
    # default: open + acknowledged; severity first, then most recently updated
    assert order == [ids["crit"], ids["major"], ids["ack"], ids["air"], ids["warn"], ids["info"]]
    # last_seq: the newest event the stream has broadcast (a moment after the commit)
    max_seq = pg_scalar(dsn, "SELECT max(seq) FROM alert_events")
    assert body["last_seq"] <= max_seq
    wait_until(lambda: get()["last_seq"] == max_seq, 5, message="last_seq catches up")
    first = body["alerts"][0]
    assert first["opened_at"].endswith("Z") and first["updated_at_wib"].endswith("WIB")
    assert first["kecamatan_name"] == "Kaliwates"
    # WIB is UTC+7
    utc = datetime.fromisoformat(first["updated_at"].replace("Z", "+00:00"))
    assert first["updated_at_wib"] == (utc + timedelta(hours=7)).strftime("%Y-%m-%d %H:%M:%S WIB")

    assert [a["id"] for a in get(severity="major")["alerts"]] == [ids["crit"], ids["major"]]
    assert {a["id"] for a in get(state="resolved")["alerts"]} == {ids["resolved"]}
    assert len(get(state="all")["alerts"]) == 7
    assert {a["id"] for a in get(kecamatan="35.09.20")["alerts"]} == {ids["major"]}
    assert {a["id"] for a in get(kecamatan="patrang")["alerts"]} == {ids["major"]}  # by name too
    assert {a["id"] for a in get(kind="air_quality")["alerts"]} == {ids["air"]}
    assert {a["id"] for a in get(rule="pm25-hour")["alerts"]} == {ids["air"]}
    assert {a["id"] for a in get(region="35.09.2")["alerts"]} == {ids["major"], ids["air"]}
    since = (t0 + timedelta(minutes=4)).isoformat()
    assert {a["id"] for a in get(since=since)["alerts"]} == {ids["air"], ids["ack"]}
    assert {a["id"] for a in get(until=(t0 + timedelta(seconds=30)).isoformat())["alerts"]} == {ids["crit"]}
    assert len(get(limit=2)["alerts"]) == 2
    assert httpx.get(f"{base}/v1/alerts", params={"limit": 1001}).status_code == 422
    assert httpx.get(f"{base}/v1/alerts", params={"state": "bogus"}).status_code == 422
    assert httpx.get(f"{base}/v1/alerts", params={"severity": "huge"}).status_code == 422
    assert httpx.get(f"{base}/v1/alerts", params={"since": "yesterday"}).status_code == 422

    add_event(dsn, ids["warn"], "escalated", severity="critical", value=3.4)
    detail = httpx.get(f"{base}/v1/alerts/{ids['warn']}").json()
    assert detail["alert"]["severity"] == "critical"
    assert [e["transition"] for e in detail["events"]] == ["opened", "escalated"]
    assert detail["events"][1]["value"] == 3.4 and detail["events"][1]["time_wib"].endswith("WIB")
    assert httpx.get(f"{base}/v1/alerts/{_uid('nope')}").status_code == 404

    status = httpx.get(f"{base}/v1/status/kecamatan").json()
    by_code = {k["code"]: k for k in status["kecamatan"]}
    assert len(by_code) == 31 and by_code["35.09.19"]["name"] == "Kaliwates"
    # Kaliwates: crit, warn (now critical), info, ack are active; the resolved one is not
    assert by_code["35.09.19"]["active_alerts"] == 4 and by_code["35.09.19"]["worst_severity"] == "critical"
    assert by_code["35.09.21"]["worst_severity"] == "warning" and by_code["35.09.01"]["active_alerts"] == 0


async def _consume_commands(bootstrap: str, topic: str, want: int, timeout: float) -> list[tuple[bytes, dict]]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    got: list[tuple[bytes, dict]] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(got) < want and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for rec in records:
                    value = orjson.loads(rec.value)
                    if value.get("type") == COMMAND_TYPE:
                        got.append((rec.key, value))
    finally:
        await consumer.stop()
    return got


def test_ack_resolve_auth_conflicts_and_command_envelope(api, topic_prefix):
    base, env, dsn = api()
    alert_id = _uid()
    insert_alert(dsn, alert_id, entity="gauge-bedadung-01", severity="major")
    token = add_operator(env, "sari")
    revoked = add_operator(env, "joko")
    assert _arus(env, "operators", "revoke", "joko").returncode == 0
    url = f"{base}/v1/alerts/{alert_id}"

    # refused: no token, wrong scheme, malformed, wrong secret, unknown operator, revoked operator
    r = httpx.post(f"{url}/ack")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert httpx.post(f"{url}/ack", headers={"Authorization": f"Basic {token}"}).status_code == 401
    assert httpx.post(f"{url}/ack", headers={"Authorization": "Bearer nodot"}).status_code == 401
    assert httpx.post(f"{url}/ack", headers={"Authorization": f"Bearer {token}x"}).status_code == 401
    assert httpx.post(f"{url}/ack", headers={"Authorization": "Bearer ghost.abcdefgh"}).status_code == 401
    assert httpx.post(f"{url}/resolve", headers={"Authorization": f"Bearer {revoked}"}).status_code == 403
    assert pg_scalar(dsn, "SELECT state FROM alerts WHERE id = %s", [alert_id]) == "open"
    assert pg_scalar(dsn, "SELECT count(*) FROM alert_events WHERE alert_id = %s", [alert_id]) == 1

    auth = {"Authorization": f"Bearer {token}"}
    assert httpx.post(f"{base}/v1/alerts/{_uid('nope')}/ack", headers=auth).status_code == 404

    r = httpx.post(f"{url}/ack", headers=auth, json={"note": "tim BPBD berangkat"}, timeout=15)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["alert"]["state"] == "acknowledged" and body["alert"]["acknowledged_by"] == "sari"
    assert body["command"] == "sent" and body["event"]["transition"] == "acknowledged"
    ack_command = body["command_id"]
    row = pg_fetch(dsn, "SELECT state, acknowledged_by, acknowledged_at IS NOT NULL FROM alerts WHERE id = %s",
                   [alert_id])[0]
    assert row == ("acknowledged", "sari", True)
    events = pg_fetch(dsn, "SELECT dedup, transition, actor, state, note FROM alert_events WHERE alert_id = %s"
                      " ORDER BY seq", [alert_id])
    assert events[-1] == (f"{alert_id}:cmd:{ack_command}", "acknowledged", "sari", "acknowledged",
                          "tim BPBD berangkat")

    assert httpx.post(f"{url}/ack", headers=auth).status_code == 409  # already acknowledged
    # a retried command (same command_id) is one transition, answered like the first
    cid = str(uuid.uuid4())
    r1 = httpx.post(f"{url}/resolve", headers=auth, json={"command_id": cid})
    assert r1.status_code == 200 and r1.json()["alert"]["state"] == "resolved"
    r2 = httpx.post(f"{url}/resolve", headers=auth, json={"command_id": cid})
    assert r2.status_code == 200 and r2.json()["repeated"] is True
    assert httpx.post(f"{url}/resolve", headers=auth).status_code == 409  # resolve twice
    assert pg_scalar(dsn, "SELECT count(*) FROM alert_events WHERE alert_id = %s", [alert_id]) == 3
    assert pg_fetch(dsn, "SELECT state, resolved_by FROM alerts WHERE id = %s", [alert_id])[0] == ("resolved", "sari")

    got = asyncio.run(_consume_commands(env["ARUS_KAFKA_BOOTSTRAP"], f"{topic_prefix}ingest", 2, 30))
    assert len(got) == 2, got
    (k1, ack_env), (k2, res_env) = sorted(got, key=lambda kv: kv[1]["data"]["action"])
    assert k1 == k2 == b"gauge-bedadung-01"
    assert ack_env["id"] == ack_command and ack_env["source"] == "arus-api" and ack_env["specversion"] == "1.0"
    assert ack_env["subject"] == alert_id and ack_env["region"] == "35.09.19.1004"
    assert datetime.fromisoformat(ack_env["time"]).tzinfo is not None
    assert ack_env["data"] == {"action": "ack", "actor": "sari", "alert_id": alert_id, "rule_id": "river-siaga",
                               "entity": "gauge-bedadung-01", "command_id": ack_command,
                               "note": "tim BPBD berangkat"}
    assert res_env["data"]["action"] == "resolve" and res_env["id"] == cid


def test_kafka_down_still_stores_the_transition(api):
    dead_port = embedded.free_port()
    base, env, dsn = api(create_topics=False, ARUS_KAFKA_BOOTSTRAP=f"127.0.0.1:{dead_port}")
    alert_id = _uid()
    insert_alert(dsn, alert_id)
    token = add_operator(env, "wati")
    r = httpx.post(f"{base}/v1/alerts/{alert_id}/ack", headers={"Authorization": f"Bearer {token}"}, timeout=20)
    assert r.status_code == 202, r.text
    assert "warning" in r.json() and r.json()["command"] == "pending"
    assert pg_scalar(dsn, "SELECT state FROM alerts WHERE id = %s", [alert_id]) == "acknowledged"


def test_stream_replays_from_last_event_id_without_gap_or_duplicate(api):
    base, env, dsn = api()
    alert_ids = [_uid() for _ in range(3)]
    seqs = [insert_alert(dsn, a) for a in alert_ids]
    seqs += [add_event(dsn, alert_ids[0], "escalated", severity="critical")]
    cut = seqs[1]

    # writers keep going while the client connects: replayed and live rows must join exactly
    stop = threading.Event()
    written: list[int] = []

    def writer() -> None:
        i = 0
        while not stop.is_set() and i < 200:
            written.append(add_event(dsn, alert_ids[i % 3], "updated", value=float(i)))
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    reader = SSEReader(f"{base}/v1/alerts/stream", headers={"Last-Event-ID": str(cut)}).start()
    try:
        reader.wait_connected()
        wait_until(lambda: len(written) >= 40, 30, message="writer progresses")
        stop.set()
        t.join()
        written.append(add_event(dsn, alert_ids[1], "escalated", severity="major"))
        expected = sorted(s for s in seqs + written if s > cut)
        wait_until(lambda: len(reader.events) >= len(expected), 15,
                   message=f"all {len(expected)} events after {cut} arrive")
        got = reader.seqs()
        assert len(got) == len(set(got)), "duplicate events"
        assert sorted(got) == expected, "gap or extra events"
        last = reader.events[-1]
        assert last.event == "escalated" and last.data is not None
        assert last.data["alert"]["id"] == alert_ids[1] and last.data["alert"]["severity"] == "major"
        assert last.data["event"]["seq"] == int(last.id or 0) and last.data["event"]["actor"] == "stream"
        assert any(c == "heartbeat" for c in reader.comments) or True  # heartbeats are checked below
    finally:
        stop.set()
        reader.close()

    # ?last_event_id= works too, and filters apply to replayed and live events alike
    reader = SSEReader(f"{base}/v1/alerts/stream",
                       params={"last_event_id": seqs[0], "severity": "critical"}).start()
    try:
        reader.wait_connected()
        wait_until(lambda: reader.events, 10, message="replayed critical event")
        assert all(e.data and e.data["alert"]["severity"] == "critical" for e in reader.events)
        assert reader.seqs()[0] == seqs[3]
        wait_until(lambda: "heartbeat" in reader.comments, 5, message="heartbeat comment")
    finally:
        reader.close()
    assert httpx.get(f"{base}/v1/alerts/stream", headers={"Last-Event-ID": "x"}).status_code == 422


def test_one_ack_reaches_every_stream_client(api):
    base, env, dsn = api()
    readers = [SSEReader(f"{base}/v1/alerts/stream").start() for _ in range(3)]
    try:
        for r in readers:
            r.wait_connected()
        alert_id = _uid()
        insert_alert(dsn, alert_id, severity="critical")
        token = add_operator(env, "rina")
        assert httpx.post(f"{base}/v1/alerts/{alert_id}/ack", headers={"Authorization": f"Bearer {token}"},
                          timeout=15).status_code == 200
        for r in readers:
            wait_until(lambda r=r: [e.event for e in r.events] == ["opened", "acknowledged"], 5,
                       message="opened then acknowledged on every client")
            ack = r.events[-1].data
            assert ack is not None and ack["alert"]["state"] == "acknowledged"
            assert ack["alert"]["acknowledged_by"] == "rina" and ack["event"]["actor"] == "rina"
        # the stream, not yet aware of the ack, escalates: the sink keeps the row acknowledged, and
        # the SSE data shows the operator's state with the transition's severity
        pg_fetch(dsn, "INSERT INTO alert_events (dedup, alert_id, time, transition, severity, state, actor, value)"
                      " VALUES (%s, %s, now(), 'updated', 'critical', 'open', 'stream', 9.9)",
                 [f"{alert_id}:9", alert_id])
        for r in readers:
            wait_until(lambda r=r: len(r.events) == 3, 5, message="third event")
            data = r.events[-1].data
            assert data is not None and data["event"]["state"] == "open"
            assert data["alert"]["state"] == "acknowledged" and data["alert"]["value"] == 9.9
        page = httpx.get(f"{base}/metrics").text
        assert "arus_api_sse_clients 3.0" in page
        assert 'arus_api_alert_commands_total{action="ack",status="200"} 1.0' in page
        assert "arus_api_alert_events_total 3.0" in page
        # one LISTEN connection for the whole process, however many clients
        apps = pg_fetch(dsn, "SELECT application_name, count(*) FROM pg_stat_activity"
                             " WHERE datname = current_database() AND application_name LIKE 'arus-api%%' GROUP BY 1")
        assert dict(apps)["arus-api-listen"] == 1
    finally:
        for r in readers:
            r.close()


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], dict]] = []
    status = 200

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).received.append((dict(self.headers), orjson.loads(body)))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _hook_server(status: int) -> tuple[http.server.HTTPServer, type[_Hook]]:
    handler = type("Hook", (_Hook,), {"received": [], "status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, handler


def test_webhook_delivers_and_dead_letters_after_retries(arus_env, spawn_arus, fresh_database_url):
    ok_server, ok = _hook_server(204)
    bad_server, bad = _hook_server(500)
    try:
        dsn = fresh_database_url
        apis = []
        for server in (ok_server, bad_server):
            env = arus_env(database_url=dsn, ARUS_ALERT_WEBHOOK_URL=f"http://127.0.0.1:{server.server_port}/hook",
                           ARUS_ALERT_WEBHOOK_ATTEMPTS="3", ARUS_ALERT_WEBHOOK_BACKOFF_S="0.05")
            spawn_arus("api", env=env)
            base = f"http://127.0.0.1:{env['ARUS_HTTP_PORT']}"
            wait_until(lambda b=base: httpx.get(f"{b}/healthz", timeout=2).status_code == 200, 30)
            apis.append(base)
        # the stream is listening once a client got its "connected" comment
        for base in apis:
            r = SSEReader(f"{base}/v1/alerts/stream").start()
            r.wait_connected()
            r.close()
        alert_id = _uid()
        seq = insert_alert(dsn, alert_id, severity="critical")
        wait_until(lambda: ok.received, 10, message="webhook received the event")
        headers, body = ok.received[0]
        assert headers["x-arus-event-id"] == str(seq) and body["alert"]["id"] == alert_id
        assert body["event"]["transition"] == "opened"
        rows = wait_until(lambda: pg_fetch(dsn, "SELECT reason, message, raw, \"offset\" FROM dead_letters"
                                                " WHERE reason = 'webhook_failed'"), 15,
                          message="failed notification dead-lettered")
        assert len(bad.received) == 3  # every attempt was made
        reason, message, raw, offset = rows[0]
        assert offset == seq and "HTTP 500" in message and orjson.loads(raw)["alert"]["id"] == alert_id
    finally:
        ok_server.shutdown()
        bad_server.shutdown()


@pytest.mark.parametrize("connections_dropped", [False, True], ids=["steady", "after-server-dropped-connections"])
def test_stream_keeps_seq_order_when_writers_commit_out_of_order(api, connections_dropped):
    """The sink and an operator's command insert alert_events concurrently: a lower seq may commit
    after a higher one. The stream holds the higher one back while the lower is in flight, so
    clients see seq order and a Last-Event-ID never skips the late commit. The same holds after
    PostgreSQL dropped every connection of the api (its pooled ones are then broken until used:
    CI once saw the hold-back skipped because its in-flight check failed on one)."""
    import psycopg

    base, env, dsn = api()
    a, b = _uid(), _uid()
    insert_alert(dsn, a)
    insert_alert(dsn, b)
    reader = SSEReader(f"{base}/v1/alerts/stream").start()
    try:
        reader.wait_connected()
        if connections_dropped:
            listen = "SELECT array_agg(pid) FROM pg_stat_activity WHERE application_name = 'arus-api-listen'"
            wait_until(lambda: pg_scalar(dsn, listen), 10, message="the api listens")
            old_pids = set(pg_scalar(dsn, listen))
            pg_fetch(dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE datname = current_database() AND pid <> pg_backend_pid()")
            wait_until(lambda: (pg_scalar(dsn, listen) or [0])[0] not in old_pids, 10,
                       message="the api listens again")
        slow = psycopg.connect(dsn)
        try:
            low = slow.execute(
                "INSERT INTO alert_events (dedup, alert_id, time, transition, severity, state, actor)"
                " VALUES (%s, %s, now(), 'updated', 'warning', 'open', 'stream') RETURNING seq",
                (f"{a}:slow", a)).fetchone()[0]
            high = add_event(dsn, b, "escalated", severity="critical")  # commits first
            assert high > low
            deadline = time.monotonic() + 0.1
            while time.monotonic() < deadline:  # the slow writer is still in flight
                assert reader.seqs() == [], "a higher seq was sent while a lower one was in flight"
            slow.commit()
        finally:
            slow.close()
        wait_until(lambda: len(reader.events) == 2, 5, message="both events")
        assert reader.seqs() == [low, high]
    finally:
        reader.close()


def test_end_to_end_reading_to_stream_and_operator_command_back_to_the_stream(
        arus_env, spawn_arus, fresh_database_url, mqtt_url, tmp_path):
    """A real reading over MQTT opens an alert that arrives on the SSE stream; an operator's ack
    through the API reaches the stream processor (its next escalation says `acknowledged`); after
    an operator's resolve, the next trigger opens a new alert."""
    import psycopg

    from infra.devices import add_device
    from tests.helpers import publish_mqtt, wait_pipeline_ready

    gauge = f"wl-op-{uuid.uuid4().hex[:6]}"
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - id: river-op\n    kind: water_level\n    metric: waterLevel\n"
                     "    type: threshold\n    levels:\n"
                     "      - {severity: warning,  above: 2.0, clear_below: 1.8}\n"
                     "      - {severity: critical, above: 3.0, clear_below: 2.8}\n    for: 1\n")
    env = arus_env(database_url=fresh_database_url, ARUS_RULES_FILE=str(rules), ARUS_SSE_HEARTBEAT_S="1",
                   ARUS_GATEWAY_CLIENT_ID=f"gw-{gauge}", ARUS_WORKER_SESSION_TIMEOUT_MS="2000",
                   ARUS_CHECKPOINT_INTERVAL_MS="300")
    dsn = fresh_database_url
    with psycopg.connect(dsn, autocommit=True) as conn:
        add_device(conn, gauge, "water_level", "35.09.19.1001")
    for name in ("gateway", "worker", "sink", "api"):
        spawn_arus(name, env=env)
    base = f"http://127.0.0.1:{env['ARUS_HTTP_PORT']}"
    wait_until(lambda: httpx.get(f"{base}/healthz", timeout=2).status_code == 200, 30, message="api answers")
    wait_pipeline_ready(dsn, mqtt_url)
    token = add_operator(env, "bpbd.piket")
    reader = SSEReader(f"{base}/v1/alerts/stream", params={"rule": "river-op"}).start()

    def send(level: float) -> None:
        publish_mqtt(mqtt_url, [(f"jember/v1/{gauge}/telemetry",
                                 orjson.dumps({"ts": datetime.now(UTC).isoformat(), "values": {"waterLevel": level}}))])

    def events(transition: str) -> list[dict]:
        return [e.data for e in reader.events if e.event == transition and e.data]

    try:
        reader.wait_connected()
        send(2.4)
        opened = wait_until(lambda: events("opened"), 30, message="opened on the stream")[0]
        alert_id = opened["alert"]["id"]
        assert opened["alert"]["entity"] == gauge and opened["alert"]["severity"] == "warning"
        auth = {"Authorization": f"Bearer {token}"}
        r = httpx.post(f"{base}/v1/alerts/{alert_id}/ack", headers=auth, timeout=15)
        assert r.status_code == 200 and r.json()["command"] == "sent", r.text
        send(3.5)
        esc = wait_until(lambda: events("escalated"), 30, message="escalated on the stream")[0]
        assert esc["alert"]["id"] == alert_id and esc["event"]["severity"] == "critical"
        assert esc["event"]["state"] == "acknowledged", "the stream processor learned the operator's ack"
        assert esc["alert"]["acknowledged_by"] == "bpbd.piket"
        # the stream's own record of the command collapses into the API's row: one acknowledged event
        assert pg_scalar(dsn, "SELECT count(*) FROM alert_events WHERE alert_id = %s AND transition = 'acknowledged'",
                         [alert_id]) == 1
        assert httpx.post(f"{base}/v1/alerts/{alert_id}/resolve", headers=auth, timeout=15).status_code == 200
        # the command was on the gauge's ingest partition before this reading (same key, produced
        # before the API answered): the stream has it, and a new trigger opens a new alert
        send(3.6)
        fresh = wait_until(lambda: [o for o in events("opened") if o["alert"]["id"] != alert_id], 30,
                           message="a new alert opens after the operator's resolve")
        assert fresh[0]["alert"]["entity"] == gauge and fresh[0]["alert"]["severity"] == "critical"
        assert pg_scalar(dsn, "SELECT state FROM alerts WHERE id = %s", [alert_id]) == "resolved"
        assert pg_scalar(dsn, "SELECT count(*) FROM dead_letters WHERE raw LIKE %s", [f"%{alert_id}%"]) == 0
    finally:
        reader.close()


def test_api_stops_promptly_with_stream_clients_connected(arus_env, spawn_arus, fresh_database_url):
    env = arus_env(database_url=fresh_database_url, create_topics=False)
    api = spawn_arus("api", env=env)
    base = f"http://127.0.0.1:{env['ARUS_HTTP_PORT']}"
    wait_until(lambda: httpx.get(f"{base}/healthz", timeout=2).status_code == 200, 30, message="api answers")
    readers = [SSEReader(f"{base}/v1/alerts/stream").start() for _ in range(2)]
    try:
        for r in readers:
            r.wait_connected()
        t0 = time.monotonic()
        code = api.stop(timeout=15)
        took = time.monotonic() - t0
        assert took < 8, f"shutdown waited {took:.1f}s for SSE clients"
        assert code is not None and code in (0, -15), code
        print(f"stopped in {took:.2f}s, exit {code}")
    finally:
        for r in readers:
            r.close()
