"""The agency simulator: valid lifecycles with personal data in clear, WIB rhythms, pacing."""

from __future__ import annotations

import random
import threading
from collections import Counter, defaultdict
from datetime import datetime

import orjson

from infra.settings import Settings
from producers.agency_simulator import (
    DAY_MS,
    WIB,
    events_for,
    is_office_time,
    next_office_time,
    run_agency_simulator,
    wib,
)
from schemas import service_events as se
from schemas.regions import load_regions
from stream_processors.outputs import Outputs
from stream_processors.service_events import ServiceEventHandler

MONDAY = int(datetime(2026, 11, 23, 0, 0, tzinfo=WIB).timestamp() * 1000)
OPENING = {"opened", "registered", "submitted", "dispatched", "visited"}


def week(rate: float = 2.0, seed: int = 7) -> list:
    return events_for(MONDAY, MONDAY + 7 * DAY_MS, rate, random.Random(seed), tag="t")


def test_every_event_is_valid_and_carries_personal_data_in_clear() -> None:
    events = week(rate=1.0)
    regions = load_regions()
    assert {e.envelope["type"] for e in events} == set(se.SERVICE_TYPES)
    clear = 0
    for e in events:
        env = e.envelope
        result = se.validate_service_event(env, regions, e.time_ms, se.SERVICE_MAX_AGE_MS, se.SERVICE_MAX_FUTURE_MS)
        assert isinstance(result, se.Ok), (env, result)
        assert e.key == result.value.entity_id.encode()
        for person_key in ("person", "reporter", "patient", "applicant"):
            person = env["data"].get(person_key)
            if person and "nik" in person:
                nik = person["nik"]
                assert nik.startswith("3509") and f"35.09.{nik[4:6]}" in regions and se.nik_problem(nik, regions) is None
                clear += 1
    assert clear > 100


def test_lifecycles_are_in_order_and_follow_office_hours() -> None:
    events = week()
    steps: dict[str, list] = defaultdict(list)
    for e in events:
        steps[e.envelope["data"].get(se.LIFECYCLES[e.envelope["type"]].entity_field)].append(e)
    complete = Counter()
    for entity, seq in steps.items():
        type_ = seq[0].envelope["type"]
        order = se.LIFECYCLES[type_].statuses
        statuses = [s.envelope["data"].get("status", "visited") for s in seq]
        assert statuses == list(order[: len(statuses)]), (entity, statuses)  # sorted by time = lifecycle order
        if len(statuses) > 1:
            complete[type_] += 1
        for s in seq:
            if type_ in (se.WELFARE_CASE, se.ADMINDUK_REQUEST):
                assert is_office_time(s.time_ms), (entity, wib(s.time_ms))
            if type_ == se.HEALTH_VISIT:
                t = wib(s.time_ms)
                assert t.weekday() < 6 and (7, 30) <= (t.hour, t.minute) < (12, 0)
            if type_ == se.COMPLAINT and s.envelope["data"]["status"] != "opened":
                assert is_office_time(s.time_ms)  # the OPD works office hours
    assert complete[se.COMPLAINT] and complete[se.EMERGENCY_DISPATCH] and complete[se.WELFARE_CASE]


def test_rhythms_and_rate() -> None:
    events = week()
    in_week = [e for e in events if e.time_ms < MONDAY + 7 * DAY_MS]
    assert 0.7 * 2 <= len(in_week) / (7 * 1440) <= 1.1 * 2
    by_hour: Counter[tuple[str, int]] = Counter()
    for e in events:
        if e.envelope["data"].get("status", "visited") in OPENING:
            by_hour[(e.envelope["type"], wib(e.time_ms).hour)] += 1
    complaints = [by_hour[(se.COMPLAINT, h)] for h in range(24)]
    assert sum(complaints[19:22]) > 3 * sum(complaints[1:4])  # evenings, not nights
    assert all(by_hour[(se.WELFARE_CASE, h)] == 0 for h in (*range(0, 7), *range(16, 24)))
    weekend = [e for e in events if e.envelope["type"] == se.WELFARE_CASE and wib(e.time_ms).weekday() >= 5]
    assert not weekend
    assert sum(by_hour[(se.EMERGENCY_DISPATCH, h)] for h in range(0, 5)) > 0  # any time


def test_next_office_time() -> None:
    friday_evening = int(datetime(2026, 11, 27, 17, 0, tzinfo=WIB).timestamp() * 1000)
    assert wib(next_office_time(friday_evening)) == datetime(2026, 11, 30, 7, 30, tzinfo=WIB)
    tuesday_10 = int(datetime(2026, 11, 24, 10, 0, tzinfo=WIB).timestamp() * 1000)
    assert next_office_time(tuesday_10) == tuesday_10


def test_the_worker_accepts_a_simulated_day_and_pseudonymises_it() -> None:
    h = ServiceEventHandler(0, "jember.ingest", b"k", se.SERVICE_MAX_AGE_MS, se.SERVICE_MAX_FUTURE_MS)
    out = Outputs()
    events = events_for(MONDAY, MONDAY + DAY_MS, 2.0, random.Random(3), tag="d")
    for i, e in enumerate(events):
        raw = orjson.dumps(e.envelope)
        h.handle(orjson.loads(raw), raw, i, e.time_ms, out)
    h.flush(out)
    assert not out.rejected_by_reason
    text = b"\n".join(v for _, _, v in out.records).decode()
    niks = {p["nik"] for e in events for k in ("person", "reporter", "patient", "applicant")
            if isinstance(p := e.envelope["data"].get(k), dict) and "nik" in p}
    assert niks and not any(n in text for n in niks)
    assert '"response_time_s"' in text


def test_run_paces_by_event_time() -> None:
    clock = [MONDAY / 1000 + 9 * 3600]  # Monday 09:00 WIB
    sent: list[tuple[str, bytes, bytes]] = []
    stop = threading.Event()

    def send(topic: str, key: bytes, value: bytes) -> None:
        sent.append((topic, key, value))
        assert orjson.loads(value)["time"] <= wib(int(clock[0] * 1000)).isoformat(timespec="milliseconds")

    class FakeStop:
        def is_set(self) -> bool:
            return stop.is_set()

        def wait(self, s: float) -> bool:
            clock[0] += 60  # a minute per tick
            return False

    result = run_agency_simulator(Settings(topic_prefix="x."), 30.0, duration=3 * 3600, seed=1,
                                  stop=FakeStop(), send=send, clock=lambda: clock[0])  # type: ignore[arg-type]
    assert result["agency_events"] == len(sent) > 1000
    assert {t for t, _, _ in sent} == {"x.ingest"}
