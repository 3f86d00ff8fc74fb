"""The service-event handler of the ingest partition: lifecycles, durations, dedupe, daily cells, privacy."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from infra import privacy
from schemas import reasons, topics
from schemas.service_events import synthetic_nik
from stream_processors.outputs import Outputs
from stream_processors.service_events import ServiceEventHandler, entity_key, family_prefixes, wib_day
from stream_processors.telemetry import TelemetryPartition
from stream_processors.validation import TimePolicy

KEY = b"unit-test-pii-key"
DAY = 86_400_000
NOW = int(datetime(2026, 11, 28, 5, 0, tzinfo=UTC).timestamp() * 1000)  # 12:00 WIB
NIK = synthetic_nik("35.09.19", 17, 8, 1985, 7)
NAME, PHONE = "Siti Rahayu Lestari", "081234567890"
SECRETS = (NIK, NAME, PHONE, "6281234567890")


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def complaint(cid: str, status: str, t_ms: int, *, eid: str | None = None, source: str = "lapor.jember",
              region: str = "35.09.19.1001", **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"complaint_id": cid, "status": status, "agency": "dpupr", "channel": "wa", **extra}
    if status == "opened":
        data.setdefault("category", "jalan_rusak")
        data.setdefault("reporter", {"nik": NIK, "name": NAME, "phone": PHONE})
    return {"specversion": "1.0", "id": eid or f"{cid}-{status}", "source": source, "type": "jember.complaint.v1",
            "time": iso(t_ms), "region": region, "data": data}


def welfare(case: str, status: str, t_ms: int, region: str = "35.09.01") -> dict[str, Any]:
    data: dict[str, Any] = {"case_id": case, "status": status,
                            "person": {"nik": NIK, "name": NAME, "phone": PHONE}}
    if status == "registered":
        data["pmks_category"] = "PMKS01"
    return {"specversion": "1.0", "id": f"{case}-{status}", "source": "siks.dinsos", "type": "jember.welfare.case.v1",
            "time": iso(t_ms), "region": region, "data": data}


def handler(**kw: Any) -> ServiceEventHandler:
    return ServiceEventHandler(0, "jember.ingest", KEY, 400 * DAY, 300_000, **kw)


def feed(h: ServiceEventHandler, env: dict[str, Any], out: Outputs, now: int = NOW, offset: int = 0) -> None:
    raw = orjson.dumps(env)
    h.handle(orjson.loads(raw), raw, offset, now, out)


def emitted(out: Outputs, topic: str) -> list[dict[str, Any]]:
    return [orjson.loads(v) for t, _, v in out.records if t == topic]


def cells(out: Outputs) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    return {(c["day"], c["kecamatan"], c["type"], c["measure"]): c for c in emitted(out, topics.SERVICE_DAILY)}


def test_complaint_lifecycle_durations_and_entity_key() -> None:
    h, out = handler(), Outputs()
    t0 = NOW - 3 * 3_600_000
    for status, dt in (("opened", 0), ("assigned", 600_000), ("resolved", 7_200_000)):
        feed(h, complaint("C-1", status, t0 + dt), out)
    events = emitted(out, topics.SERVICE_EVENTS)
    assert [e["status"] for e in events] == ["opened", "assigned", "resolved"]
    assert events[0]["durations"] == {}
    assert events[1]["durations"] == {"time_to_assign_s": 600.0}
    assert events[2]["durations"] == {"time_to_assign_s": 600.0, "time_to_resolve_s": 7200.0}
    assert all(e["opened_at"] == t0 and e["entity_id"] == "C-1" and e["kecamatan"] == "35.09.19" for e in events)
    assert [k for t, k, _ in out.records if t == topics.SERVICE_EVENTS] == [b"C-1"] * 3
    assert not emitted(out, topics.DLQ)
    assert entity_key(complaint("C-9", "opened", t0)) == "C-9"


def test_resolved_before_opened_keeps_both_and_never_negative() -> None:
    h, out = handler(), Outputs()
    t0 = NOW - 5 * 3_600_000
    feed(h, complaint("C-2", "resolved", t0 + 3_600_000), out)
    first = emitted(out, topics.SERVICE_EVENTS)[-1]
    assert first["durations"] == {} and first["opened_at"] is None  # unknown start: no duration
    feed(h, complaint("C-2", "opened", t0), out)
    late = emitted(out, topics.SERVICE_EVENTS)[-1]
    assert late["durations"] == {"time_to_resolve_s": 3600.0} and late["opened_at"] == t0
    ent = h.entities["jember.complaint.v1|C-2"]
    assert ent["s"] == "resolved"  # the current status follows event time, not arrival
    assert set(ent["ts"]) == {"opened", "resolved"}
    # inverted event times (resolved stamped before opened): no duration at all
    feed(h, complaint("C-3", "resolved", t0), out)
    feed(h, complaint("C-3", "opened", t0 + 60_000), out)
    assert emitted(out, topics.SERVICE_EVENTS)[-1]["durations"] == {}
    h.flush(out)
    durations = [c for c in cells(out).values() if c["measure"] == "time_to_resolve_s"]
    assert [(c["count"], c["sum"], c["min"], c["max"]) for c in durations] == [(1, 3600.0, 3600.0, 3600.0)]


def test_duplicates_by_id_and_across_channels() -> None:
    h, out = handler(), Outputs()
    t0 = NOW - 3_600_000
    feed(h, complaint("C-4", "opened", t0), out)
    feed(h, complaint("C-4", "opened", t0), out)  # redelivery: same (source, id)
    feed(h, complaint("C-4", "opened", t0, eid="http-77", source="arus.http/lapor"), out)  # another channel
    assert len(emitted(out, topics.SERVICE_EVENTS)) == 1
    dead = emitted(out, topics.DLQ)
    assert [d["reason"] for d in dead] == [reasons.DUPLICATE, reasons.DUPLICATE]
    h.flush(out)
    assert cells(out)[(wib_day(t0), "35.09.19", "jember.complaint.v1", "status:opened")]["count"] == 1


def test_daily_cells_follow_the_wib_calendar() -> None:
    h, out = handler(), Outputs()
    # 16:59:59 UTC = 23:59:59 WIB on the 27th; 17:00:00 UTC = 00:00 WIB on the 28th
    before = int(datetime(2026, 11, 27, 16, 59, 59, tzinfo=UTC).timestamp() * 1000)
    after = before + 1000
    assert (wib_day(before), wib_day(after)) == ("2026-11-27", "2026-11-28")
    feed(h, complaint("C-5", "opened", before), out)
    feed(h, complaint("C-6", "opened", after), out)
    feed(h, complaint("C-5", "resolved", after + 59_000), out)
    h.flush(out)
    c = cells(out)
    assert c[("2026-11-27", "35.09.19", "jember.complaint.v1", "status:opened")]["count"] == 1
    assert c[("2026-11-28", "35.09.19", "jember.complaint.v1", "status:opened")]["count"] == 1
    assert c[("2026-11-28", "35.09.19", "jember.complaint.v1", "status:resolved")]["count"] == 1
    dur = c[("2026-11-28", "35.09.19", "jember.complaint.v1", "time_to_resolve_s")]
    assert (dur["count"], dur["sum"], dur["min"], dur["max"]) == (1, 60.0, 60.0, 60.0)
    # only changed cells at the next flush, with their full state
    out2 = Outputs()
    feed(h, complaint("C-7", "opened", after + 5000), out2)
    h.flush(out2)
    assert list(cells(out2)) == [("2026-11-28", "35.09.19", "jember.complaint.v1", "status:opened")]
    assert cells(out2)[("2026-11-28", "35.09.19", "jember.complaint.v1", "status:opened")]["count"] == 2


def test_personal_data_is_pseudonymised_and_sealed_in_dead_letters() -> None:
    h, out = handler(), Outputs()
    t0 = NOW - DAY
    feed(h, welfare("W-1", "registered", t0), out)
    feed(h, welfare("W-1", "verified", t0 + DAY // 2), out)
    bad_region = welfare("W-2", "registered", t0, region="35.09.99")
    feed(h, bad_region, out, offset=7)
    bad_nik = welfare("W-3", "registered", t0)
    bad_nik["data"]["person"]["nik"] = "35099917088500071"  # 17 digits
    feed(h, bad_nik, out, offset=8)
    h.flush(out)
    everything = b"\n".join(v for _, _, v in out.records).decode()
    for secret in SECRETS:
        assert secret not in everything
    ev = emitted(out, topics.SERVICE_EVENTS)
    assert ev[1]["durations"] == {"time_to_verify_s": 43200.0}
    person = ev[0]["data"]["person"]
    assert person["nik"] == privacy.pseudonymise({"nik": NIK}, KEY)["nik"] and person["nik"].startswith("hmac:")
    assert privacy.is_pseudonymised(ev[0]["data"])
    dead = emitted(out, topics.DLQ)
    assert [d["reason"] for d in dead] == [reasons.UNKNOWN_REGION, reasons.INVALID_NIK]
    wrapper = json.loads(dead[0]["raw"])
    assert wrapper["type"] == "jember.welfare.case.v1" and wrapper["id"] == "W-2-registered"
    assert wrapper["key"] == "W-2"
    assert orjson.loads(privacy.unseal(wrapper["sealed"], KEY)) == bad_region  # replay can restore it


def test_already_pseudonymised_data_is_kept() -> None:
    h, out = handler(), Outputs()
    env = welfare("W-4", "registered", NOW - 60_000)
    env["data"] = privacy.pseudonymise(env["data"], b"the-http-ingest-key")  # hashed upstream (same key in real life)
    feed(h, env, out)
    assert emitted(out, topics.SERVICE_EVENTS)[0]["data"]["person"] == env["data"]["person"]


def test_snapshot_restore_full_and_deltas_equal_state() -> None:
    h, out = handler(), Outputs()
    t0 = NOW - 2 * DAY
    feed(h, complaint("C-8", "opened", t0), out)
    feed(h, welfare("W-5", "registered", t0), out)
    h.flush(out)
    full = orjson.loads(orjson.dumps(h.snapshot(True)))
    feed(h, complaint("C-8", "resolved", t0 + 3_600_000), out)
    feed(h, complaint("C-9", "opened", t0 + 10), out)
    h.flush(out)
    delta = orjson.loads(orjson.dumps(h.snapshot(False)))
    assert set(delta["entities"]) == {"jember.complaint.v1|C-8", "jember.complaint.v1|C-9"}
    restored = handler()
    restored.restore({**full, "full": True})
    restored.restore({**delta, "full": False})
    assert restored.state() == h.state()
    # the restored handler goes on exactly like the original (same dedupe, same durations)
    o1, o2 = Outputs(), Outputs()
    for hh, o in ((h, o1), (restored, o2)):
        feed(hh, complaint("C-9", "resolved", t0 + 7_200_000), o)
        feed(hh, complaint("C-8", "resolved", t0 + 3_600_000), o)  # duplicate
        hh.flush(o)

    def comparable(o: Outputs) -> list[Any]:  # sealed raws differ by their random nonce
        return [(t, k, {**orjson.loads(v), "raw": None} if t == topics.DLQ else orjson.loads(v))
                for t, k, v in o.records]

    assert comparable(o1) == comparable(o2)
    assert [r["reason"] for r in emitted(o1, topics.DLQ)] == [reasons.DUPLICATE]


def test_expiry_is_bounded_and_recorded_in_deltas() -> None:
    h, out = handler(horizon_ms=30 * DAY), Outputs()
    t0 = NOW - 40 * DAY
    old_now = t0 + 60_000
    feed(h, complaint("C-10", "opened", t0), out, now=old_now)
    feed(h, complaint("C-10", "resolved", t0 + 1000), out, now=old_now)
    feed(h, complaint("C-11", "opened", t0), out, now=old_now)  # still open: kept longer
    h.flush(out)
    h.snapshot(True)
    feed(h, complaint("C-12", "opened", NOW - 1000), out)  # the watermark moves 40 days on
    h.flush(out)
    assert "jember.complaint.v1|C-10" not in h.entities
    assert "jember.complaint.v1|C-11" in h.entities
    assert all(not k.startswith(wib_day(t0)) for k in h.cells)
    assert all(int(e["u"]) >= NOW - 30 * DAY or e["s"] != "resolved" for e in h.entities.values())
    delta = h.snapshot(False)
    assert "jember.complaint.v1|C-10" in delta["entities-"]


def test_backfill_behind_the_horizon_is_recounted_by_the_sink_not_the_stream() -> None:
    h, out = handler(horizon_ms=30 * DAY), Outputs()
    feed(h, complaint("C-20", "opened", NOW - 1000), out)  # watermark: now
    old = NOW - 100 * DAY
    feed(h, complaint("C-21", "opened", old), out)
    feed(h, complaint("C-21", "resolved", old + 3_600_000), out)
    feed(h, complaint("C-21", "resolved", old + 3_600_000), out)  # duplicate still caught (open entity kept)
    h.flush(out)
    ev = emitted(out, topics.SERVICE_EVENTS)
    assert "recount" not in ev[0]
    assert ev[1]["recount"] == [[wib_day(old), "35.09.19", "jember.complaint.v1"]]
    assert ev[2]["recount"] == [[wib_day(old), "35.09.19", "jember.complaint.v1"]] and ev[2]["durations"] == {"time_to_resolve_s": 3600.0}
    assert len(ev) == 3 and [d["reason"] for d in emitted(out, topics.DLQ)] == [reasons.DUPLICATE]
    assert {k[0] for k in cells(out)} == {wib_day(NOW)}  # no partial cell for the old day


def test_listeners_get_pseudonymised_events_and_a_failing_one_is_contained() -> None:
    got: list[Any] = []

    def good(ev: Any, out: Outputs) -> None:
        got.append(ev)

    def broken(ev: Any, out: Outputs) -> None:
        raise RuntimeError("bug")

    h, out = handler(listeners=[broken, good]), Outputs()
    feed(h, complaint("C-13", "opened", NOW - 1000), out)
    assert len(got) == 1 and got[0].entity_id == "C-13"
    assert privacy.is_pseudonymised(got[0].data) and NIK not in orjson.dumps(got[0].data).decode()


def test_registered_in_the_ingest_partition_once_for_state() -> None:
    part = TelemetryPartition(0, "jember.ingest", 60_000, 600_000, TimePolicy(7 * DAY, 300_000), lambda: {})
    h = handler()
    h.register(part.handlers)
    assert set(family_prefixes(["jember.welfare.case.v1", "jember.complaint.v1"])) == {
        "jember.welfare.", "jember.complaint."}
    assert {"jember.welfare.", "jember.complaint.", "jember.health.", "jember.emergency.",
            "jember.adminduk."} <= set(part.handlers)
    out = Outputs()
    part.process(orjson.dumps(complaint("C-14", "opened", NOW - 1000)), 1, NOW, out)
    part.process(orjson.dumps(welfare("W-6", "registered", NOW - 1000)), 2, NOW, out)
    part.flush(out)
    assert len(emitted(out, topics.SERVICE_EVENTS)) == 2
    snap = orjson.loads(orjson.dumps(part.snapshot(True)))
    states = [s for s in snap["h"].values() if s]
    assert len(states) == 1 and len(states[0]["entities"]) == 2  # the state is held once
    part2 = TelemetryPartition(0, "jember.ingest", 60_000, 600_000, TimePolicy(7 * DAY, 300_000), lambda: {})
    h2 = handler()
    h2.register(part2.handlers)
    part2.restore(snap)
    assert h2.state() == h.state()


@pytest.mark.parametrize("status", ["dispatched", "arrived"])
def test_emergency_response_time_either_order(status: str) -> None:
    h, out = handler(), Outputs()
    t0 = NOW - 3_600_000
    times = {"dispatched": t0, "arrived": t0 + 900_000}
    order = [status, "arrived" if status == "dispatched" else "dispatched"]
    for s in order:
        feed(h, {"specversion": "1.0", "id": f"D-1-{s}", "source": "psc119", "type": "jember.emergency.dispatch.v1",
                 "time": iso(times[s]), "region": "35.09.10", "data": {"dispatch_id": "D-1", "status": s}}, out)
    assert emitted(out, topics.SERVICE_EVENTS)[-1]["durations"] == {"response_time_s": 900.0}


def test_timedelta_sanity() -> None:
    assert timedelta(milliseconds=DAY).days == 1


def test_dlq_replay_unseals_the_original_bytes_keyed_by_entity() -> None:
    from arus.dlq import DeadLetter, plan_replay
    from infra.settings import Settings

    settings = Settings(pii_key=KEY.decode(), topic_prefix="jember.")
    h, out = handler(), Outputs()
    env = welfare("W-30", "registered", NOW - 1000, region="35.09.99")
    raw = orjson.dumps(env)
    h.handle(orjson.loads(raw), raw, 5, NOW, out)
    (dead,) = emitted(out, topics.DLQ)
    assert NIK not in dead["raw"] and NAME not in dead["raw"]
    row = DeadLetter(dead["id"], datetime.now(UTC), dead["reason"], dead["message"], dead["source"], None,
                     dead["topic"], 0, 5, dead["raw"], dead["raw_encoding"], None)
    plan = plan_replay([row], settings, now_ms=NOW)
    assert plan.records == {dead["id"]: [(b"W-30", raw)]} and not plan.skipped
    other = plan_replay([row], Settings(pii_key="another-key", topic_prefix="jember."), now_ms=NOW)
    assert not other.records and "cannot be opened" in other.skipped[dead["id"]]


def test_cells_are_this_partitions_parts_versioned_by_offset_and_never_emitted_behind_the_horizon() -> None:
    h = ServiceEventHandler(3, "jember.ingest", KEY, 400 * DAY, 300_000, horizon_ms=30 * DAY)
    out = Outputs()
    old = NOW - 40 * DAY
    feed(h, complaint("C-40", "opened", old), out, now=old + 60_000, offset=10)
    h.flush(out)
    (cell,) = emitted(out, topics.SERVICE_DAILY)
    assert (cell["part"], cell["version"], cell["count"]) == (3, 10, 1)
    ev = emitted(out, topics.SERVICE_EVENTS)[0]
    assert (ev["part"], ev["offset"]) == (3, 10)
    # the old day's cell changes, then (same batch) the watermark moves 40 days on: the old cell is
    # not emitted at the next flush; a backfill event for it asks the sink for a recount instead
    out2 = Outputs()
    feed(h, complaint("C-41", "opened", old + 1000), out2, now=old + 60_000, offset=11)
    feed(h, complaint("C-42", "opened", NOW - 1000), out2, offset=12)
    feed(h, complaint("C-43", "opened", old + 2000), out2, offset=13)
    h.flush(out2)
    assert [c["day"] for c in emitted(out2, topics.SERVICE_DAILY)] == [wib_day(NOW)]
    # C-41's change to the old cell was never emitted: the event that moved the watermark asks for a recount
    moved = emitted(out2, topics.SERVICE_EVENTS)[1]
    assert moved["entity_id"] == "C-42" and moved["recount"] == [[wib_day(old), "35.09.19", "jember.complaint.v1"]]
    assert emitted(out2, topics.SERVICE_DAILY)[0]["version"] == 13
    assert emitted(out2, topics.SERVICE_EVENTS)[-1]["recount"] == [[wib_day(old), "35.09.19", "jember.complaint.v1"]]


def test_a_nik_used_as_an_id_never_leaves_in_clear() -> None:
    h, out = handler(), Outputs()
    good = complaint(NIK, "opened", NOW - 1000, eid=NIK)
    bad = complaint(NIK, "resolved", NOW - 500, eid=NIK, region="35.09.99")
    feed(h, good, out, offset=1)
    feed(h, bad, out, offset=2)
    h.flush(out)
    text = b"\n".join(v + (k or b"") for _, k, v in out.records).decode()
    assert NIK not in text
    (dead,) = emitted(out, topics.DLQ)
    assert json.loads(dead["raw"])["key"] == emitted(out, topics.SERVICE_EVENTS)[0]["entity_id"]
