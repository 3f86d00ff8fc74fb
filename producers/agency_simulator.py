"""Simulated agency systems producing CloudEvents straight to jember.ingest with kafka-python.

The agencies of Kabupaten Jember, on Jember's calendar (WIB, UTC+7):
- Dinas Sosial (welfare cases, PMKS) and Dispendukcapil (civil registration): office hours,
  Monday to Friday 07:30-16:00; their follow-up steps (verification, assistance, completion) also happen
  in office hours, days later;
- puskesmas (clinic visits): mornings, Monday to Saturday 07:30-12:00, busiest around 09:00;
- the complaint desk: any time, quiet at night, peaking in the evening (19:00-21:00) when people are
  home; assignment and resolution by the responsible OPD follow during office hours;
- emergency dispatch (PSC 119): any time, a little more at commuting hours; arrival 8-40 minutes later.

Each lifecycle is generated whole when it opens (a complaint opened -> assigned -> resolved, a welfare
case registered -> verified -> assisted -> closed, dispatched -> arrived, submitted -> completed) and its
steps are produced when their event time comes. Persons carry fake but structurally valid NIKs (16
digits, 3509 + a real kecamatan, a birth date, a serial), names and phone numbers IN CLEAR: this
simulates agencies producing straight to Kafka, the path where the worker pseudonymises them.

Records are keyed by entity id (same entity, same partition: its lifecycle is tracked there).
`events_for` is pure (a seeded RNG, no clock, no I/O); `run_agency_simulator` paces and produces.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import cache, lru_cache
from typing import Any

import orjson

from infra.settings import Settings
from schemas.regions import load_regions
from schemas.service_events import (
    ADMINDUK_REQUEST,
    COMPLAINT,
    EMERGENCY_DISPATCH,
    HEALTH_VISIT,
    WELFARE_CASE,
    load_pmks_categories,
    synthetic_nik,
)

log = logging.getLogger("arus.simulator.agency")

WIB = timezone(timedelta(hours=7), "WIB")
MIN_MS = 60_000
HOUR_MS = 60 * MIN_MS
DAY_MS = 24 * HOUR_MS
LOOKAHEAD_MS = 3 * DAY_MS

FIRST_NAMES = ("Siti", "Ahmad", "Dewi", "Bambang", "Sri", "Agus", "Nur", "Eko", "Rina", "Hadi", "Yuli", "Budi",
               "Lilik", "Sugeng", "Endang", "Wahyu", "Fitri", "Slamet", "Ika", "Moh.")
LAST_NAMES = ("Rahayu", "Hidayat", "Lestari", "Susanto", "Wulandari", "Setiawan", "Fauzi", "Kurniawan",
              "Maulana", "Handayani", "Prasetyo", "Hasanah", "Santoso", "Aminah", "Syafii")
COMPLAINTS = {  # category -> responsible OPD
    "jalan_rusak": "dpupr", "sampah": "dlh", "lampu_jalan": "dishub", "banjir": "bpbd", "air_bersih": "pdam",
    "pelayanan_publik": "ortala", "bansos": "dinsos", "kesehatan": "dinkes",
}
COMPLAINT_CATEGORIES = tuple(COMPLAINTS)
CHANNELS = ("wa", "web", "phone", "walk_in", "sosmed")
ADMINDUK_SERVICES = ("KTP", "KK", "akta_kelahiran", "akta_kematian", "pindah_datang")
VISIT_SERVICES = ("umum", "kia", "gigi", "imunisasi", "lansia")
INCIDENTS = ("medical", "accident", "maternal", "fire")
PROGRAMS = ("PKH", "BPNT", "KIS", "PBI", "rutilahu")

SOURCES = {
    WELFARE_CASE: "sim.dinsos.jemberkab.go.id/siks",
    COMPLAINT: "sim.lapor.jemberkab.go.id",
    HEALTH_VISIT: "sim.dinkes.jemberkab.go.id/simpus",
    EMERGENCY_DISPATCH: "sim.psc119.jemberkab.go.id",
    ADMINDUK_REQUEST: "sim.dispendukcapil.jemberkab.go.id",
}
# share of all events, and the mean number of events of one lifecycle (so `rate` counts events)
SHARES = {COMPLAINT: 0.30, HEALTH_VISIT: 0.30, WELFARE_CASE: 0.15, ADMINDUK_REQUEST: 0.15, EMERGENCY_DISPATCH: 0.10}
EVENTS_PER_LIFECYCLE = {COMPLAINT: 2.85, HEALTH_VISIT: 1.0, WELFARE_CASE: 3.2, ADMINDUK_REQUEST: 1.95,
                        EMERGENCY_DISPATCH: 2.0}


# --------------------------------------------------------------------------- calendar


def wib(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, WIB)


def _hour(ms: int) -> float:
    t = wib(ms)
    return t.hour + t.minute / 60


def is_office_time(ms: int) -> bool:
    """Monday-Friday 07:30-16:00 WIB (Dinsos, Dispendukcapil)."""
    return wib(ms).weekday() < 5 and 7.5 <= _hour(ms) < 16.0


def next_office_time(ms: int) -> int:
    """`ms` when it is office time, else the next opening at 07:30 WIB on a weekday."""
    if is_office_time(ms):
        return ms
    t = wib(ms)
    day = t.replace(hour=7, minute=30, second=0, microsecond=0)
    if _hour(ms) >= 7.5:
        day += timedelta(days=1)
    while day.weekday() >= 5:
        day += timedelta(days=1)
    return int(day.timestamp() * 1000)


def intensity(type_: str, ms: int) -> float:
    """Relative rate of openings of `type_` at `ms` (WIB daily and weekly rhythm)."""
    h, weekday = _hour(ms), wib(ms).weekday()
    if type_ in (WELFARE_CASE, ADMINDUK_REQUEST):
        if not is_office_time(ms):
            return 0.0
        return 1.3 if h < 12 else 0.8  # queues in the morning
    if type_ == HEALTH_VISIT:
        if weekday == 6 or not 7.5 <= h < 12.0:
            return 0.0
        return 0.6 + 1.2 * math.exp(-((h - 9.0) ** 2) / 2.0)  # busiest around 09:00
    if type_ == COMPLAINT:
        base = 0.15 if h < 5 else 0.8
        return base + 1.8 * math.exp(-((h - 20.0) ** 2) / 3.0)  # evenings at home
    if type_ == EMERGENCY_DISPATCH:
        return 0.8 + 0.5 * math.exp(-((h - 7.0) ** 2)) + 0.5 * math.exp(-((h - 17.0) ** 2) / 2.0)
    return 1.0


@cache
def mean_intensity(type_: str) -> float:
    """Average of `intensity` over a week (15-minute steps), to scale the rate."""
    start = int(datetime(2024, 1, 1, tzinfo=WIB).timestamp() * 1000)  # a Monday
    steps = [intensity(type_, start + k * 15 * MIN_MS) for k in range(7 * 24 * 4)]
    return sum(steps) / len(steps)


# --------------------------------------------------------------------------- generation


@dataclass(order=True)
class Scheduled:
    time_ms: int
    seq: int
    key: bytes = field(compare=False)
    envelope: dict[str, Any] = field(compare=False)


@lru_cache(maxsize=1)
def _places() -> tuple[list[str], dict[str, list[str]]]:
    regions = load_regions()
    kecs = sorted(c for c, r in regions.items() if r.level == "kecamatan")
    villages: dict[str, list[str]] = {k: [] for k in kecs}
    for code, r in regions.items():
        if r.level in ("desa", "kelurahan") and r.parent_code in villages:
            villages[r.parent_code].append(code)
    return kecs, {k: sorted(v) for k, v in villages.items()}


@lru_cache(maxsize=1)
def _pmks_codes() -> tuple[str, ...]:
    return tuple(sorted(load_pmks_categories()))


def _person(rng: random.Random, kec: str, phone: bool = True) -> dict[str, Any]:
    year, month, day = rng.randint(1945, 2005), rng.randint(1, 12), rng.randint(1, 28)
    female = rng.random() < 0.5
    person: dict[str, Any] = {
        "nik": synthetic_nik(kec, day, month, year, rng.randint(1, 9999), female=female),
        "name": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
    }
    if phone:
        person["phone"] = f"08{rng.randint(11, 59)}{rng.randrange(10**8):08d}"
    return person


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 30:  # normal approximation
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def _iso(ms: int) -> str:
    return wib(ms).isoformat(timespec="milliseconds")


class _Builder:
    def __init__(self, rng: random.Random, tag: str) -> None:
        self.rng = rng
        self.tag = tag
        self.n = 0
        self.out: list[Scheduled] = []

    def emit(self, type_: str, entity: str, t_ms: int, region: str, data: dict[str, Any]) -> None:
        self.n += 1
        env = {
            "specversion": "1.0", "id": f"{self.tag}-{self.n}", "source": SOURCES[type_], "type": type_,
            "time": _iso(t_ms), "region": region, "subject": entity, "datacontenttype": "application/json",
            "data": data,
        }
        self.out.append(Scheduled(t_ms, self.n, entity.encode(), env))

    def lifecycle(self, type_: str, t: int) -> None:
        rng = self.rng
        kecs, villages = _places()
        kec = rng.choice(kecs)
        region = rng.choice(villages[kec]) if villages[kec] and rng.random() < 0.8 else kec
        entity = f"{type_.split('.')[1][:3].upper()}-{self.tag}-{self.n + 1}"
        if type_ == COMPLAINT:
            category = rng.choice(COMPLAINT_CATEGORIES)
            agency = COMPLAINTS[category]
            self.emit(type_, entity, t, region, {
                "complaint_id": entity, "status": "opened", "category": category, "agency": agency,
                "channel": rng.choice(CHANNELS), "reporter": _person(rng, kec)})
            assigned = next_office_time(t + int(rng.uniform(5, 90) * MIN_MS))
            self.emit(type_, entity, assigned, region, {"complaint_id": entity, "status": "assigned", "agency": agency})
            if rng.random() < 0.85:  # some stay open (they breach their SLA)
                resolved = next_office_time(assigned + int(rng.expovariate(1 / 20) * HOUR_MS) + 30 * MIN_MS)
                self.emit(type_, entity, resolved, region, {"complaint_id": entity, "status": "resolved",
                                                            "agency": agency})
        elif type_ == WELFARE_CASE:
            person = _person(rng, kec)
            self.emit(type_, entity, t, region, {
                "case_id": entity, "status": "registered", "person": person,
                "pmks_category": rng.choice(_pmks_codes()), "program": rng.choice(PROGRAMS)})
            verified = next_office_time(t + int(rng.uniform(0.5, 10) * DAY_MS))
            self.emit(type_, entity, verified, region, {"case_id": entity, "status": "verified", "person": person})
            if rng.random() < 0.7:
                assisted = next_office_time(verified + int(rng.uniform(2, 30) * DAY_MS))
                self.emit(type_, entity, assisted, region, {"case_id": entity, "status": "assisted",
                                                            "person": person})
                if rng.random() < 0.7:
                    closed = next_office_time(assisted + int(rng.uniform(30, 180) * DAY_MS))
                    self.emit(type_, entity, closed, region, {"case_id": entity, "status": "closed"})
        elif type_ == ADMINDUK_REQUEST:
            self.emit(type_, entity, t, region, {
                "request_id": entity, "status": "submitted", "service": rng.choice(ADMINDUK_SERVICES),
                "channel": rng.choice(("loket", "online", "desa")), "applicant": _person(rng, kec, phone=False)})
            if rng.random() < 0.95:
                done = next_office_time(t + int(rng.expovariate(1 / 18) * HOUR_MS) + 20 * MIN_MS)
                self.emit(type_, entity, done, region, {"request_id": entity, "status": "completed"})
        elif type_ == EMERGENCY_DISPATCH:
            unit = f"AMB-{rng.randint(1, 24):02d}"
            self.emit(type_, entity, t, region, {
                "dispatch_id": entity, "status": "dispatched", "unit": unit,
                "incident_category": rng.choice(INCIDENTS), "patient": _person(rng, kec, phone=False)})
            self.emit(type_, entity, t + int(rng.uniform(8, 40) * MIN_MS), region,
                      {"dispatch_id": entity, "status": "arrived", "unit": unit})
        elif type_ == HEALTH_VISIT:
            self.emit(type_, entity, t, region, {
                "visit_id": entity, "puskesmas": f"PKM {load_regions()[kec].name}",
                "service": rng.choice(VISIT_SERVICES), "patient": _person(rng, kec)})


def events_for(start_ms: int, end_ms: int, rate_per_min: float, rng: random.Random, tag: str = "sim") -> list[Scheduled]:
    """Every event of the lifecycles that open in [start_ms, end_ms), sorted by event time.

    `rate_per_min` is the mean number of events per minute over a week (all agencies; more in office
    hours and evenings, fewer at night). Follow-up steps may lie after `end_ms` (their event time).
    """
    b = _Builder(rng, tag)
    minute = start_ms - start_ms % MIN_MS
    while minute < end_ms:
        lo, hi = max(minute, start_ms), min(minute + MIN_MS, end_ms)
        span = (hi - lo) / MIN_MS
        for type_, share in SHARES.items():
            mean = mean_intensity(type_)
            lam = rate_per_min * share / EVENTS_PER_LIFECYCLE[type_] * intensity(type_, lo) / mean * span
            for _ in range(_poisson(rng, lam)):
                b.lifecycle(type_, int(rng.uniform(lo, hi)))
        minute += MIN_MS
    return sorted(b.out)


# --------------------------------------------------------------------------- the run


def _producer(bootstrap: str) -> Any:
    from kafka import KafkaProducer  # kafka-python: what an agency system would use

    return KafkaProducer(bootstrap_servers=[b.strip() for b in bootstrap.split(",") if b.strip()],
                         client_id="arus-agency-simulator", acks="all", retries=10, linger_ms=20)


def run_agency_simulator(
    settings: Settings, rate_per_min: float, duration: float = 0.0, seed: int | None = None,
    stop: threading.Event | None = None, *,
    send: Callable[[str, bytes, bytes], None] | None = None, clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """Produce agency events at `rate_per_min` (weekly mean) for `duration` s (0: until `stop`).

    Each second, lifecycles opening in the elapsed second are generated and every event whose time
    has come is produced. Steps more than `LOOKAHEAD_MS` (3 days) ahead are not kept: they would pile up
    in memory (a welfare case closes months later) and a simulator run rarely lasts that long.
    """
    if rate_per_min <= 0:
        return {"agency_events": 0}
    stop = stop or threading.Event()
    topic = settings.topic("ingest")
    producer = None
    if send is None:
        if not settings.kafka_bootstrap:
            log.warning("ARUS_KAFKA_BOOTSTRAP is not set: no agency events")
            return {"agency_events": 0}
        producer = _producer(settings.kafka_bootstrap)

        def send(t: str, k: bytes, v: bytes) -> None:
            producer.send(t, key=k, value=v)

    rng = random.Random(seed)  # noqa: S311 - simulated data, not security
    tag = f"{rng.getrandbits(32):08x}"
    pending: list[Scheduled] = []
    started = clock()
    last = int(started * 1000)
    sent = 0
    try:
        while not stop.is_set():
            now = int(clock() * 1000)
            for item in events_for(last, now, rate_per_min, rng, tag):
                if item.time_ms <= now + LOOKAHEAD_MS:
                    heapq.heappush(pending, item)
            last = now
            while pending and pending[0].time_ms <= now:
                item = heapq.heappop(pending)
                send(topic, item.key, orjson.dumps(item.envelope))
                sent += 1
            if producer is not None:
                producer.flush(timeout=30)
            if duration > 0 and clock() - started >= duration:
                break
            stop.wait(1.0)
    finally:
        if producer is not None:
            producer.close(timeout=10)
    log.info("agency simulator: %d events produced, %d steps still ahead", sent, len(pending))
    return {"agency_events": sent, "agency_pending": len(pending)}


def start_in_thread(settings: Settings, rate_per_min: float, duration: float, seed: int | None,
                    ) -> tuple[threading.Thread, threading.Event, dict[str, Any]]:
    """The agency simulator beside the telemetry simulator: (thread, stop event, result dict)."""
    stop = threading.Event()
    result: dict[str, Any] = {}

    def main() -> None:
        try:
            result.update(run_agency_simulator(settings, rate_per_min, duration, seed, stop))
        except Exception as exc:  # noqa: BLE001 - the telemetry simulator goes on
            log.error("agency simulator stopped: %s", exc)
            result["agency_error"] = str(exc)

    thread = threading.Thread(target=main, name="agency-simulator", daemon=True)
    thread.start()
    return thread, stop, result


def summary(events: Sequence[Scheduled]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in events:
        counts[e.envelope["type"]] = counts.get(e.envelope["type"], 0) + 1
    return counts

