"""Agency service events produced straight to jember.ingest with kafka-python (personal data in clear, as
an agency system would) -> worker -> sink -> service_events, service_entities, service_daily."""

from __future__ import annotations

import asyncio
import re
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from kafka import KafkaProducer

from infra.privacy import unseal
from schemas.service_events import synthetic_nik
from tests.helpers import pg_fetch, pg_scalar, wait_until

WIB = ZoneInfo("Asia/Jakarta")
PII_KEY = "integration-pii-key-" + uuid.uuid4().hex[:8]
NIK = synthetic_nik("35.09.19", 23, 4, 1979, 321)
NIK2 = synthetic_nik("35.09.01", 52, 11, 1990, 45)  # a woman (day + 40)
NAME, NAME2 = "Bambang Sutrisno Wijaya", "Dewi Kartika Sari"
PHONE, PHONE2 = "081331234567", "+62 812-5555-0199"
SECRETS = [NIK, NIK2, NAME, NAME2, PHONE, PHONE2, "6281331234567", "6281255550199"]

DOC = Path(__file__).resolve().parents[2] / "docs" / "queries-services.md"
# two of the worked queries of docs/queries-services.md, with the day range as parameters
DAILY_COUNTS = """
SELECT d.day, d.kecamatan, r.name AS kecamatan_name, d.type, d.measure, d.count
FROM service_daily d LEFT JOIN regions r ON r.code = d.kecamatan
WHERE d.measure LIKE 'status:%%' AND d.day BETWEEN %s AND %s
ORDER BY d.day, d.kecamatan, d.type, d.measure
"""
DAILY_DURATIONS = """
SELECT day, kecamatan, type, measure, count, round((sum / count)::numeric, 1) AS mean_s, min AS min_s, max AS max_s
FROM service_daily
WHERE measure NOT LIKE 'status:%%' AND measure <> 'events' AND count > 0 AND day BETWEEN %s AND %s
ORDER BY day, kecamatan, type, measure
"""


def _iso(t: datetime) -> str:
    return t.astimezone(WIB).isoformat()


def _event(type_: str, eid: str, t: datetime, region: str, data: dict[str, Any], source: str = "agency.kafka") -> dict:
    return {"specversion": "1.0", "id": eid, "source": source, "type": type_, "time": _iso(t), "region": region,
            "datacontenttype": "application/json", "data": data}


