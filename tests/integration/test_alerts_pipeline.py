"""Alerts end to end: an outside MQTT client -> gateway -> worker (rules from ARUS_RULES_FILE) -> jember.alerts ->
sink -> alerts / alert_events; a silent gauge; an operator's command through jember.ingest; the sink's upsert
rules against PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import orjson
import psycopg
import pytest
from kafka import KafkaProducer

from consumers.alert_rows import convert
from infra.devices import add_device
from schemas.alerts import COMMAND_TYPE, command_dedup, command_key
from tests.helpers import pg_fetch, pg_scalar, publish_mqtt, wait_pipeline_ready, wait_until

RULES = """
rules:
  - id: river
    kind: water_level
    metric: waterLevel
    type: threshold
    levels:
      - {severity: warning,  above: 2.0, clear_below: 1.8}
      - {severity: critical, above: 3.0, clear_below: 2.8}
    for: 2
  - {id: silent, device: DEVICE, type: absence, after: 8s, severity: major}
  - {id: smoke, metric: pm25, type: aggregate, agg: mean, over: 10m, region: 35.09.20, severity: major,
     above: 100, clear_below: 80}
  - {id: complaint-sla, event: jember.complaint.v1, type: sla, start: opened, end: resolved, within: 6s,
     severity: warning}
