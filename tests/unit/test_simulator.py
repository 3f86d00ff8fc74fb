"""producers.simulator: the device plan, the physics of `reading_for`, payloads and pacing."""

from __future__ import annotations

import statistics
from collections import Counter
from datetime import datetime, timedelta

import orjson
import pytest

from producers.decoding import DEVICE_ID_RE, decode_telemetry
from producers.simulator import (
    KIND_ORDER,
    WIB,
    Pacer,
    SimDevice,
    plan_devices,
    reading_for,
    telemetry_payload,
)
from schemas.regions import kecamatan_codes, load_regions
from schemas.results import Ok
from schemas.sensors import SENSOR_KINDS

WET = datetime(2025, 1, 6, tzinfo=WIB)  # a wet-season Monday
DRY = datetime(2025, 7, 7, tzinfo=WIB)  # a dry-season Monday


def device(kind: str, kec: str = "35.09.19", salt: int = 12345) -> SimDevice:
    return SimDevice(f"x-{kind}", kind, f"{kec}.1001", kec, salt, epoch_ts=False)


def hourly(start: datetime, days: int, step_min: int = 60) -> list[datetime]:
    return [start + timedelta(minutes=m) for m in range(0, days * 24 * 60, step_min)]


def at_hour(days: list[datetime], hour: float) -> list[datetime]:
    return [d.replace(hour=int(hour), minute=int(hour % 1 * 60)) for d in days]


def days(start: datetime, n: int) -> list[datetime]:
    return [start + timedelta(days=k) for k in range(n)]


# --------------------------------------------------------------------------- the device plan


def test_plan_covers_all_31_kecamatan_with_three_kinds() -> None:
    devices = plan_devices()
    kecs = kecamatan_codes()
    assert len(kecs) == 31
    assert len(devices) == 93
    assert {d.kecamatan for d in devices} == set(kecs)
    for kec in kecs:
        assert sorted(d.kind for d in devices if d.kecamatan == kec) == ["air_quality", "rainfall", "water_level"]
    regions = load_regions()
    for d in devices:
        assert DEVICE_ID_RE.match(d.device_id), d.device_id
        assert regions[d.region_code].parent_code == d.kecamatan
        assert regions[d.region_code].level in ("desa", "kelurahan")
    assert len({d.device_id for d in devices}) == len(devices)
    assert "wl-350919-01" in {d.device_id for d in devices}
    # both timestamp forms of the contract are exercised
    assert {d.epoch_ts for d in devices} == {True, False}


def test_more_devices_per_kecamatan_bring_every_kind() -> None:
    devices = plan_devices(devices_per_kecamatan=9)
    assert len(devices) == 31 * 9
    assert set(Counter(d.kind for d in devices)) == set(KIND_ORDER) == set(SENSOR_KINDS)
    assert "wl-350901-02" in {d.device_id for d in devices}
    assert len({d.device_id for d in devices}) == len(devices)


def test_plan_is_deterministic_per_seed() -> None:
    assert plan_devices(seed=7) == plan_devices(seed=7)
    assert [d.salt for d in plan_devices(seed=7)] != [d.salt for d in plan_devices(seed=8)]
    assert [d.device_id for d in plan_devices(seed=7)] == [d.device_id for d in plan_devices(seed=8)]


# --------------------------------------------------------------------------- ranges and purity


@pytest.mark.parametrize("kind", sorted(SENSOR_KINDS))
def test_values_stay_within_the_catalogue_ranges_all_year(kind: str) -> None:
    metrics = SENSOR_KINDS[kind].metrics
    for d in [dev for dev in plan_devices(7) if dev.kind == kind][:6]:
        for t in hourly(datetime(2025, 1, 1, tzinfo=WIB), 365, step_min=97):
            values = reading_for(d, t)
            assert set(values) == set(metrics)
            for name, value in values.items():
                assert isinstance(value, float | int) and not isinstance(value, bool)
                assert metrics[name].min <= value <= metrics[name].max, (d.device_id, t, name, value)


def test_reading_for_is_pure() -> None:
    d = plan_devices()[0]
    t = datetime(2025, 2, 3, 15, 30, tzinfo=WIB)
    assert reading_for(d, t) == reading_for(d, t) == reading_for(d, t.timestamp())


# --------------------------------------------------------------------------- rhythm


def test_temperature_and_humidity_follow_the_day() -> None:
    d = device("rainfall")
    afternoons = [reading_for(d, t) for t in at_hour(days(DRY, 30), 14)]
    nights = [reading_for(d, t) for t in at_hour(days(DRY, 30), 4)]
    assert statistics.mean(v["temperature"] for v in afternoons) > statistics.mean(v["temperature"] for v in nights) + 4
    assert statistics.mean(v["relativeHumidity"] for v in afternoons) < statistics.mean(
        v["relativeHumidity"] for v in nights)
    assert 20 < statistics.mean(v["temperature"] for v in afternoons + nights) < 32


def test_rain_falls_in_wet_season_afternoons() -> None:
    def rain_by_hour(start: datetime) -> Counter[int]:
        wet_hours: Counter[int] = Counter()
        for kec in kecamatan_codes():
            d = device("rainfall", kec)
            for t in hourly(start, 30, step_min=30):
                if reading_for(d, t)["precipitation"] > 0:
                    wet_hours[t.hour] += 1
        return wet_hours

    wet, dry = rain_by_hour(WET - timedelta(days=15)), rain_by_hour(DRY - timedelta(days=15))
    assert sum(wet.values()) > 4 * sum(dry.values())
    assert set(wet) <= set(range(13, 21))  # afternoon storms
    assert sum(wet.values()) > 0


