"""Indicators: catalogue validation, periods, standing, and hand-computed values from known events."""

from __future__ import annotations

import random
from datetime import datetime

import orjson
import pytest

from infra.indicators import CatalogueError, load_catalogue, parse_catalogue
from infra.indicators.periods import label, period_end, period_start
from schemas.service_events import LIFECYCLES
from stream_processors.indicators.compute import compute, percentile_cont, slim_event
from stream_processors.indicators.stage import IndicatorPartition, SensorRoute, ServiceRoute
from stream_processors.outputs import Outputs

KALIWATES, SUMBERSARI, JOMBANG, KAB = "35.09.19", "35.09.20", "35.09.01", "35.09"
H = 3600.0
DAY = 86400.0


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


# 2026-11-10 10:00 WIB: every event below falls in November 2026 (WIB) and on the 10th (daily cells)
T0 = ms("2026-11-10T10:00:00+07:00")
NOV = ms("2026-11-01T00:00:00+07:00")
DEC = ms("2026-12-01T00:00:00+07:00")
NOV10 = ms("2026-11-10T00:00:00+07:00")


def event(etype: str, entity: str, status: str, t: int, kec: str | None, *, nik: str | None = None,
          category: str | None = None, durations: dict | None = None, eid: str | None = None) -> dict:
    data: dict = {}
    if category:  # the cleaned event repeats data[<the lifecycle's category field>] as `category`
        data[LIFECYCLES[etype].category_field] = category
    if nik:
        data["person"] = {"nik": nik, "name": "hmac:" + "0" * 32}
    return {"id": eid or f"{entity}-{status}-{t}", "source": "test", "type": etype, "time": t,
            "region": kec or KAB, "kecamatan": kec, "entity_id": entity, "status": status,
            "category": category, "agency": "x", "durations": durations or {}, "data": data}


def complaint(entity: str, kec: str, hours: float) -> list[dict]:
    opened = T0 - int(hours * H * 1000)
    return [event("jember.complaint.v1", entity, "opened", opened, kec, category="jalan"),
            event("jember.complaint.v1", entity, "resolved", T0, kec, durations={"time_to_resolve_s": hours * H})]


def welfare(entity: str, kec: str, nik: str, category: str, statuses: dict[str, int]) -> list[dict]:
    return [event("jember.welfare.case.v1", entity, s, t, kec, nik=nik,
                  category=category if s == "registered" else None) for s, t in statuses.items()]


def dispatch(entity: str, kec: str, seconds: float) -> list[dict]:
    return [event("jember.emergency.dispatch.v1", entity, "dispatched", T0 - int(seconds * 1000), kec),
            event("jember.emergency.dispatch.v1", entity, "arrived", T0, kec)]


def known_events() -> list[dict]:
    evs: list[dict] = []
    # complaints: Kaliwates 6 (4 within 72 h), Jombang 2 (1 within)
    for i, hours in enumerate([10, 20, 30, 50, 80, 100]):
        evs += complaint(f"c-k{i}", KALIWATES, hours)
    for i, hours in enumerate([10, 90]):
        evs += complaint(f"c-j{i}", JOMBANG, hours)
    # welfare cases verified in Kaliwates after 1, 2, 3, 4 and 10 days (5 persons): median 3 days
    for i, days in enumerate([1, 2, 3, 4, 10]):
        evs += welfare(f"w-{i}", KALIWATES, f"hmac:{i:032x}", "PMKS09",
                       {"registered": T0 - int(days * DAY * 1000), "verified": T0, "assisted": T0 + 1000})
    # a sixth PMKS09 case of person 0 again (assisted): still 5 distinct persons
    evs += welfare("w-5", KALIWATES, f"hmac:{0:032x}", "PMKS09", {"registered": T0 - 1000, "assisted": T0 + 2000})
    # PMKS01 in Sumbersari: 2 persons only -> suppressed
    for i in range(2):
        evs += welfare(f"w-s{i}", SUMBERSARI, f"hmac:{100 + i:032x}", "PMKS01",
                       {"registered": T0 - 5000, "assisted": T0})
    # ambulance in Kaliwates: 10, 12, 15, 20, 23 minutes -> mean 16, p90 = 21.8
    for i, minutes in enumerate([10, 12, 15, 20, 23]):
        evs += dispatch(f"d-{i}", KALIWATES, minutes * 60)
    return evs