async def _read_topic(bootstrap: str, topic: str, partitions: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        values: list[bytes] = []
        deadline = asyncio.get_running_loop().time() + 30
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            assert asyncio.get_running_loop().time() < deadline, f"reading {topic} timed out"
            for records in (await consumer.getmany(timeout_ms=200)).values():
                values.extend(r.value for r in records)
        return values
    finally:
        await consumer.stop()


def read_topic(bootstrap: str, topic: str, partitions: int = 4) -> list[bytes]:
    return asyncio.run(_read_topic(bootstrap, topic, partitions))


@pytest.fixture
def services(arus_env, spawn_arus, fresh_database_url):
    env = arus_env(database_url=fresh_database_url, ARUS_PII_KEY=PII_KEY, ARUS_CHECKPOINT_INTERVAL_MS="300",
                   ARUS_WORKER_SESSION_TIMEOUT_MS="2000")
    procs = [spawn_arus(name, env=env) for name in ("worker", "sink")]
    yield env
    for p in procs:
        assert p.alive(), f"{p.name} died:\n{p.log_tail()}"


def test_service_events_straight_to_kafka_land_once_pseudonymised_with_durations(services, spawn_arus):
    env = services
    dsn, bootstrap, prefix = env["ARUS_DATABASE_URL"], env["ARUS_KAFKA_BOOTSTRAP"], env["ARUS_TOPIC_PREFIX"]
    ingest = prefix + "ingest"
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", retries=10, linger_ms=5)

    def send(events: list[dict[str, Any]]) -> None:
        for ev in events:
            data = ev["data"]
            key = next(str(v) for k, v in data.items() if k.endswith("_id"))
            producer.send(ingest, key=key.encode(), value=orjson.dumps(ev))
        producer.flush(timeout=30)

    # readiness: an event with an unknown region comes back as a dead letter (worker + sink are up)
    probe_ids: list[str] = []

    def probed() -> bool:
        pid = f"probe-{uuid.uuid4().hex[:6]}"
        probe_ids.append(pid)
        send([_event("jember.welfare.case.v1", pid, datetime.now(UTC) - timedelta(minutes=1), "35.09.77",
                     {"case_id": pid, "status": "registered", "pmks_category": "PMKS02",
                      "person": {"nik": NIK, "name": NAME, "phone": PHONE}})])
        return bool(pg_scalar(dsn, "SELECT count(*) FROM dead_letters WHERE reason = 'unknown_region'"))

    wait_until(probed, 120, interval=1.0, message="worker and sink answer a probe with a dead letter")

    # a WIB morning two days ago, so every step of a lifecycle is on the same WIB day
    today = datetime.now(WIB).date()
    t0 = datetime(today.year, today.month, today.day, 8, 0, tzinfo=WIB) - timedelta(days=2)
    day = t0.date()
    sfx = uuid.uuid4().hex[:6]
    cid, wid, did, rid, vid = f"ADU-{sfx}", f"KS-{sfx}", f"PSC-{sfx}", f"REQ-{sfx}", f"V-{sfx}"
    reporter = {"nik": NIK, "name": NAME, "phone": PHONE}
    person = {"nik": NIK2, "name": NAME2, "phone": PHONE2}
    complaint = "jember.complaint.v1"
    opened = _event(complaint, f"{cid}-1", t0, "35.09.19.1001",
                    {"complaint_id": cid, "status": "opened", "category": "jalan_rusak", "agency": "dpupr",
                     "channel": "wa", "reporter": reporter, "note": "jalan berlubang"})
    events = [
        # out of order: resolved first, then opened, then assigned
        _event(complaint, f"{cid}-3", t0 + timedelta(hours=2), "35.09.19.1001",
               {"complaint_id": cid, "status": "resolved", "agency": "dpupr"}),
        opened,
        _event(complaint, f"{cid}-2", t0 + timedelta(minutes=30), "35.09.19.1001",
               {"complaint_id": cid, "status": "assigned", "agency": "dpupr"}),
        opened,  # redelivery
        {**opened, "id": f"http-{cid}", "source": "arus.http/lapor"},  # the same step through another channel
        _event("jember.welfare.case.v1", f"{wid}-1", t0, "35.09.01",
               {"case_id": wid, "status": "registered", "pmks_category": "PMKS01", "person": person}),
        _event("jember.welfare.case.v1", f"{wid}-2", t0 + timedelta(hours=6), "35.09.01",
               {"case_id": wid, "status": "verified", "person": person}),
        _event("jember.emergency.dispatch.v1", f"{did}-1", t0 + timedelta(hours=1), "35.09.19",
               {"dispatch_id": did, "status": "dispatched", "unit": "AMB-03", "patient": {"name": NAME2}}),
        _event("jember.emergency.dispatch.v1", f"{did}-2", t0 + timedelta(hours=1, minutes=14), "35.09.19",
               {"dispatch_id": did, "status": "arrived", "unit": "AMB-03"}),
        _event("jember.adminduk.request.v1", f"{rid}-1", t0 + timedelta(hours=1), "35.09.01.2001",
               {"request_id": rid, "status": "submitted", "service": "KTP", "applicant": {"nik": NIK2}}),
        _event("jember.adminduk.request.v1", f"{rid}-2", t0 + timedelta(hours=3), "35.09.01.2001",
               {"request_id": rid, "status": "completed"}),
        _event("jember.health.visit.v1", f"{vid}-1", t0 + timedelta(hours=2), "35.09.19",
               {"visit_id": vid, "puskesmas": "Kaliwates", "service": "kia", "patient": person}),
    ]
    bad_nik = _event("jember.welfare.case.v1", f"bad-{sfx}", t0, "35.09.01",
                     {"case_id": f"bad-{sfx}", "status": "registered", "pmks_category": "PMKS01",
                      "person": {"nik": "350901" + "12", "name": NAME2}})
    # backfill: a complaint of 100 days ago (behind the worker's horizon: recounted by the sink)
    old = datetime(today.year, today.month, today.day, 10, 0, tzinfo=WIB) - timedelta(days=100)
    old_id = f"OLD-{sfx}"
    backfill = [
        _event(complaint, f"{old_id}-1", old, "35.09.19", {"complaint_id": old_id, "status": "opened",
                                                          "category": "sampah", "reporter": reporter}),
        _event(complaint, f"{old_id}-2", old + timedelta(minutes=45), "35.09.19",
               {"complaint_id": old_id, "status": "resolved"}),
    ]
    send(events + [bad_nik] + backfill + backfill[1:])  # the old resolution twice

    ids = [cid, wid, did, rid, vid, old_id]
    wait_until(lambda: pg_scalar(dsn, "SELECT count(*) FROM service_events WHERE entity_id = ANY(%s)", [ids]) == 12,
               60, message="12 distinct service events stored")
    wait_until(lambda: pg_scalar(dsn, "SELECT count(*) FROM dead_letters WHERE reason = 'invalid_nik'") == 1,
               30, message="the malformed NIK dead-lettered")

    # each complaint step once, whatever the channel or the order
    rows = pg_fetch(dsn, "SELECT status, source FROM service_events WHERE entity_id = %s ORDER BY time", [cid])
    assert [r[0] for r in rows] == ["opened", "assigned", "resolved"]

    def entities() -> dict[str, tuple]:
        return {r[0]: r[1:] for r in pg_fetch(
            dsn, "SELECT entity_id, status, kecamatan, category, opened_at, durations FROM service_entities"
                 " WHERE entity_id = ANY(%s)", [ids])}

    want = {
        cid: ("resolved", "35.09.19", "jember.complaint.v1", {"time_to_assign_s": 1800.0, "time_to_resolve_s": 7200.0}),
        wid: ("verified", "35.09.01", None, {"time_to_verify_s": 21600.0}),
        did: ("arrived", "35.09.19", None, {"response_time_s": 840.0}),
        rid: ("completed", "35.09.01", None, {"service_time_s": 7200.0}),
        old_id: ("resolved", "35.09.19", None, {"time_to_resolve_s": 2700.0}),
    }

    def entities_done() -> bool:
        got = entities()
        return all(k in got and got[k][0] == w[0] and got[k][4] == w[3] for k, w in want.items())

    wait_until(entities_done, 30, message=f"entities with durations {want}")
    got = entities()
    assert got[cid][1] == "35.09.19" and got[cid][2] == "jalan_rusak" and got[cid][3] == t0
    assert got[wid][2] == "PMKS01" and got[vid][0] == "visited"

    # per kecamatan per WIB day: counts and durations (the cells of the stream and of the backfill recount)
    def cells() -> dict[tuple, tuple]:
        return {(r[0], r[1], r[2], r[3]): r[4:] for r in pg_fetch(
            dsn, "SELECT day, kecamatan, type, measure, count, sum, min, max FROM service_daily"
                 " WHERE day IN (%s, %s)", [day, old.date()])}

    expected = {
        (day, "35.09.19", complaint, "status:opened"): (1, 0.0, None, None),
        (day, "35.09.19", complaint, "status:assigned"): (1, 0.0, None, None),
        (day, "35.09.19", complaint, "status:resolved"): (1, 0.0, None, None),
        (day, "35.09.19", complaint, "time_to_resolve_s"): (1, 7200.0, 7200.0, 7200.0),
        (day, "35.09.19", complaint, "time_to_assign_s"): (1, 1800.0, 1800.0, 1800.0),
        (day, "35.09.01", "jember.welfare.case.v1", "status:registered"): (1, 0.0, None, None),
        (day, "35.09.01", "jember.welfare.case.v1", "time_to_verify_s"): (1, 21600.0, 21600.0, 21600.0),
        (day, "35.09.19", "jember.emergency.dispatch.v1", "response_time_s"): (1, 840.0, 840.0, 840.0),
        (day, "35.09.01", "jember.adminduk.request.v1", "service_time_s"): (1, 7200.0, 7200.0, 7200.0),
        (day, "35.09.19", "jember.health.visit.v1", "status:visited"): (1, 0.0, None, None),
        (old.date(), "35.09.19", complaint, "status:opened"): (1, 0.0, None, None),
        (old.date(), "35.09.19", complaint, "status:resolved"): (1, 0.0, None, None),
        (old.date(), "35.09.19", complaint, "time_to_resolve_s"): (1, 2700.0, 2700.0, 2700.0),
    }
    wait_until(lambda: all(cells().get(k) == v for k, v in expected.items()), 30,
               message="daily cells per kecamatan")
    counts = pg_fetch(dsn, DAILY_COUNTS, [day, day])
    assert (day, "35.09.19", "Kaliwates", complaint, "status:opened", 1) in counts
    durations = pg_fetch(dsn, DAILY_DURATIONS, [day, day])
    assert any(r[1] == "35.09.19" and r[3] == "time_to_resolve_s" and float(r[5]) == 7200.0 for r in durations)

    # the unknown region: a dead letter with its reason, raw sealed, restorable with the key
    dl = pg_fetch(dsn, "SELECT message, raw FROM dead_letters WHERE reason = 'unknown_region' LIMIT 1")[0]
    assert "35.09.77" in dl[0]
    wrapper = orjson.loads(dl[1])
    assert wrapper["type"] == "jember.welfare.case.v1" and wrapper["id"] in probe_ids
    assert NIK.encode() in unseal(wrapper["sealed"], PII_KEY.encode())

    # no NIK, name or phone number in clear: not in the tables, not on the output topics
    stored = pg_scalar(dsn, "SELECT string_agg(data::text, ' ') FROM service_events")
    stored += pg_scalar(dsn, "SELECT string_agg(row_to_json(e)::text, ' ') FROM service_entities e")
    stored += pg_scalar(dsn, "SELECT string_agg(raw || ' ' || message, ' ') FROM dead_letters")
    assert "hmac:" in stored
    for secret in SECRETS:
        assert secret not in stored, "personal data in clear in the database"
    for suffix in ("service-events", "service-daily", "dlq"):
        text = b"\n".join(read_topic(bootstrap, prefix + suffix)).decode("utf-8", "replace")
        assert text, f"{suffix} is empty"
        for secret in SECRETS:
            assert secret not in text, f"personal data in clear on {suffix}"
    # one person links across events without being identifiable: the same hash for the same NIK
    hashes = pg_fetch(dsn, "SELECT DISTINCT data->'reporter'->>'nik' FROM service_events WHERE entity_id = ANY(%s)"
                           " AND data ? 'reporter'", [[cid, old_id]])
    assert len(hashes) == 1 and hashes[0][0].startswith("hmac:")
    # replay unseals the dead letter and sends the original bytes again: refused again (the region is
    # still unknown), as a new dead letter that is sealed too
    before = pg_scalar(dsn, "SELECT count(*) FROM dead_letters WHERE reason = 'unknown_region'")
    replay = spawn_arus("dlq", "replay", "--reason", "unknown_region", env=env, name="replay")
    assert replay.proc.wait(timeout=60) == 0, replay.log_tail()
    assert f"replayed {before} dead letter(s)" in replay.log()
    wait_until(lambda: pg_scalar(dsn, "SELECT count(*) FROM dead_letters WHERE reason = 'unknown_region'")
               == 2 * before, 30, message="the replayed events refused again")
    raws = [orjson.loads(r[0]) for r in pg_fetch(dsn, "SELECT raw FROM dead_letters WHERE reason = 'unknown_region'")]
    assert all("sealed" in r and NIK not in str(r) for r in raws)

    # every worked query of the documentation runs
    statements = [st.strip() for block in re.findall(r"```sql\n(.*?)```", DOC.read_text(), re.S)
                  for st in block.split(";") if st.strip()]
    assert len(statements) >= 9
    for st in statements:
        pg_fetch(dsn, st)
    per_person = pg_fetch(dsn, next(st for st in statements if "per hashed NIK" in st))
    assert per_person and all(r[0].startswith("hmac:") for r in per_person)
    producer.close(timeout=10)


def test_simulated_agencies_through_a_worker_crash_daily_cells_equal_sql_truth(arus_env, spawn_arus,
                                                                               fresh_database_url):
    """Simulated agency lifecycles; the worker is SIGKILLed mid-stream and restarted: every event lands
    once and the stream's daily cells equal what the stored rows say."""
    import random

    from producers.agency_simulator import events_for

    env = arus_env(database_url=fresh_database_url, ARUS_PII_KEY=PII_KEY, ARUS_CHECKPOINT_INTERVAL_MS="200",
                   ARUS_WORKER_SESSION_TIMEOUT_MS="2000")
    dsn, bootstrap, ingest = env["ARUS_DATABASE_URL"], env["ARUS_KAFKA_BOOTSTRAP"], env["ARUS_TOPIC_PREFIX"] + "ingest"
    spawn_arus("sink", env=env)
    worker = spawn_arus("worker", env=env, name="worker-a")
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    # a Monday of last week, 06:00 to 22:00 WIB: office hours, puskesmas mornings, evening complaints
    today = datetime.now(WIB).date()
    monday = datetime(today.year, today.month, today.day, 6, 0, tzinfo=WIB) - timedelta(days=today.weekday() + 7)
    start = int(monday.timestamp() * 1000)
    events = [e for e in events_for(start, start + 16 * 3_600_000, 3.0, random.Random(11), tag="crash")
              if e.time_ms <= now_ms]
    assert len(events) > 1500
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", retries=10, linger_ms=5)

    def send(batch: list) -> None:
        for e in batch:
            producer.send(ingest, key=e.key, value=orjson.dumps(e.envelope))
        producer.flush(timeout=60)

    half = len(events) // 2
    send(events[:half])
    stored = "SELECT count(*) FROM service_events"
    wait_until(lambda: pg_scalar(dsn, stored) >= half // 3, 120, message="the worker is folding the first half")
    worker.kill()
    send(events[half:] + events[half - 200:half])  # and some of the first half again (a producer retry)
    spawn_arus("worker", env=env, name="worker-b")
    wait_until(lambda: pg_scalar(dsn, stored) == len(events), 120, interval=0.5,
               message=f"all {len(events)} events stored once")

    truth_sql = """
        SELECT (time AT TIME ZONE 'Asia/Jakarta')::date, COALESCE(kecamatan, '35.09'), type,
               'status:' || status, count(*)
        FROM service_events GROUP BY 1, 2, 3, 4"""
    cells_sql = "SELECT day, kecamatan, type, measure, count FROM service_daily WHERE measure LIKE 'status:%%'"
    truth = set(pg_fetch(dsn, truth_sql))

    def cells_match() -> bool:
        return set(pg_fetch(dsn, cells_sql)) == truth

    try:
        wait_until(cells_match, 60, interval=0.5, message="daily status cells equal the stored rows")
    except AssertionError:
        cells = set(pg_fetch(dsn, cells_sql))
        raise AssertionError(f"only in the rows: {sorted(truth - cells)[:10]}\n"
                             f"only in the cells: {sorted(cells - truth)[:10]}") from None
    # each duration counted once: the cells add up to the entities' durations
    per_measure = dict(pg_fetch(dsn, "SELECT measure, sum(count) FROM service_daily"
                                     " WHERE measure NOT LIKE 'status:%%' GROUP BY measure"))
    entities = dict(pg_fetch(dsn, "SELECT k, count(*) FROM service_entities, jsonb_object_keys(durations) k"
                                  " GROUP BY k"))
    assert per_measure == entities and per_measure.get("response_time_s", 0) > 10
    producer.close(timeout=10)


def test_arus_simulate_produces_agency_events_straight_to_kafka(arus_env, spawn_arus, fresh_database_url):
    env = arus_env(database_url=fresh_database_url)
    sim = spawn_arus("simulate", "--rate", "0", "--duration", "4",
                     "--agency-rate", "3000", "--seed", "5", env=env)
    try:
        assert sim.proc.wait(timeout=90) == 0, sim.log_tail()
    except subprocess.TimeoutExpired:
        raise AssertionError(sim.log_tail()) from None
    assert "'agency_events':" in sim.log()
    events = [orjson.loads(v) for v in read_topic(env["ARUS_KAFKA_BOOTSTRAP"], env["ARUS_TOPIC_PREFIX"] + "ingest")]
    service = [e for e in events if e.get("type", "").startswith(("jember.complaint.", "jember.emergency."))]
    assert service, "no agency events on the ingest topic"
    # straight from the agency: personal data in clear (the worker pseudonymises it)
    assert any(len(str(p.get("nik", ""))) == 16 for e in service
               for p in (e["data"].get("reporter"), e["data"].get("patient")) if isinstance(p, dict))
