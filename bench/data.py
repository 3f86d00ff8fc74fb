"""Deterministic, realistic load: Jember devices over the 31 kecamatan, their MQTT payloads, the
envelopes the gateway makes of them and the telemetry messages the worker emits.

Everything is derived from (tag, seed), so a load generator process and the orchestrator agree on
what was sent without passing the data around.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import orjson

from schemas.envelope import TELEMETRY_TYPE, iso_utc_ms
from schemas.regions import kecamatan_codes, load_regions
from schemas.sensors import SENSOR_KINDS

# Share of each kind in the fleet (river gauges and traffic counters dominate a city's sensors).
KIND_MIX: tuple[tuple[str, int], ...] = (
    ("water_level", 20), ("rainfall", 15), ("air_quality", 15), ("traffic_flow", 20),
    ("streetlight", 15), ("waste_container", 10), ("noise", 5),
)
# The metrics each kind reports per message: two or three, as the brief's realistic load asks.
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "water_level": ("waterLevel", "flow"),
    "rainfall": ("precipitation", "temperature", "relativeHumidity"),
    "air_quality": ("pm25", "pm10", "temperature"),
    "traffic_flow": ("intensity", "averageVehicleSpeed", "occupancy"),
    "streetlight": ("illuminanceLevel", "powerConsumption"),
    "waste_container": ("fillingLevel", "temperature"),
    "noise": ("LAeq", "LAmax"),
}
_ABBREV = {"water_level": "wl", "rainfall": "rf", "air_quality": "aq", "traffic_flow": "tf",
           "streetlight": "sl", "waste_container": "wc", "noise": "nz"}
READING_INTERVAL_MS = 10_000  # one reading per 10 s per device


@dataclass(frozen=True, slots=True)
class Device:
    device_id: str
    kind: str
    region: str  # a desa/kelurahan code
    metrics: tuple[str, ...]
    offset_ms: int  # the device's phase within a reading interval


def fleet(tag: str, n: int, seed: int = 1) -> list[Device]:
    """n devices named `{tag}-{kind}-{i}`, spread round-robin over the 31 kecamatan and their villages."""
    rng = random.Random(f"{seed}-{tag}")
    regions = load_regions()
    villages: dict[str, list[str]] = {k: [] for k in kecamatan_codes()}
    for code, r in regions.items():
        if r.level in ("desa", "kelurahan") and r.parent_code in villages:
            villages[r.parent_code].append(code)
    kecs = sorted(villages)
    kinds = [k for k, w in KIND_MIX for _ in range(w)]
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        kec = kecs[i % len(kecs)]
        region = villages[kec][(i // len(kecs)) % len(villages[kec])] if villages[kec] else kec
        out.append(Device(f"{tag}-{_ABBREV[kind]}-{i:05d}", kind, region, KIND_METRICS[kind],
                          rng.randrange(READING_INTERVAL_MS)))
    return out


def values_for(rng: random.Random, dev: Device) -> dict[str, float]:
    """Plausible values: within the lower part of each metric's range, with sensor-like precision."""
    metrics = SENSOR_KINDS[dev.kind].metrics
    out = {}
    for name in dev.metrics:
        m = metrics[name]
        span = m.max - m.min
        out[name] = round(m.min + span * (0.05 + 0.3 * rng.random()), 3)
    return out


def payload(ts_ms: int, seq: int, values: dict[str, float]) -> bytes:
    """The compact MQTT payload of the public contract."""
    return orjson.dumps({"ts": ts_ms, "seq": seq, "values": values})


def envelope(dev_id: str, ts_ms: int, seq: int, values: dict[str, float], received_ms: int) -> dict:
    """The CloudEvents envelope the gateway builds (producers.decoding._envelope), field for field."""
    return {
        "specversion": "1.0",
        "id": f"{dev_id}/{ts_ms}/{seq}",
        "source": f"/jember/v1/{dev_id}",
        "type": TELEMETRY_TYPE,
        "time": iso_utc_ms(ts_ms),
        "subject": dev_id,
        "datacontenttype": "application/json",
        "arusreceived": received_ms,
        "data": {"ts": ts_ms, "seq": seq, "values": values},
    }