def by_key(results: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["indicator_id"], r["region_code"]): r for r in results}


@pytest.fixture(scope="module")
def catalogue():
    return load_catalogue()


# --------------------------------------------------------------------------- catalogue


def test_shipped_catalogue_is_a_labelled_example_with_placeholder_targets(catalogue):
    assert catalogue.example is True and "placeholder" in catalogue.notice
    assert all(i.target.placeholder for i in catalogue.indicators)
    sources = {i.source for i in catalogue.indicators}
    assert sources == {"service-events", "aggregates"}
    kinds = {i.formula.kind for i in catalogue.indicators}
    assert {"count", "ratio", "mean", "percentile", "distinct"} <= kinds
    meta = catalogue.get("pengaduan-selesai-dalam-sla").metadata()
    assert meta["fiware"]["calculationFrequency"] == "monthly" and meta["fiware"]["businessTarget"] == 90


@pytest.mark.parametrize("mutation, expected", [
    ({"formula": {"kind": "ratio", "event": {"type": "jember.complaint.v1", "status": "resolved"}}},
     "numerator_when"),
    ({"formula": {"kind": "count", "event": {"type": "jember.complaint.v1", "status": "closed"}}},
     "status 'closed' is not in the lifecycle"),
    ({"formula": {"kind": "mean", "field": "time_to_fly_s",
                  "event": {"type": "jember.complaint.v1", "status": "resolved"}}}, "time_to_fly_s"),
    ({"frequency": "fortnightly"}, "frequency"),
    ({"target": {"value": 1}}, "direction"),
])
def test_bad_catalogue_is_refused_naming_the_indicator_and_the_problem(mutation, expected):
    entry = {"id": "x-ind", "name": "Indikator X", "promise": "p", "owner_agency": "Dinas X",
             "definition": "definisi yang cukup panjang", "source": "service-events", "unit": "kasus",
             "frequency": "monthly", "target": {"value": 1, "direction": "higher"},
             "formula": {"kind": "count", "event": {"type": "jember.complaint.v1", "status": "resolved"}}}
    entry.update(mutation)
    with pytest.raises(CatalogueError) as err:
        parse_catalogue(orjson.dumps({"indicators": [entry]}).decode(), "test.yaml")
    assert "test.yaml" in str(err.value) and "x-ind" in str(err.value) and expected in str(err.value)


def test_duplicate_ids_and_non_yaml_are_refused():
    with pytest.raises(CatalogueError, match="not valid YAML"):
        parse_catalogue("indicators: [", "t")
    entry = {"id": "dup", "name": "Dup", "promise": "p", "owner_agency": "Dinas", "definition": "d" * 12,
             "source": "aggregates", "unit": "jam", "frequency": "daily", "target": {"direction": "lower"},
             "formula": {"kind": "count", "metric": "pm25"}}
    with pytest.raises(CatalogueError, match="appears twice"):
        parse_catalogue(orjson.dumps({"indicators": [entry, entry]}).decode(), "t")


def test_periods_follow_the_wib_calendar():
    t = ms("2026-11-01T00:30:00+07:00")  # still October in UTC
    assert period_start("monthly", t) == NOV and period_end("monthly", NOV) == DEC
    assert period_start("daily", t) == ms("2026-11-01T00:00:00+07:00")
    assert period_start("weekly", T0) == ms("2026-11-09T00:00:00+07:00")  # Monday
    assert period_start("hourly", T0 + 59 * 60_000) == T0
    assert label("weekly", period_start("weekly", T0)) == "2026-W46"
    assert period_end("monthly", ms("2026-12-01T00:00:00+07:00")) == ms("2027-01-01T00:00:00+07:00")


def test_standing_against_target(catalogue):
    sla = catalogue.get("pengaduan-selesai-dalam-sla").target  # 90, higher, 10 % margin -> 81
    assert [sla.standing(v) for v in (95, 90, 85, 81, 80.9, None)] == \
        ["on_track", "on_track", "at_risk", "at_risk", "off_track", None]
    amb = catalogue.get("waktu-respons-ambulans").target  # 15, lower -> at risk up to 16.5
    assert [amb.standing(v) for v in (10, 16, 17)] == ["on_track", "at_risk", "off_track"]


