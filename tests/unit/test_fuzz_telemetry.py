"""Fuzzing the device path with hypothesis: 12,000 generated payloads (random bytes, random JSON,
mutations of valid readings and FIWARE entities) through the gateway's decoding and the worker's
validation and windows. Nothing raises; every input ends either as accepted readings or as a dead
letter with a known reason code; valid readings interleaved with the garbage still land."""

from __future__ import annotations

import math
import time
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra.devices import Device
from producers.decoding import decode_telemetry
from schemas import reasons, topics
from schemas.results import Rejected
from stream_processors.outputs import Outputs
from stream_processors.telemetry import TelemetryPartition
from stream_processors.validation import TimePolicy

NOW_MS = int(time.time() * 1000)
DEVICE = "wl-fuzz-01"
TOPIC = f"jember/v1/{DEVICE}/telemetry"
REGISTRY = {DEVICE: Device(DEVICE, "water_level", "35.09.19.2001", False)}
MAX_BYTES = 4096
FUZZ = settings(max_examples=4000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
)
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)), max_leaves=20)
timestamps = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63),
    st.just(NOW_MS), st.integers(min_value=NOW_MS - 3_600_000, max_value=NOW_MS + 60_000),
    st.text(max_size=30), st.sampled_from(["2026-11-28T10:00:00+07:00", "2026-11-28T10:00:00", "1e400",
                                          "0000-00-00T00:00:00Z", "9999-12-31T23:59:59Z"]),
    st.floats(allow_nan=True, allow_infinity=True),
)
metric_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.text(max_size=10),
                          st.none(), st.booleans(), st.lists(st.integers(), max_size=2))
metric_names = st.one_of(st.sampled_from(["waterLevel", "pm25", "precipitation", "'; DROP TABLE readings;--",
                                          "../../etc/passwd", "waterLevel\x00", ""]), st.text(max_size=20))
compact = st.fixed_dictionaries(
    {"ts": timestamps, "values": st.dictionaries(metric_names, metric_values, max_size=4)},
    optional={"seq": st.one_of(st.integers(), st.text(max_size=5)), "extra": json_value},
)
fiware = st.fixed_dictionaries({
    "id": st.text(max_size=30), "type": st.sampled_from(["WaterObserved", "FloodMonitoring", "Bogus", ""]),
    "dateObserved": timestamps,
}, optional={"waterLevel": st.one_of(metric_values, st.fixed_dictionaries(
    {"type": st.just("Number"), "value": metric_values}))})


def _json_dumps(obj: Any) -> bytes:
    # hypothesis may build NaN/Infinity or huge ints orjson refuses: write them as Python's json would
    import json

    return json.dumps(obj, allow_nan=True).encode()


def _run(payload: bytes) -> tuple[int, list[str]]:
    """Gateway decoding then the worker's partition; returns (readings accepted, reasons rejected)."""
    reasons_seen: list[str] = []
    accepted = 0
    part = TelemetryPartition(0, "fuzz.ingest", 60_000, 600_000, TimePolicy(7 * 86_400_000, 300_000),
                              lambda: REGISTRY)
    for i, result in enumerate(decode_telemetry(TOPIC, payload, NOW_MS, MAX_BYTES)):
        if isinstance(result, Rejected):
            reasons_seen.append(result.reason)
            continue
        out = Outputs()
        part.process(orjson.dumps(result.value), i, NOW_MS, out)
        for topic, _key, value in out.records:
            msg = orjson.loads(value)
            if topic == topics.TELEMETRY:
                accepted += 1
                assert all(math.isfinite(v) for v in msg["values"].values())
            elif topic == topics.DLQ:
                reasons_seen.append(msg["reason"])
                assert msg["message"], "every rejection explains itself"
    return accepted, reasons_seen


def _check(payload: bytes) -> None:
    accepted, seen = _run(payload)
    assert accepted or seen, "an input must end accepted or dead-lettered"
    assert set(seen) <= set(reasons.ALL), f"unknown reason codes {set(seen) - set(reasons.ALL)}"


@FUZZ
@given(st.binary(max_size=6000))
def test_random_bytes(payload: bytes) -> None:
    _check(payload)


@FUZZ
@given(st.one_of(compact, st.lists(compact, min_size=0, max_size=4), fiware, json_value))
def test_structured_garbage(doc: Any) -> None:
    _check(_json_dumps(doc))


@FUZZ
@given(st.integers(min_value=0, max_value=200), st.binary(min_size=1, max_size=8), st.booleans())
def test_mutated_valid_payloads_and_valid_traffic_keeps_flowing(at: int, junk: bytes, keep_valid: bool) -> None:
    valid = orjson.dumps({"ts": NOW_MS - 5_000, "values": {"waterLevel": 1.5}})
    mutated = valid[:at] + junk + valid[at + len(junk):]
    _check(mutated)
    if keep_valid:  # a valid reading right after the garbage still lands
        accepted, seen = _run(valid)
        assert accepted == 1 and not seen