"""

FLOOD = [1.0, 1.5, 1.9, 2.05, 1.95, 2.1, 2.15, 2.3, 2.6, 2.9, 3.05, 2.95, 3.1, 3.2, 3.4, 3.1, 2.9,
         2.85, 2.9, 2.7, 2.5, 2.2, 1.95, 2.05, 1.85, 2.1, 1.9, 1.82, 1.7, 1.5, 1.2]


@pytest.fixture
def pipeline(arus_env, spawn_arus, fresh_database_url, mqtt_url, tmp_path):
    suffix = uuid.uuid4().hex[:6]
    gauges = [f"wl-a-{suffix}", f"wl-b-{suffix}"]
    quiet = f"wl-q-{suffix}"
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace("DEVICE", quiet))
    env = arus_env(database_url=fresh_database_url, ARUS_GATEWAY_CLIENT_ID=f"gw-{suffix}",
                   ARUS_WORKER_SESSION_TIMEOUT_MS="2000", ARUS_CHECKPOINT_INTERVAL_MS="300",
                   ARUS_RULES_FILE=str(rules))
    with psycopg.connect(env["ARUS_DATABASE_URL"], autocommit=True) as conn:
        for d in [*gauges, quiet]:
            add_device(conn, d, "water_level", "35.09.19.1001")  # Kaliwates
    procs = {name: spawn_arus(name, env=env) for name in ("gateway", "worker", "sink")}
    wait_pipeline_ready(env["ARUS_DATABASE_URL"], mqtt_url)
    yield env, gauges, quiet, procs
    for p in procs.values():
        assert p.alive(), f"{p.name} died:\n{p.log_tail()}"


def reading(device: str, t: datetime, level: float) -> tuple[str, bytes]:
    return f"jember/v1/{device}/telemetry", orjson.dumps({"ts": t.isoformat(), "values": {"waterLevel": level}})


def test_noisy_flood_one_alert_per_gauge_escalated_and_resolved(pipeline, mqtt_url):
    env, gauges, _, _ = pipeline
    dsn = env["ARUS_DATABASE_URL"]
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=120)
    messages = []
    for i, level in enumerate(FLOOD):
        for k, g in enumerate(gauges):
            messages.append(reading(g, start + timedelta(seconds=2 * i + k), level - 0.2 * k))
    publish_mqtt(mqtt_url, messages)
    publish_mqtt(mqtt_url, messages[:20])  # a client retrying part of it: duplicates change nothing

    def rows():
        return pg_fetch(dsn, "SELECT entity, id, severity, state, resolved_by, version FROM alerts"
                             " WHERE rule_id = 'river' ORDER BY entity")

    def settled():
        r = rows()
        return r if len(r) == 2 and all(x[3] == "resolved" for x in r) else None

    final = wait_until(settled, 90, message="both gauges' alerts resolved")
    assert [x[0] for x in final] == sorted(gauges)  # exactly one alert per gauge
    a, b = final
    assert a[1].startswith(f"river:{gauges[0]}:") and a[2] == "warning" and a[4] == "stream" and a[5] == 4
    events = pg_fetch(dsn, "SELECT transition, severity, state, actor, dedup FROM alert_events WHERE alert_id = %s"
                           " ORDER BY seq", [a[1]])
    assert [(e[0], e[1], e[2]) for e in events] == [
        ("opened", "warning", "open"), ("escalated", "critical", "open"),
        ("deescalated", "warning", "open"), ("resolved", "warning", "resolved")]
    assert all(e[3] == "stream" for e in events) and [e[4] for e in events] == [f"{a[1]}:{v}" for v in (1, 2, 3, 4)]
    # the second gauge, 0.2 m lower, never held 3.0 for two readings
    assert [e[0] for e in pg_fetch(dsn, "SELECT transition FROM alert_events WHERE alert_id = %s ORDER BY seq",
                                   [b[1]])] == ["opened", "resolved"]
    opened_at = pg_scalar(dsn, "SELECT opened_at FROM alerts WHERE id = %s", [a[1]])
    assert opened_at == start + timedelta(seconds=2 * 6)  # the second reading above 2.0 (for: 2)
    assert pg_scalar(dsn, "SELECT count(*) FROM alerts") == 2


def test_silent_gauge_opens_an_absence_alert_acknowledged_then_resolved(pipeline, mqtt_url, kafka_bootstrap):
    env, _, quiet, _ = pipeline
    dsn = env["ARUS_DATABASE_URL"]
    now = datetime.now(UTC).replace(microsecond=0)
    publish_mqtt(mqtt_url, [reading(quiet, now - timedelta(seconds=2), 1.0)])

    def absence():
        return pg_fetch(dsn, "SELECT id, state, severity, entity, opened_at FROM alerts WHERE rule_id = 'silent'")

    (row,) = wait_until(absence, 60, message="an absence alert for the silent gauge")
    alert_id, state, severity, entity, opened_at = row
    assert (state, severity, entity) == ("open", "major", quiet)
    assert opened_at == now - timedelta(seconds=2) + timedelta(seconds=8)

    # an operator acknowledges (as the API does: a command envelope on jember.ingest keyed by the entity)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    command = {"specversion": "1.0", "id": "cmd-1", "source": "/arus/api", "type": COMMAND_TYPE,
               "time": datetime.now(UTC).isoformat(), "subject": entity,
               "data": {"action": "ack", "actor": "budi", "alert_id": alert_id, "rule_id": "silent",
                        "entity": entity, "command_id": "cmd-1"}}
    producer.send(env["ARUS_TOPIC_PREFIX"] + "ingest", orjson.dumps(command), key=command_key(entity).encode())
    producer.flush(10)
    producer.close()
    wait_until(lambda: pg_fetch(dsn, "SELECT state, acknowledged_by FROM alerts WHERE id = %s", [alert_id])
               == [("acknowledged", "budi")], 60, message="the stream applied the acknowledgement")

    publish_mqtt(mqtt_url, [reading(quiet, datetime.now(UTC).replace(microsecond=0), 1.1)])  # back
    wait_until(lambda: pg_scalar(dsn, "SELECT state FROM alerts WHERE id = %s", [alert_id]) == "resolved", 60,
               message="the gauge's return resolves the alert")
    events = pg_fetch(dsn, "SELECT transition, actor, dedup FROM alert_events WHERE alert_id = %s ORDER BY seq",
                      [alert_id])
    assert [(e[0], e[1]) for e in events] == [("opened", "stream"), ("acknowledged", "budi"), ("resolved", "stream")]
    assert events[1][2] == command_dedup(alert_id, "cmd-1")
    assert pg_scalar(dsn, "SELECT acknowledged_by FROM alerts WHERE id = %s", [alert_id]) == "budi"
    assert pg_scalar(dsn, "SELECT count(*) FROM alerts WHERE rule_id = 'silent'") == 1


def test_kecamatan_mean_pm25_opens_one_kecamatan_alert(pipeline, mqtt_url):
    env, _, _, _ = pipeline
    dsn = env["ARUS_DATABASE_URL"]
    suffix = uuid.uuid4().hex[:6]
    stations = [f"aq-{i}-{suffix}" for i in range(3)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i, s in enumerate(stations):  # two in Patrang (35.09.20), one in Kaliwates
            add_device(conn, s, "air_quality", "35.09.20.1001" if i < 2 else "35.09.19.1002")
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=200)
    messages = [(f"jember/v1/{s}/telemetry",
                 orjson.dumps({"ts": (start + timedelta(seconds=10 * k + i)).isoformat(), "values": {"pm25": v}}))
                for k in range(12) for i, (s, v) in enumerate(zip(stations, (90.0 + 5 * k, 120.0, 300.0), strict=True))]
    publish_mqtt(mqtt_url, messages)

    def smoke():
        return pg_fetch(dsn, "SELECT entity, kecamatan, metric, kind, severity, state FROM alerts WHERE rule_id = 'smoke'")

    rows = wait_until(smoke, 60, message="the kecamatan's mean PM2.5 opens an alert")
    # Patrang's mean is over 100; Kaliwates (one 300 station) is outside the rule's region
    assert rows == [("35.09.20", "35.09.20", "pm25", None, "major", "open")]


def test_complaint_sla_from_service_events(pipeline, kafka_bootstrap):
    env, _, _, _ = pipeline
    dsn = env["ARUS_DATABASE_URL"]
    suffix = uuid.uuid4().hex[:6]
    late, quick = f"P-late-{suffix}", f"P-quick-{suffix}"
    now = datetime.now(UTC)

    def complaint(cid: str, status: str, t: datetime) -> dict:
        data = {"complaint_id": cid, "status": status, "category": "jalan_rusak", "agency": "dpupr"}
        return {"specversion": "1.0", "id": f"{cid}/{status}", "source": "agency.kafka", "type": "jember.complaint.v1",
                "time": t.isoformat(), "region": "35.09.19", "datacontenttype": "application/json", "data": data}

    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    topic = env["ARUS_TOPIC_PREFIX"] + "ingest"
    for cid, status, t in [(late, "opened", now), (quick, "opened", now), (quick, "resolved", now + timedelta(seconds=2))]:
        producer.send(topic, orjson.dumps(complaint(cid, status, t)), key=cid.encode())
    producer.flush(10)

    def sla_rows():
        return pg_fetch(dsn, "SELECT entity, id, state, opened_at, kecamatan FROM alerts WHERE rule_id = 'complaint-sla'")

    (row,) = wait_until(sla_rows, 60, message="the unresolved complaint breaches its SLA")
    assert row[0] == late and row[2] == "open" and row[4] == "35.09.19"
    assert row[3] == now.replace(microsecond=now.microsecond // 1000 * 1000) + timedelta(seconds=6)
    producer.send(topic, orjson.dumps(complaint(late, "resolved", now + timedelta(seconds=30))), key=late.encode())
    producer.flush(10)
    producer.close()
    wait_until(lambda: pg_scalar(dsn, "SELECT state FROM alerts WHERE id = %s", [row[1]]) == "resolved", 60,
               message="resolving the complaint resolves its SLA alert")
    assert [e[0] for e in pg_fetch(dsn, "SELECT transition FROM alert_events WHERE alert_id = %s ORDER BY seq",
                                   [row[1]])] == ["opened", "resolved"]
    assert len(sla_rows()) == 1  # the quick complaint never breached


def test_worker_killed_mid_flood_resumes_the_same_alert(pipeline, mqtt_url, spawn_arus):
    env, gauges, _, procs = pipeline
    dsn = env["ARUS_DATABASE_URL"]
    gauge = gauges[0]
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=120)
    flood = [reading(gauge, start + timedelta(seconds=2 * i), level) for i, level in enumerate(FLOOD)]
    publish_mqtt(mqtt_url, flood[:15])  # up to critical (3.4 at index 14)

    def row():
        return pg_fetch(dsn, "SELECT id, severity, state, version FROM alerts WHERE rule_id = 'river' AND entity = %s",
                        [gauge])

    wait_until(lambda: row() and row()[0][1] == "critical", 60, message="the alert escalated to critical")
    procs["worker"].kill()  # SIGKILL: whatever was not checkpointed is replayed by the next worker
    publish_mqtt(mqtt_url, flood[15:])
    procs["worker"] = spawn_arus("worker", env=env, name="worker-2")
    wait_until(lambda: row() and row()[0][2] == "resolved", 90, message="the restarted worker resolves the alert")
    ((alert_id, severity, state, version),) = row()
    assert (severity, state, version) == ("warning", "resolved", 4)
    events = pg_fetch(dsn, "SELECT transition FROM alert_events WHERE alert_id = %s ORDER BY seq", [alert_id])
    assert [e[0] for e in events] == ["opened", "escalated", "deescalated", "resolved"]
    assert pg_scalar(dsn, "SELECT count(*) FROM alert_events e JOIN alerts a ON a.id = e.alert_id"
                          " WHERE a.entity = %s", [gauge]) == 4


def _message(version: int, transition: str, state: str, severity: str = "warning", **alert: object) -> dict:
    base = {"id": "r:g:1000", "rule_id": "r", "entity": "g", "kind": "water_level", "region_code": "35.09.19.1001",
            "kecamatan": "35.09.19", "metric": "waterLevel", "severity": severity, "state": state, "value": 2.5,
            "message": "", "opened_at": 1000, "updated_at": 1000 + version, "acknowledged_at": None,
            "acknowledged_by": None, "resolved_at": None, "resolved_by": None, "trigger_event": None,
            "version": version, **alert}
    return {"alert": base, "event": {"dedup": f"r:g:1000:{version}", "transition": transition, "time": 1000 + version,
                                     "severity": severity, "state": state, "actor": "stream", "value": 2.5,
                                     "note": None}}


def test_sink_upserts_order_by_version_and_never_undo_an_operator(fresh_database_url):
    dsn = fresh_database_url

    def write(msg: dict) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction(), conn.cursor() as cur:
            for stmt, params in convert(msg):
                cur.execute(stmt, params)

    def row():
        return pg_fetch(dsn, "SELECT severity, state, version, acknowledged_by, resolved_by FROM alerts")[0]

    write(_message(1, "opened", "open"))
    write(_message(1, "opened", "open"))  # redelivered
    assert row() == ("warning", "open", 1, None, None)
    # an operator acknowledges through the API (direct write, version unchanged)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE alerts SET state = 'acknowledged', acknowledged_by = 'budi', acknowledged_at = now()")
    write(_message(2, "escalated", "open", "critical"))  # the stream did not know yet
    assert row() == ("critical", "acknowledged", 2, "budi", None)
    write(_message(1, "opened", "open"))  # an overtaken old message
    assert row() == ("critical", "acknowledged", 2, "budi", None)
    write(_message(3, "resolved", "resolved", "critical", resolved_at=1003, resolved_by="stream"))
    assert row() == ("critical", "resolved", 3, "budi", "stream")
    write(_message(4, "escalated", "open", "critical"))  # a late stream view may not re-open it
    assert row()[1] == "resolved"
    write(_message(5, "reopened", "open", "critical"))  # only an explicit re-open does
    assert row() == ("critical", "open", 5, None, None)
    assert pg_scalar(dsn, "SELECT count(*) FROM alert_events") == 5  # one per distinct dedup
