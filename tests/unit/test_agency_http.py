"""POST /v1/events logic with Kafka and the key store replaced by fakes (no services)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
from fastapi import FastAPI

from infra.privacy import keyed_hash, unseal
from infra.settings import Settings
from producers import agency_http
from schemas.service_events import synthetic_nik

NIK = synthetic_nik("35.09.19", 17, 8, 1985, 7)
KEY = "arus_ak_test"
PII = b"unit-pii-key"


class FakePublisher:
    def __init__(self, fail: bool = False) -> None:
        self.ingest: list[tuple[bytes, bytes]] = []
        self.dead: list[dict[str, Any]] = []
        self.fail = fail

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def publish(self, ingest: list[tuple[bytes, bytes]], dead: list[dict[str, Any]]) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.ingest += ingest
        self.dead += dead


def make_client(pub: FakePublisher) -> httpx.AsyncClient:
    settings = Settings(kafka_bootstrap=None, database_url=None, pii_key=PII.decode())
    app = FastAPI()
    app.include_router(agency_http.router(settings, publisher=pub,  # type: ignore[arg-type]
                                          lookup=lambda k: "dinsos" if k == KEY else None))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def event(i: int = 1, **over: Any) -> dict[str, Any]:
    t = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    e = {"specversion": "1.0", "id": f"ev-{i}", "source": "sikasep", "type": "jember.welfare.case.v1",
         "time": t, "region": "35.09.19",
         "data": {"case_id": f"K-{i}", "status": "registered", "pmks_category": "PMKS02",
                  "person": {"nik": NIK, "name": "Siti Aminah", "phone": "081234567890"}}}
    e.update(over)
    return e


AUTH = {"Authorization": f"Bearer {KEY}"}


async def test_auth_required() -> None:
    pub = FakePublisher()
    async with make_client(pub) as c:
        r = await c.post("/v1/events", json=event())
        assert r.status_code == 401 and r.json()["reason"] == "unauthorized"
        assert r.headers["www-authenticate"].startswith("Bearer")
        r = await c.post("/v1/events", json=event(), headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
    assert pub.ingest == [] and pub.dead == []


async def test_single_event_is_pseudonymised_and_keyed_by_entity() -> None:
    pub = FakePublisher()
    async with make_client(pub) as c:
        r = await c.post("/v1/events", json=event(), headers=AUTH)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["accepted"] == 1 and body["results"] == [
        {"index": 0, "id": "ev-1", "status": "accepted", "reason": None, "message": None}]
    (key, value), = pub.ingest
    assert key == b"K-1"
    text = value.decode()
    assert NIK not in text and "Siti" not in text and "81234567890" not in text
    out = orjson.loads(value)
    assert out["data"]["person"]["nik"] == keyed_hash("nik", NIK, PII)
    assert out["arusagency"] == "dinsos" and out["source"] == "sikasep" and out["aruschannel"] == "http"


async def test_array_mixed_results_and_sealed_dead_letters() -> None:
    pub = FakePublisher()
    bad_region = event(2, region="35.10.01")
    bad_nik = event(3)
    bad_nik["data"]["person"]["nik"] = "3509991708850007"
    items = [event(1), bad_region, bad_nik, "nope", event(5, type="jember.unknown.v1")]
    async with make_client(pub) as c:
        r = await c.post("/v1/events", json=items, headers=AUTH)
    assert r.status_code == 202
    res = r.json()["results"]
    assert [x["status"] for x in res] == ["accepted", "rejected", "rejected", "rejected", "rejected"]
    assert [x["reason"] for x in res[1:]] == ["unknown_region", "invalid_nik", "invalid_envelope", "unknown_type"]
    assert len(pub.ingest) == 1 and len(pub.dead) == 4
    dl = json.dumps(pub.dead)
    assert NIK not in dl and "3509991708850007" not in dl and "Siti" not in dl
    # a replay can restore the clear input with the key (the worker's wrapper format)
    wrapper = json.loads(pub.dead[1]["raw"])
    assert wrapper["key"] == "K-3" and wrapper["id"] == "ev-3" and wrapper["type"] == "jember.welfare.case.v1"
    assert orjson.loads(unseal(wrapper["sealed"], PII)) == bad_nik
    assert pub.dead[1]["message"].startswith("item 2: ") and pub.dead[1]["reason"] == "invalid_nik"


async def test_ndjson_with_a_broken_line() -> None:
    pub = FakePublisher()
    body = orjson.dumps(event(1)) + b"\n{broken\n\n" + orjson.dumps(event(2)) + b"\n"
    async with make_client(pub) as c:
        r = await c.post("/v1/events", content=body, headers={**AUTH, "Content-Type": "application/x-ndjson"})
    assert r.status_code == 202
    assert [x["status"] for x in r.json()["results"]] == ["accepted", "rejected", "accepted"]
    assert r.json()["results"][1]["reason"] == "malformed_json"
    assert [k for k, _ in pub.ingest] == [b"K-1", b"K-2"]


async def test_limits_and_bad_bodies() -> None:
    pub = FakePublisher()
    async with make_client(pub) as c:
        r = await c.post("/v1/events", content=b"x" * (agency_http.MAX_BODY_BYTES + 1), headers=AUTH)
        assert r.status_code == 413 and r.json()["reason"] == "payload_too_large"
        r = await c.post("/v1/events", content=orjson.dumps([{}] * (agency_http.MAX_ITEMS + 1)), headers=AUTH)
        assert r.status_code == 413
        r = await c.post("/v1/events", content=b"{not json", headers=AUTH)
        assert r.status_code == 400 and r.json()["reason"] == "malformed_json"
        r = await c.post("/v1/events", content=b"42", headers=AUTH)
        assert r.status_code == 400
    assert pub.ingest == [] and pub.dead == []


async def test_kafka_failure_is_503() -> None:
    async with make_client(FakePublisher(fail=True)) as c:
        r = await c.post("/v1/events", json=event(), headers=AUTH)
    assert r.status_code == 503


@pytest.mark.parametrize("ctype", ["application/x-ndjson", "application/x-ndjson; charset=utf-8"])
def test_parse_body_ndjson(ctype: str) -> None:
    items = agency_http.parse_body(b'{"a":1}\n{"b":2}', ctype)
    assert isinstance(items, list) and [i[0] for i in items] == [{"a": 1}, {"b": 2}]