def test_percentile_cont_matches_postgresql():
    assert percentile_cont([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile_cont([10.0, 12.0, 15.0, 20.0, 23.0], 90) == pytest.approx(21.8)
    assert percentile_cont([], 50) is None


# --------------------------------------------------------------------------- hand-computed values


def slim(evs, catalogue):
    from stream_processors.indicators.compute import person_fields

    return [slim_event(e, person_fields(catalogue)) for e in evs]


def test_known_events_give_the_hand_computed_values(catalogue):
    r = by_key(compute(catalogue, slim(known_events(), catalogue), min_persons=5))
    sla = r[("pengaduan-selesai-dalam-sla", KALIWATES)]
    assert (sla["numerator"], sla["denominator"], sla["n_persons"]) == (4, 6, 6)
    assert sla["value"] == pytest.approx(400 / 6) and sla["standing"] == "off_track"
    assert sla["period"] == "month" and sla["period_start"] == NOV and sla["period_end"] == DEC
    assert sla["suppressed"] is False and sla["target"] == 90
    # Jombang: 2 complaints -> suppressed everywhere in the record
    j = r[("pengaduan-selesai-dalam-sla", JOMBANG)]
    assert j["suppressed"] is True
    assert (j["value"], j["numerator"], j["denominator"], j["n_persons"], j["standing"]) == (None,) * 5
    # kabupaten: 8 complaints, 5 within 72 h (the Jombang ones count there)
    kab = r[("pengaduan-selesai-dalam-sla", KAB)]
    assert (kab["numerator"], kab["denominator"], kab["value"]) == (5, 8, 62.5)
    # median days to verify: 1, 2, 3, 4, 10 -> 3
    med = r[("median-waktu-verifikasi-kasus-kesejahteraan", KALIWATES)]
    assert med["value"] == 3.0 and med["denominator"] == 5 and med["n_persons"] == 5
    # distinct persons assisted: PMKS09 6 cases of 5 persons; PMKS01 2 persons -> suppressed
    d9 = r[("penerima-bantuan-per-pmks.PMKS09", KALIWATES)]
    assert d9["value"] == 5 and d9["category"] == "PMKS09" and d9["base_id"] == "penerima-bantuan-per-pmks"
    assert r[("penerima-bantuan-per-pmks.PMKS01", SUMBERSARI)]["suppressed"] is True
    assert r[("penerima-bantuan-per-pmks.PMKS01", KAB)]["suppressed"] is True  # 2 persons at kabupaten too
    assert r[("penerima-bantuan-per-pmks.PMKS09", KAB)]["value"] == 5
    # registered welfare cases in November (count): Kaliwates 5 cases (w-4 registered in October) of 4
    # persons -> suppressed although 5 cases; kabupaten 5 + 2 Sumbersari = 7 cases of 6 persons
    assert r[("kasus-kesejahteraan-terdaftar", KALIWATES)]["suppressed"] is True
    assert r[("kasus-kesejahteraan-terdaftar", KAB)]["value"] == 7
    assert r[("kasus-kesejahteraan-terdaftar", KAB)]["n_persons"] == 6
    # ambulance: mean of 10, 12, 15, 20, 23 minutes = 16 (daily cell of the 10th); p90 = 21.8 (monthly)
    amb = r[("waktu-respons-ambulans", KALIWATES)]
    assert amb["value"] == 16.0 and amb["period"] == "day" and amb["period_start"] == NOV10
    assert amb["standing"] == "at_risk"
    assert r[("p90-waktu-respons-ambulans", KALIWATES)]["value"] == pytest.approx(21.8)


def test_order_and_redelivery_do_not_change_values(catalogue):
    events = slim(known_events(), catalogue)
    expected = compute(catalogue, events)
    shuffled = events * 2
    random.Random(7).shuffle(shuffled)
    assert compute(catalogue, shuffled) == expected


def test_k_is_configurable(catalogue):
    r = by_key(compute(catalogue, slim(known_events(), catalogue), min_persons=2))
    j = r[("pengaduan-selesai-dalam-sla", JOMBANG)]
    assert j["suppressed"] is False and (j["numerator"], j["denominator"], j["value"]) == (1, 2, 50.0)


def test_duration_from_marks_when_the_closing_event_came_first(catalogue):
    # resolved arrives first without a duration (the upstream did not know the opening yet)
    evs = []
    for i in range(5):
        evs.append(event("jember.complaint.v1", f"late-{i}", "resolved", T0, KALIWATES))
        evs.append(event("jember.complaint.v1", f"late-{i}", "opened", T0 - int((i + 1) * 20 * H * 1000), KALIWATES))
    r = by_key(compute(catalogue, slim(evs, catalogue)))
    sla = r[("pengaduan-selesai-dalam-sla", KALIWATES)]  # 20, 40, 60 within 72 h; 80, 100 not
    assert (sla["numerator"], sla["denominator"]) == (3, 5)


def test_sensor_hours_above_the_standard():
    cat = load_catalogue()
    h0 = ms("2026-11-10T08:00:00+07:00")
    windows = [
        (KALIWATES, "pm25", h0, 120.0, 2.0), (KALIWATES, "pm25", h0 + 60_000, 60.0, 1.0),  # hour mean 60 > 55
        (KALIWATES, "pm25", h0 + 3_600_000, 100.0, 2.0),  # 50: not above
        (SUMBERSARI, "pm25", h0, 56.0, 1.0),  # 56 > 55
        (SUMBERSARI, "pm10", h0, 999.0, 1.0),  # metric not in the catalogue
    ]
    r = by_key(compute(cat, [], windows))
    assert r[("udara-jam-pm25-di-atas-baku-mutu", KALIWATES)]["value"] == 1
    assert r[("udara-jam-pm25-di-atas-baku-mutu", SUMBERSARI)]["value"] == 1
    kab = r[("udara-jam-pm25-di-atas-baku-mutu", KAB)]
    assert kab["value"] == 2 and kab["n_persons"] is None and kab["suppressed"] is False
    assert kab["standing"] == "at_risk"  # target 0, absolute margin 2 hours


# --------------------------------------------------------------------------- the worker stage


def _route(evs, catalogue):
    route = ServiceRoute(0, "t.service-events", catalogue)
    out = Outputs()
    for i, e in enumerate(evs):
        route.process(orjson.dumps(e), i, T0, out)
    return out.records


def _feed(part, records, now=T0, start=0):
    out = Outputs()
    for i, (_, _, value) in enumerate(records):
        part.process(value, start + i, now, out)
        part.offset = start + i
    part.flush(out)
    return {(orjson.loads(v)["indicator_id"], orjson.loads(v)["region_code"]): orjson.loads(v)
            for t, _, v in out.records if t == "indicators"}, out


def _partition(catalogue, **kw):
    opts = dict(min_persons=5, lateness_ms=86_400_000, sensor_close_ms=600_000,
                entity_retention_ms=90 * 86_400_000, max_future_ms=300_000)
    opts.update(kw)
    return IndicatorPartition(0, "t.internal.indicator-input", catalogue, **opts)


def test_stage_emits_the_batch_values_and_survives_snapshot_restore(catalogue):
    evs = known_events()
    records = _route(evs, catalogue)
    assert {t for t, _, _ in records} == {"internal.indicator-input"}
    assert {k for _, k, _ in records} == {b"35.09"}  # every event of the kabupaten in one place
    expected = by_key(compute(catalogue, slim(evs, catalogue)))
    half = len(records) // 2
    part = _partition(catalogue)
    first, _ = _feed(part, records[:half])
    payload = orjson.loads(orjson.dumps(part.snapshot(full=True)))
    restored = _partition(catalogue)
    restored.restore(payload)
    # a crash after the checkpoint: the rest arrives, plus a redelivery of the first half
    second, _ = _feed(restored, records[:half] + records[half:], start=half)
    merged = {**first, **second}
    assert merged == expected


def test_stage_ignores_events_for_closed_periods(catalogue):
    part = _partition(catalogue, lateness_ms=0)
    recs = _route(complaint("c-a", KALIWATES, 10), catalogue)
    first, _ = _feed(part, recs)
    assert ("pengaduan-selesai-dalam-sla", KALIWATES) in first
    # an event in December closes November (lateness 0): its cells are dropped
    later = _route(complaint("c-b", KALIWATES, 10), catalogue)
    moved = [(t, k, orjson.dumps({**orjson.loads(v), "t": orjson.loads(v)["t"] + 30 * 86_400_000})) for t, k, v in later]
    _feed(part, moved, now=T0 + 31 * 86_400_000)
    assert not any(k.endswith(f"|{NOV}") for k in part.state.cells)
    assert "jember.complaint.v1|c-a" not in part.state.entities  # its lifecycle closed, its cells too
    assert "jember.complaint.v1|c-b" in part.state.entities
    # a late November complaint no longer re-creates a partial November cell
    late, _ = _feed(part, _route(complaint("c-c", KALIWATES, 5), catalogue), now=T0 + 31 * 86_400_000)
    assert not any(r["period_start"] == NOV for r in late.values())
    assert part.state.late > 0


def test_stage_sensor_hours_are_live_and_close_on_the_window_watermark():
    cat = load_catalogue()
    route = SensorRoute(0, "t.aggregates", cat)
    h0 = ms("2026-11-10T08:00:00+07:00")

    def agg(kec, metric, ws, s, c, scope="kecamatan"):
        return orjson.dumps({"scope": scope, "key": kec, "region": kec, "metric": metric, "window_start": ws,
                             "window_end": ws + 60_000, "count": c, "min": 0, "max": 0, "sum": s,
                             "mean": s / c, "last": 0, "last_time": ws, "final": False})

    def routed(*raws):
        out = Outputs()
        for i, raw in enumerate(raws):
            route.process(raw, i, h0, out)
        return out.records

    part = _partition(cat)
    key = ("udara-jam-pm25-di-atas-baku-mutu", KALIWATES)
    res, _ = _feed(part, routed(agg(KALIWATES, "pm25", h0, 50.0, 1)), now=h0 + 86_400_000)
    assert (res[key]["value"], res[key]["denominator"]) == (0, 1)  # 50 is not above 55: 0 of 1 hour
    recs = routed(agg("dev-1", "pm25", h0, 900.0, 1, "device"),
                  agg(KALIWATES, "pm25", h0, 70.0, 1),  # the window's newer state replaces the first
                  agg(KALIWATES, "pm10", h0, 900.0, 1))
    assert len(recs) == 1  # device scope and unused metrics are dropped by the route
    res, _ = _feed(part, recs, now=h0 + 86_400_000, start=10)
    assert res[key]["value"] == 1  # live: the open hour's mean is 70
    res, _ = _feed(part, routed(agg(KALIWATES, "pm25", h0 + 60_000, 10.0, 1)), now=h0 + 86_400_000, start=20)
    assert res[key]["value"] == 0  # mean (70 + 10) / 2 = 40: no longer above
    # the window watermark passes the hour's end + horizon: the hour closes, a later update is ignored
    _feed(part, routed(agg(KALIWATES, "pm25", h0 + 2 * 3_600_000, 10.0, 1)), now=h0 + 86_400_000, start=30)
    assert not any(h.endswith(f"|{h0}") for h in part.state.hours)
    res, _ = _feed(part, routed(agg(KALIWATES, "pm25", h0 + 60_000, 900.0, 1)), now=h0 + 86_400_000, start=40)
    assert key not in res and part.state.late == 1


def test_malformed_input_is_dead_lettered_not_raised(catalogue):
    route = ServiceRoute(0, "t.service-events", catalogue)
    out = Outputs()
    route.process(b"{nope", 1, T0, out)
    route.process(orjson.dumps({"type": "jember.complaint.v1", "time": "yesterday"}), 2, T0, out)
    route.process(orjson.dumps({"type": "jember.other.v1"}), 3, T0, out)  # not used by the catalogue: skipped
    assert [t for t, _, _ in out.records] == ["dlq", "dlq"]
    part = _partition(catalogue)
    out = Outputs()
    part.process(b'{"k": "zz"}', 1, T0, out)
    assert [t for t, _, _ in out.records] == ["dlq"]


def test_stage_deletes_a_cell_whose_last_observation_moved(catalogue):
    # the assisted event arrives before the registration that carries the PMKS category
    part = _partition(catalogue, min_persons=1)
    reg, assisted = welfare("w-x", KALIWATES, f"hmac:{7:032x}", "PMKS02", {"registered": T0 - 1000, "assisted": T0})
    first, out = _feed(part, _route([assisted], catalogue))
    assert first[("penerima-bantuan-per-pmks.NA", KALIWATES)]["value"] == 1
    _, out = _feed(part, _route([reg], catalogue), start=1)
    msgs = [orjson.loads(v) for t, _, v in out.records if t == "indicators"]
    gone = [m for m in msgs if m.get("deleted")]
    assert {(m["indicator_id"], m["region_code"]) for m in gone} == {
        ("penerima-bantuan-per-pmks.NA", KALIWATES), ("penerima-bantuan-per-pmks.NA", KAB)}
    moved = {(m["indicator_id"], m["region_code"]): m for m in msgs if not m.get("deleted")}
    assert moved[("penerima-bantuan-per-pmks.PMKS02", KALIWATES)]["value"] == 1


def test_indicator_rows_upsert_delete_and_refuse_leaky_suppressed_cells(catalogue):
    from consumers.indicator_rows import DELETE, UPSERT, indicator_writes
    from consumers.records import BadRecord

    r = by_key(compute(catalogue, slim(known_events(), catalogue)))
    ok = r[("pengaduan-selesai-dalam-sla", KALIWATES)]
    [(sql, params)] = indicator_writes(ok)
    assert sql == UPSERT and params[0] == "pengaduan-selesai-dalam-sla" and params[5:7] == (4.0, 6.0)
    small = r[("pengaduan-selesai-dalam-sla", JOMBANG)]
    [(_, params)] = indicator_writes(small)
    assert params[4:7] == (None, None, None) and params[8] is True
    with pytest.raises(BadRecord, match="suppressed"):
        indicator_writes({**small, "value": 50.0})
    with pytest.raises(BadRecord, match="period"):
        indicator_writes({**ok, "period": "fortnight"})
    [(sql, params)] = indicator_writes({"indicator_id": "x", "region_code": KAB, "period": "month",
                                        "period_start": NOV, "deleted": True})
    assert sql == DELETE and params[:3] == ("x", KAB, "month")


def test_sensor_route_reads_what_region_merge_emits():
    """The route skips device windows by a byte prefix: the kecamatan message must keep `scope` first."""
    from stream_processors.region_merge import RegionMergePartition

    merge = RegionMergePartition(0, "t.internal.region-partials", 60_000, 0)
    out = Outputs()
    h0 = ms("2026-11-10T08:00:00+07:00")
    partial = {"kecamatan": KALIWATES, "metric": "pm25", "window_start": h0, "window_end": h0 + 60_000,
               "src": "t.ingest:0", "state": [2.0, 50.0, 70.0, 120.0, 70.0, float(h0 + 1000)], "watermark": h0}
    merge.process(orjson.dumps(partial), 0, h0, out)
    merge.flush(out)
    [(topic, _, raw)] = out.records
    assert topic == "aggregates"
    routed = Outputs()
    SensorRoute(0, "t.aggregates", load_catalogue()).process(raw, 0, h0, routed)
    [(_, key, value)] = routed.records
    assert key == b"35.09" and orjson.loads(value) == {"k": "agg", "kec": KALIWATES, "metric": "pm25", "ws": h0,
                                                     "we": h0 + 60_000, "sum": 120.0, "count": 2.0}


def test_cli_check_refuses_a_bad_catalogue_file_with_the_reason(tmp_path):
    import os
    import subprocess
    import sys

    bad = tmp_path / "katalog.yaml"
    bad.write_text("indicators:\n  - id: ok-id\n    name: Nama\n    promise: p\n    owner_agency: Dinas\n"
                   "    definition: definisi panjang\n    source: service-events\n    unit: kasus\n"
                   "    frequency: monthly\n    target: {value: 1, direction: higher}\n"
                   "    formula: {kind: percentile, field: time_to_resolve_s,"
                   " event: {type: jember.complaint.v1, status: resolved}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARUS_")}
    env["ARUS_INDICATOR_CATALOGUE_FILE"] = str(bad)
    res = subprocess.run([sys.executable, "-m", "arus.cli", "indicators", "check"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert str(bad) in res.stderr and "ok-id" in res.stderr and "needs `q`" in res.stderr
    env.pop("ARUS_INDICATOR_CATALOGUE_FILE")
    res = subprocess.run([sys.executable, "-m", "arus.cli", "indicators", "check"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "EXAMPLE" in res.stdout and "pengaduan-selesai-dalam-sla" in res.stdout


def test_a_changed_catalogue_rebuilds_the_cells_from_the_entities_held(catalogue):
    from importlib import resources

    text = resources.files("infra.indicators").joinpath("catalogue.yaml").read_text("utf-8")
    assert "value: 259200" in text
    changed = parse_catalogue(text.replace("value: 259200", "value: 172800"), "edited.yaml")  # SLA 72 h -> 48 h
    records = _route(known_events(), catalogue)
    before = _partition(catalogue)
    _feed(before, records)
    payload = orjson.loads(orjson.dumps(before.snapshot(full=True)))
    after = _partition(changed)
    after.restore(payload)
    after.drop_closed()  # the runtime calls it after a restore
    out = Outputs()
    after.flush(out)
    got = {(m["indicator_id"], m["region_code"]): m for m in (orjson.loads(v) for _, _, v in out.records)}
    expected = by_key(compute(changed, slim(known_events(), changed)))
    assert got == expected
    assert (got[("pengaduan-selesai-dalam-sla", KALIWATES)]["numerator"], got[("pengaduan-selesai-dalam-sla", KALIWATES)]["value"]) == (3, 50.0)
    # the same catalogue restores without a rebuild (nothing to emit)
    same = _partition(catalogue)
    same.restore(payload)
    same.drop_closed()
    out = Outputs()
    same.flush(out)
    assert out.records == []


def test_an_off_track_indicator_opens_one_alert_through_the_alert_rules(catalogue):
    from stream_processors.alerting.rules import IndicatorRule, parse_rules

    rules = parse_rules({"rules": [
        {"id": "sla-below-target", "type": "indicator", "indicator": "pengaduan-selesai-dalam-sla",
         "region": "35.09", "severity": "major"},
        {"id": "ambulance-at-risk", "type": "indicator", "indicator": "waktu-respons-ambulans", "when": "at_risk"},
    ]}).of_type(IndicatorRule)
    records = _route(known_events(), catalogue)
    part = _partition(catalogue, rules=rules)
    _, out = _feed(part, records)
    alerts = [orjson.loads(v) for t, _, v in out.records if t == "alerts"]
    opened = {(a["alert"]["rule_id"], a["alert"]["entity"]): a for a in alerts if a["event"]["transition"] == "opened"}
    # Kaliwates 66.7% and the kabupaten 62.5% of complaints within SLA, target 90: off track; Jombang
    # is suppressed (2 complaints) and never alerts
    assert set(opened) == {
        ("sla-below-target", f"pengaduan-selesai-dalam-sla@{KALIWATES}"),
        ("sla-below-target", f"pengaduan-selesai-dalam-sla@{KAB}"),
        ("ambulance-at-risk", f"waktu-respons-ambulans@{KALIWATES}"),
    } | {k for k in opened if k[0] == "ambulance-at-risk" and k[1].endswith(KAB)}
    sla = opened[("sla-below-target", f"pengaduan-selesai-dalam-sla@{KALIWATES}")]["alert"]
    assert sla["severity"] == "major" and sla["kecamatan"] == KALIWATES and sla["metric"] == "pengaduan-selesai-dalam-sla"
    # the alert state survives a checkpoint: the same cells again open nothing new
    restored = _partition(catalogue, rules=rules)
    restored.restore(orjson.loads(orjson.dumps(part.snapshot(full=True))))
    _, out2 = _feed(restored, records)
    assert not [1 for t, _, v in out2.records if t == "alerts" and orjson.loads(v)["event"]["transition"] == "opened"]