def test_river_level_hovers_and_rises_after_rain_with_a_lag() -> None:
    levels = []
    peaks_lag = []
    for kec in kecamatan_codes()[::4]:
        gauge, rain = device("water_level", kec), device("rainfall", kec)
        for day in days(WET - timedelta(days=15), 30):
            ts = hourly(day, 1, step_min=20)
            level = [reading_for(gauge, t)["waterLevel"] for t in ts]
            mm = [reading_for(rain, t)["precipitation"] for t in ts]
            levels.extend(level)
            if max(mm) >= 2.0:  # a real storm that day: the river peaks hours after the rain
                rain_peak = ts[mm.index(max(mm))]
                level_peak = max(hourly(day, 2, step_min=20), key=lambda t: reading_for(gauge, t)["waterLevel"])
                peaks_lag.append((level_peak - rain_peak).total_seconds() / 3600)
    levels.sort()
    assert 0.8 <= levels[len(levels) // 2] <= 1.5  # hovers ~0.8-1.5 m
    assert levels[-1] > 2.0  # occasionally past 2 m in the wet season
    assert sum(x > 2.0 for x in levels) < 0.1 * len(levels)
    assert peaks_lag and statistics.median(peaks_lag) > 1.0  # rises after the rain, not with it
    dry = [reading_for(device("water_level"), t)["waterLevel"] for t in hourly(DRY, 20)]
    assert max(dry) < 1.6


def test_pm25_peaks_at_rush_hour_and_with_burning() -> None:
    d = device("air_quality", "35.09.19")
    rush = [reading_for(d, t)["pm25"] for t in at_hour(days(DRY, 60), 7)]
    night = [reading_for(d, t)["pm25"] for t in at_hour(days(DRY, 60), 3)]
    assert statistics.mean(rush) > 1.5 * statistics.mean(night)
    rural = device("air_quality", "35.09.10")
    evenings = [reading_for(rural, t)["pm25"] for t in at_hour(days(DRY, 90), 19.5)]
    assert max(evenings) > 60  # some dry-season evenings of burning
    wet_evenings = [reading_for(rural, t)["pm25"] for t in at_hour(days(WET, 60), 19.5)]
    assert statistics.mean(evenings) > statistics.mean(wet_evenings)


def test_streetlights_traffic_bins_and_noise() -> None:
    light = device("streetlight")
    assert reading_for(light, DRY.replace(hour=20))["illuminanceLevel"] == 1.0
    assert reading_for(light, DRY.replace(hour=2))["illuminanceLevel"] == 0.6
    noon = reading_for(light, DRY.replace(hour=12))
    assert noon["illuminanceLevel"] == 0.0 and noon["powerConsumption"] < 5

    traffic = device("traffic_flow")
    assert reading_for(traffic, DRY.replace(hour=7))["intensity"] > 3 * reading_for(traffic, DRY.replace(hour=3))[
        "intensity"]

    bin_ = device("waste_container")
    fills = [reading_for(bin_, t)["fillingLevel"] for t in hourly(DRY, 7)]
    drops = sum(1 for a, b in zip(fills, fills[1:], strict=False) if b < a - 0.2)
    assert drops >= 2  # emptied every 2-3 days

    noise = device("noise")
    assert reading_for(noise, DRY.replace(hour=17))["LAeq"] > reading_for(noise, DRY.replace(hour=2))["LAeq"]
    for t in hourly(DRY, 2):
        v = reading_for(noise, t)
        assert v["LAmax"] >= v["LAeq"]


# --------------------------------------------------------------------------- payloads


def test_payloads_follow_the_contract_and_decode() -> None:
    rfc, epoch = (next(d for d in plan_devices() if d.epoch_ts is flag) for flag in (False, True))
    now_ms = 1_736_150_400_123
    for d in (rfc, epoch):
        values = reading_for(d, now_ms / 1000)
        payload = telemetry_payload(d, now_ms, 17, values)
        doc = orjson.loads(payload)
        assert doc["seq"] == 17 and doc["values"] == values
        if d.epoch_ts:
            assert doc["ts"] == now_ms
        else:
            assert doc["ts"].endswith("+07:00") and ".123" in doc["ts"]
        result = decode_telemetry(f"jember/v1/{d.device_id}/telemetry", payload, now_ms, 65536)[0]
        assert isinstance(result, Ok)
        assert result.value["id"] == f"{d.device_id}/{now_ms}/17"


# --------------------------------------------------------------------------- pacing


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds + 0.0002  # a real sleep overshoots a little


@pytest.mark.parametrize("rate", [1, 7.5, 200, 5000, 20000])
def test_pacer_keeps_the_rate_without_spinning(rate: float) -> None:
    clock = FakeClock()
    pacer = Pacer(rate, total=rate * 10, clock=clock, sleep=clock.sleep)
    taken = 0
    while (n := pacer.take()) >= 0:
        assert 1 <= n <= max(1, rate * 0.05)
        taken += n
        clock.now += n * 2e-6  # the work of publishing
    assert taken == int(rate * 10)
    elapsed = clock.now - 1000.0
    assert elapsed == pytest.approx(10, abs=0.05 + 1 / rate)
    assert all(s >= 0.001 for s in clock.slept)  # never a zero-length sleep: no busy loop
    assert len(clock.slept) <= taken + 1


def test_pacer_stops_when_asked() -> None:
    clock = FakeClock()
    stop = [False]
    pacer = Pacer(10, clock=clock, sleep=clock.sleep, stopped=lambda: stop[0])
    assert pacer.take() == 1
    stop[0] = True
    assert pacer.take() == -1
