"""Agency ingest from outside: `arus agencies add`, `POST /v1/events` on a real `arus api` process,
`arus import-csv` of a 10,000-row spreadsheet export, CloudEvents produced straight to Kafka with
kafka-python; what lands on jember.ingest / jember.dlq and, with worker and sink, in PostgreSQL."""

from __future__ import annotations

import asyncio
import csv
import json
import random
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from infra.privacy import keyed_hash, unseal
from schemas.service_events import synthetic_nik
from tests.helpers import pg_fetch, pg_scalar, wait_until

ROOT = Path(__file__).resolve().parents[2]
WIB = ZoneInfo("Asia/Jakarta")
PII_KEY = "integration-pii-key"
NIK = synthetic_nik("35.09.19", 17, 8, 1985, 7)
NAME = "Siti Aminah Rahayu"
PHONE = "081234567890"


def arus(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "arus.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def add_agency(env: dict[str, str], name: str) -> str:
    done = arus(env, "agencies", "add", name, timeout=60)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip().splitlines()[-1]
    assert key.startswith("arus_ak_") and len(key) > 40
    return key


async def consume(bootstrap: str, topic: str, until: Any, timeout: float = 60) -> list[Any]:
    """All records of `topic` from the beginning, until `until(records)` holds (or the deadline)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    records: list[Any] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while not until(records) and loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            for msgs in batch.values():
                records.extend(msgs)
    finally:
        await consumer.stop()
    return records


def event(type_: str, entity: str, data: dict[str, Any], when: datetime, region: str = "35.09.19.1001",
          eid: str | None = None, source: str = "sistem-dinsos") -> dict[str, Any]:
    return {"specversion": "1.0", "id": eid or f"ev-{uuid.uuid4().hex[:12]}", "source": source, "type": type_,
            "time": when.astimezone(WIB).isoformat(), "region": region, "datacontenttype": "application/json",
            "data": data}


def welfare(entity: str, when: datetime, **over: Any) -> dict[str, Any]:
    data = {"case_id": entity, "status": "registered", "pmks_category": "PMKS02",
            "person": {"nik": NIK, "name": NAME, "phone": PHONE}}
    data.update(over.pop("data", {}))
    return event("jember.welfare.case.v1", entity, data, when, **over)


@pytest.fixture
def api(arus_env, spawn_arus):
    env = arus_env(ARUS_PII_KEY=PII_KEY)
    proc = spawn_arus("api", env=env)
    base = f"http://127.0.0.1:{env['ARUS_HTTP_PORT']}"
    wait_until(lambda: httpx.get(f"{base}/healthz", timeout=2).status_code == 200, 60, message="api answers")
    yield env, base, proc
    assert proc.alive(), proc.log_tail()
    assert NIK not in proc.log() and NAME not in proc.log()


def test_post_events_auth_per_item_results_and_pseudonymised_on_kafka(api):
    env, base, _ = api
    key = add_agency(env, f"dinsos-{uuid.uuid4().hex[:6]}")
    when = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    good = welfare("K-100", when)

    # no key, a wrong key -> 401 and nothing produced
    assert httpx.post(f"{base}/v1/events", json=good, timeout=30).status_code == 401
    r = httpx.post(f"{base}/v1/events", json=good, headers={"Authorization": "Bearer arus_ak_nope"}, timeout=30)
    assert r.status_code == 401 and r.json()["reason"] == "unauthorized"

    auth = {"Authorization": f"Bearer {key}"}
    bad_nik = welfare("K-102", when, data={"person": {"nik": "3509991708850007", "name": NAME}})
    items = [
        good,
        welfare("K-101", when, region="35.09.99"),  # unknown region
        bad_nik,
        welfare("K-103", when, data={"pmks_category": "PMKS42"}),
        {"specversion": "1.0", "id": "x"},
        event("jember.complaint.v1", "P-1", {"complaint_id": "P-1", "status": "opened", "category": "jalan",
                                             "agency": "DPUBMSDA", "channel": "web",
                                             "reporter": {"name": NAME, "phone": PHONE}}, when),
    ]
    r = httpx.post(f"{base}/v1/events", json=items, headers=auth, timeout=60)
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["accepted"], body["rejected"]) == (2, 4)
    assert [(x["index"], x["status"], x["reason"]) for x in body["results"]] == [
        (0, "accepted", None), (1, "rejected", "unknown_region"), (2, "rejected", "invalid_nik"),
        (3, "rejected", "invalid_pmks_category"), (4, "rejected", "invalid_envelope"), (5, "accepted", None)]
    assert body["results"][0]["id"] == good["id"]
    assert NIK not in r.text and "3509991708850007" not in r.text

    # NDJSON, one more accepted
    nd = orjson.dumps(welfare("K-104", when)) + b"\n" + b"{broken" + b"\n"
    r = httpx.post(f"{base}/v1/events", content=nd, headers={**auth, "Content-Type": "application/x-ndjson"},
                   timeout=60)
    assert [x["status"] for x in r.json()["results"]] == ["accepted", "rejected"]

    bootstrap = env["ARUS_KAFKA_BOOTSTRAP"]
    ingest = asyncio.run(consume(bootstrap, env["ARUS_TOPIC_PREFIX"] + "ingest", lambda rs: len(rs) >= 3))
    assert sorted(m.key for m in ingest) == [b"K-100", b"K-104", b"P-1"]
    for m in ingest:
        text = m.value.decode()
        assert NIK not in text and NAME not in text and "1234567890" not in text
    by_key = {m.key: orjson.loads(m.value) for m in ingest}
    assert by_key[b"K-100"]["data"]["person"]["nik"] == keyed_hash("nik", NIK, PII_KEY.encode())
    assert by_key[b"K-100"]["data"]["person"]["name"] == keyed_hash("name", NAME, PII_KEY.encode())
    assert by_key[b"K-100"]["id"] == good["id"] and by_key[b"K-100"]["arusagency"].startswith("dinsos-")
    # the same person links across types: the complaint reporter's phone is the case person's phone
    assert by_key[b"P-1"]["data"]["reporter"]["phone"] == by_key[b"K-100"]["data"]["person"]["phone"]

    dlq = asyncio.run(consume(bootstrap, env["ARUS_TOPIC_PREFIX"] + "dlq", lambda rs: len(rs) >= 5))
    dead = [orjson.loads(m.value) for m in dlq]
    assert sorted(d["reason"] for d in dead) == sorted(
        ["unknown_region", "invalid_nik", "invalid_pmks_category", "invalid_envelope", "malformed_json"])
    for m in dlq:
        assert NIK not in m.value.decode() and "3509991708850007" not in m.value.decode()
        assert NAME not in m.value.decode()
    nik_dead = next(d for d in dead if d["reason"] == "invalid_nik")
    wrapper = json.loads(nik_dead["raw"])
    assert orjson.loads(unseal(wrapper["sealed"], PII_KEY.encode())) == bad_nik  # replay can restore it

    # a revoked key stops working (the API caches keys for at most 5 s)
    name = by_key[b"K-100"]["arusagency"]
    assert arus(env, "agencies", "revoke", name, timeout=60).returncode == 0
    listed = arus(env, "agencies", "list", timeout=60).stdout
    assert name in listed and "revoked" in listed and key not in listed
    wait_until(lambda: httpx.post(f"{base}/v1/events", json=good, headers=auth, timeout=30).status_code == 401,
               20, message="revoked key refused")


def _csv_rows(n: int, when: datetime) -> tuple[list[list[str]], dict[int, str]]:
    """n complaint rows (header first) and the expected reject reasons by line number."""
    rng = random.Random(4)
    kec = [f"35.09.{i:02d}" for i in range(1, 32)]
    rows = [["No Pengaduan", "Status", "Kategori", "Kanal", "Tanggal", "Kecamatan", "Nama Pelapor", "No HP"]]
    bad: dict[int, str] = {}
    for i in range(n):
        line = i + 2
        t = (when - timedelta(minutes=i)).astimezone(WIB).strftime("%Y-%m-%d %H:%M") + " WIB"
        row = [f"ADU-{i:05d}", "opened", rng.choice(["jalan", "sampah", "air", "listrik"]),
               rng.choice(["web", "wa", "telepon"]), t, rng.choice(kec), f"Warga {i}", f"08{1000000000 + i}"]
        if i % 997 == 5:
            row[5], bad[line] = "35.09.77", "unknown_region"
        elif i % 1499 == 7:
            row[4], bad[line] = "kemarin sore", "invalid_timestamp"
        elif i % 1999 == 9:
            row[1], bad[line] = "closed", "invalid_status"
        elif i % 2503 == 11:
            row, bad[line] = row[:3], "invalid_payload"
        rows.append(row)
    return rows, bad


def test_import_csv_10000_rows_reject_report_and_idempotent(arus_env, tmp_path):
    env = arus_env(ARUS_PII_KEY=PII_KEY)
    when = datetime.now(UTC) - timedelta(hours=1)
    rows, bad = _csv_rows(10_000, when)
    path = tmp_path / "pengaduan.csv"
    with path.open("w", encoding="utf-8-sig", newline="") as f:  # spreadsheet export: BOM, semicolons
        csv.writer(f, delimiter=";").writerows(rows)
    report = tmp_path / "rejects.csv"

    done = arus(env, "import-csv", str(path), "--type", "jember.complaint.v1", "--map", "No Pengaduan=complaint_id",
                "--reject-report", str(report), "--agency", "lapor")
    assert done.returncode == 1, done.stdout + done.stderr  # some rows rejected, the rest imported
    accepted = 10_000 - len(bad)
    assert "10000 rows" in done.stdout and f"{accepted} accepted" in done.stdout
    assert f"{len(bad)} rejected" in done.stdout
    assert "rows (100%)" in done.stderr  # plain-text progress when not a terminal
    with report.open(encoding="utf-8") as f:
        got = {int(r["line"]): r["reason"] for r in csv.DictReader(f)}
    assert got == bad
    assert "Warga" not in report.read_text(encoding="utf-8")  # personal columns masked

    topic = env["ARUS_TOPIC_PREFIX"] + "ingest"
    recs = asyncio.run(consume(env["ARUS_KAFKA_BOOTSTRAP"], topic, lambda rs: len(rs) >= accepted, 120))
    assert len(recs) == accepted
    values = [orjson.loads(r.value) for r in recs]
    assert len({v["id"] for v in values}) == accepted
    sample = values[0]
    assert sample["data"]["reporter"]["name"].startswith("hmac:") and sample["aruschannel"] == "csv"
    assert not any("Warga" in r.value.decode() for r in recs)

    # the same file again: the same event ids (the sink and the worker de-duplicate them)
    again = arus(env, "import-csv", str(path), "--type", "jember.complaint.v1", "--map",
                 "No Pengaduan=complaint_id", "--reject-report", str(report), "--no-progress")
    assert again.returncode == 1
    recs2 = asyncio.run(consume(env["ARUS_KAFKA_BOOTSTRAP"], topic, lambda rs: len(rs) >= 2 * accepted, 120))
    assert len(recs2) == 2 * accepted
    assert {orjson.loads(r.value)["id"] for r in recs2} == {v["id"] for v in values}


def test_same_complaint_over_http_csv_and_kafka_lands_once(arus_env, spawn_arus, fresh_database_url, tmp_path):
    env = arus_env(database_url=fresh_database_url, ARUS_PII_KEY=PII_KEY, ARUS_WORKER_SESSION_TIMEOUT_MS="2000",
                   ARUS_CHECKPOINT_INTERVAL_MS="300")
    dsn = env["ARUS_DATABASE_URL"]
    procs = [spawn_arus(name, env=env) for name in ("worker", "sink", "api")]
    base = f"http://127.0.0.1:{env['ARUS_HTTP_PORT']}"
    wait_until(lambda: httpx.get(f"{base}/healthz", timeout=2).status_code == 200, 60, message="api answers")
    key = add_agency(env, "pengaduan")
    auth = {"Authorization": f"Bearer {key}"}
    opened = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=8)
    entity = f"ADU-{uuid.uuid4().hex[:6]}"
    complaint = {"complaint_id": entity, "status": "opened", "category": "jalan", "agency": "DPUBMSDA",
                 "channel": "web", "reporter": {"nik": NIK, "name": NAME, "phone": PHONE}}

    # 1. HTTP
    r = httpx.post(f"{base}/v1/events", headers=auth, timeout=60,
                   json=event("jember.complaint.v1", entity, complaint, opened, region="35.09.19", eid="http-1"))
    assert r.json()["accepted"] == 1, r.text
    wait_until(lambda: pg_scalar(dsn, "SELECT count(*) FROM service_events WHERE entity_id = %s", [entity]) == 1,
               120, message="the HTTP event lands in service_events")

    # 2. CSV (another id: the deterministic csv-... id), same type/entity/status/time
    path = tmp_path / "adu.csv"
    path.write_text("complaint_id,status,kategori,kanal,tanggal,kecamatan,nik,nama,no_hp\n"
                    f"{entity},opened,jalan,web,{opened.astimezone(WIB):%Y-%m-%d %H:%M} WIB,Kaliwates,"
                    f"{NIK},{NAME},{PHONE}\n", encoding="utf-8")
    done = arus(env, "import-csv", str(path), "--type", "jember.complaint.v1")
    assert done.returncode == 0, done.stdout + done.stderr

    # 3. straight to Kafka with kafka-python, personal fields in clear (the worker hashes them), + a
    #    later lifecycle step and an event of an unknown region
    from kafka import KafkaProducer

    kafka = KafkaProducer(bootstrap_servers=env["ARUS_KAFKA_BOOTSTRAP"], acks="all")
    topic = env["ARUS_TOPIC_PREFIX"] + "ingest"

    class producer:  # noqa: N801 - JSON values and str keys, as in docs/agencies.md
        @staticmethod
        def send(topic: str, key: str, value: dict[str, Any]) -> None:
            kafka.send(topic, key=key.encode(), value=json.dumps(value).encode())

    producer.send(topic, key=entity, value=event("jember.complaint.v1", entity, complaint, opened,
                                                 region="35.09.19", eid="kafka-1", source="lapor-kafka"))
    resolved = {"complaint_id": entity, "status": "resolved"}
    producer.send(topic, key=entity, value=event("jember.complaint.v1", entity, resolved,
                                                 opened + timedelta(hours=5), region="35.09.19", eid="kafka-2"))
    producer.send(topic, key="X-1", value=event("jember.complaint.v1", "X-1",
                                                {**complaint, "complaint_id": "X-1"}, opened, region="35.09.98"))
    kafka.flush(30)
    kafka.close()

    wait_until(lambda: pg_scalar(dsn, "SELECT count(*) FROM service_events WHERE entity_id = %s", [entity]) == 2,
               120, message="the resolved event lands")
    wait_until(lambda: pg_scalar(dsn, "SELECT count(*) FROM dead_letters WHERE reason = 'unknown_region'") >= 1,
               60, message="the unknown region is dead-lettered with its reason")
    wait_until(lambda: pg_scalar(dsn, "SELECT count(*) FROM dead_letters WHERE reason = 'duplicate'") >= 2, 60,
               message="the CSV and Kafka copies are recognised as duplicates")
    rows = pg_fetch(dsn, "SELECT status, source, event_id FROM service_events WHERE entity_id = %s ORDER BY time",
                    [entity])
    assert [(s, e) for s, _, e in rows] == [("opened", "http-1"), ("resolved", "kafka-2")]
    durations = pg_scalar(dsn, "SELECT durations FROM service_entities WHERE entity_id = %s", [entity])
    assert durations.get("time_to_resolve_s") == 5 * 3600
    wait_until(lambda: pg_scalar(
        dsn, "SELECT count FROM service_daily WHERE kecamatan = '35.09.19' AND type = 'jember.complaint.v1'"
             " AND measure = 'status:opened'") == 1, 60, message="per-kecamatan daily count")

    # no NIK, name or phone number in clear anywhere in the database or the logs
    for table in ("service_events", "service_entities", "service_daily", "dead_letters"):
        dump = "\n".join(str(r) for r in pg_fetch(dsn, f"SELECT t::text FROM {table} t"))
        for clear in (NIK, NAME, PHONE, PHONE[1:]):
            assert clear not in dump, f"{clear!r} in clear in {table}"
    for p in procs:
        assert p.alive(), p.log_tail()
        assert NIK not in p.log() and NAME not in p.log()