@dataclass
class PreloadStats:
    messages: int = 0
    valid: int = 0  # distinct readings of registered devices: each gives one telemetry message
    duplicates: int = 0  # exact redeliveries: each gives one `duplicate` dead letter
    unknown: int = 0  # unregistered devices: each gives one `unknown_device` dead letter
    rows: int = 0  # metric values of the valid readings (readings rows)
    first_ms: int = 0
    last_ms: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def preload_envelopes(
    devices: list[Device], n: int, end_ms: int, *, seed: int = 1, duplicate_rate: float = 0.01,
    unknown_rate: float = 0.002, stats: PreloadStats | None = None,
) -> Iterator[tuple[bytes, bytes]]:
    """n (key, envelope JSON) records on jember.ingest, in event-time order, one reading per device
    per 10 s ending at end_ms; about 1% are exact redeliveries (a gateway retry) and 0.2% come from
    unregistered devices, as on a real ingest topic."""
    st = stats if stats is not None else PreloadStats()
    rng = random.Random(seed)
    order = sorted(devices, key=lambda d: d.offset_ms)
    rounds = -(-n // len(devices))
    start = end_ms - rounds * READING_INTERVAL_MS
    st.first_ms = start
    pending: list[tuple[int, int, bytes, bytes]] = []  # redeliveries: (due message no., seq, key, value)
    seq = 0
    r = 0
    while st.messages < n:
        base = start + r * READING_INTERVAL_MS
        for dev in order:
            if st.messages >= n:
                break
            if pending and pending[0][0] <= st.messages:
                _, _, k, v = heapq.heappop(pending)
                st.messages += 1
                st.duplicates += 1
                yield k, v
                continue
            ts = base + dev.offset_ms
            seq += 1
            vals = values_for(rng, dev)
            dev_id = dev.device_id
            if rng.random() < unknown_rate:
                dev_id = f"{dev.device_id.rsplit('-', 2)[0]}-ghost-{rng.randrange(50):03d}"
                st.unknown += 1
            else:
                st.valid += 1
                st.rows += len(vals)
            key = dev_id.encode()
            value = orjson.dumps(envelope(dev_id, ts, seq, vals, ts + 40))
            st.messages += 1
            st.last_ms = max(st.last_ms, ts)
            if dev_id == dev.device_id and rng.random() < duplicate_rate:
                heapq.heappush(pending, (st.messages + rng.randrange(1, 500), seq, key, value))
            yield key, value
        r += 1


def reading_msg(dev: Device, ts_ms: int, seq: int, values: dict[str, float]) -> dict:
    """A jember.telemetry message (schemas.messages.ReadingMsg)."""
    return {"id": f"{dev.device_id}/{ts_ms}/{seq}", "device_id": dev.device_id, "kind": dev.kind,
            "region": dev.region, "time": ts_ms, "values": values, "received": ts_ms + 40}


def preload_readings(
    devices: list[Device], n: int, start_ms: int, *, seed: int = 2, stats: PreloadStats | None = None
) -> Iterator[tuple[bytes, bytes]]:
    """n (key, ReadingMsg JSON) records on jember.telemetry, one per device per 10 s from start_ms."""
    st = stats if stats is not None else PreloadStats()
    rng = random.Random(seed)
    order = sorted(devices, key=lambda d: d.offset_ms)
    st.first_ms = start_ms
    r = 0
    seq = 0
    while st.messages < n:
        base = start_ms + r * READING_INTERVAL_MS
        for dev in order:
            if st.messages >= n:
                break
            ts = base + dev.offset_ms
            seq += 1
            vals = values_for(rng, dev)
            st.messages += 1
            st.valid += 1
            st.rows += len(vals)
            st.last_ms = max(st.last_ms, ts)
            yield dev.device_id.encode(), orjson.dumps(reading_msg(dev, ts, seq, vals))
        r += 1
