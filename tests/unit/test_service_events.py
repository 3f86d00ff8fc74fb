"""schemas/service_events.py: per-type validation, reasons, lifecycles, committed JSON Schemas."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from schemas import reasons
from schemas.regions import load_regions
from schemas.results import Ok, Rejected
from schemas.service_events import (
    JSONSCHEMA_DIR,
    LIFECYCLES,
    SERVICE_TYPES,
    ServiceEvent,
    load_pmks_categories,
    render_json_schemas,
    synthetic_nik,
    validate_service_event,
)

NOW = int(datetime(2026, 11, 28, 2, 0, tzinfo=UTC).timestamp() * 1000)
DAY = 86_400_000
NIK = synthetic_nik("35.09.19", 17, 8, 1985, 7)


def env(type_: str, data: dict[str, Any], **over: Any) -> dict[str, Any]:
    e = {
        "specversion": "1.0", "id": "ev-1", "source": "dinsos", "type": type_,
        "time": "2026-11-28T08:00:00+07:00", "region": "35.09.19.1001", "data": data,
    }
    e.update(over)
    return e


def check(e: Any) -> Ok[ServiceEvent] | Rejected:
    return validate_service_event(e, load_regions(), NOW, 30 * DAY, 300_000)


GOOD = {
    "jember.welfare.case.v1": {"case_id": "K-1", "status": "registered", "pmks_category": "PMKS02",
                               "person": {"nik": NIK, "name": "Siti", "phone": "081234567890"}},
    "jember.complaint.v1": {"complaint_id": "P-1", "status": "opened", "category": "jalan_rusak",
                            "agency": "DPUBMSDA", "channel": "wa"},
    "jember.health.visit.v1": {"visit_id": "V-1", "puskesmas": "P3509190101", "service": "kia",
                               "patient": {"nik": NIK}},
    "jember.emergency.dispatch.v1": {"dispatch_id": "D-1", "status": "dispatched", "unit": "AMB-03"},
    "jember.adminduk.request.v1": {"request_id": "R-1", "status": "submitted", "service": "KTP"},
}


def test_pmks_reference_has_26_categories() -> None:
    cats = load_pmks_categories()
    assert len(cats) == 26 and "PMKS01" in cats and "PMKS26" in cats


@pytest.mark.parametrize("type_", sorted(SERVICE_TYPES))
def test_each_type_accepts_a_good_event(type_: str) -> None:
    result = check(env(type_, {**GOOD[type_], "extra_field": {"kept": True}}))
    assert isinstance(result, Ok), result
    ev = result.value
    life = LIFECYCLES[type_]
    assert ev.entity_id == GOOD[type_][life.entity_field]
    assert ev.status in life.statuses
    assert ev.kecamatan == "35.09.19" and ev.region == "35.09.19.1001"
    assert ev.time_ms == int(datetime(2026, 11, 28, 1, 0, tzinfo=UTC).timestamp() * 1000)
    assert ev.data["extra_field"] == {"kept": True}
    assert ServiceEvent.from_dict(json.loads(json.dumps(ev.to_dict()))) == ev


def test_category_and_agency() -> None:
    ev = check(env("jember.complaint.v1", GOOD["jember.complaint.v1"]))
    assert isinstance(ev, Ok) and ev.value.category == "jalan_rusak" and ev.value.agency == "DPUBMSDA"
    ev2 = check(env("jember.welfare.case.v1", GOOD["jember.welfare.case.v1"], region="35.09"))
    assert isinstance(ev2, Ok) and ev2.value.category == "PMKS02" and ev2.value.kecamatan is None


def test_lifecycle_durations_refer_to_statuses() -> None:
    for type_, life in LIFECYCLES.items():
        assert life.entity_field in SERVICE_TYPES[type_].model_fields
        for _name, a, b in life.durations:
            assert life.statuses.index(a) < life.statuses.index(b)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda e: e.update(type="jember.unknown.thing.v1"), reasons.UNKNOWN_TYPE),
        (lambda e: e.update(type="Not a type"), reasons.INVALID_ENVELOPE),
        (lambda e: e.update(region="35.09.99"), reasons.UNKNOWN_REGION),
        (lambda e: e.update(region="35.10.01"), reasons.UNKNOWN_REGION),
        (lambda e: e.pop("region"), reasons.INVALID_ENVELOPE),
        (lambda e: e.update(specversion="0.3"), reasons.INVALID_ENVELOPE),
        (lambda e: e.update(id=""), reasons.INVALID_ENVELOPE),
        (lambda e: e.pop("source"), reasons.INVALID_ENVELOPE),
        (lambda e: e.update(time="2026-11-28T08:00:00"), reasons.INVALID_TIMESTAMP),
        (lambda e: e.update(time=1795827600000), reasons.INVALID_TIMESTAMP),
        (lambda e: e.update(time="2025-01-01T00:00:00Z"), reasons.TOO_OLD),
        (lambda e: e.update(time="2027-01-01T00:00:00Z"), reasons.TOO_FAR_IN_FUTURE),
        (lambda e: e.update(data="nope"), reasons.INVALID_PAYLOAD),
        (lambda e: e["data"].update(pmks_category="PMKS27"), reasons.INVALID_PMKS_CATEGORY),
        (lambda e: e["data"].pop("pmks_category"), reasons.INVALID_PAYLOAD),
        (lambda e: e["data"].update(status="done"), reasons.INVALID_STATUS),
        (lambda e: e["data"].pop("case_id"), reasons.INVALID_PAYLOAD),
        (lambda e: e["data"]["person"].update(nik="35091917088500"), reasons.INVALID_NIK),
        (lambda e: e["data"]["person"].update(nik="3509991708850007"), reasons.INVALID_NIK),
        (lambda e: e["data"].update(family=[{"nik": "3509191799850007"}]), reasons.INVALID_NIK),
    ],
)
def test_rejections(mutate: Any, reason: str) -> None:
    e = env("jember.welfare.case.v1", json.loads(json.dumps(GOOD["jember.welfare.case.v1"])))
    mutate(e)
    result = check(e)
    assert isinstance(result, Rejected), result
    assert result.reason == reason, result.message
    assert NIK not in result.message and "Siti" not in result.message


def test_hashed_nik_passes() -> None:
    data = {**GOOD["jember.welfare.case.v1"], "person": {"nik": "hmac:" + "a" * 32, "name": "hmac:" + "b" * 32}}
    assert isinstance(check(env("jember.welfare.case.v1", data)), Ok)


def test_never_raises_on_garbage() -> None:
    for junk in (None, [], "x", 3, {"data": {"x": object()}}, {"specversion": "1.0", "id": 5}):
        assert isinstance(check(junk), Rejected)


def test_committed_json_schemas_are_up_to_date() -> None:
    expected = render_json_schemas()
    assert set(expected) == {f"{t}.json" for t in SERVICE_TYPES}
    for name, text in expected.items():
        path = JSONSCHEMA_DIR / name
        assert path.exists(), f"{name} missing: run python -m schemas.service_events --export"
        assert path.read_text("utf-8") == text, f"{name} stale: run python -m schemas.service_events --export"
