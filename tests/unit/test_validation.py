
from schemas import reasons
from schemas.envelope import TELEMETRY_TYPE
from schemas.results import Ok, Rejected
from stream_processors.validation import TimePolicy, validate_telemetry
from tests.helpers import Dev

NOW = 1_790_000_000_000
POLICY = TimePolicy(max_age_ms=7 * 86_400_000, max_future_ms=300_000)


REGISTRY = {
    "wl-1": Dev("wl-1", "water_level", "35.09.19.2001"),
    "old": Dev("old", "water_level", "35.09.19", revoked=True),
}


def env(**over):
    base = {"specversion": "1.0", "id": "wl-1/1", "source": "/jember/v1/wl-1", "type": TELEMETRY_TYPE,
            "time": NOW - 1000, "subject": "wl-1", "data": {"values": {"waterLevel": 1.5}}}
    base.update(over)
    return base


def test_valid_reading_carries_kecamatan_and_values():
    result, bad = validate_telemetry(env(), REGISTRY, NOW, POLICY)
    assert isinstance(result, Ok) and not bad
    r = result.value
    assert r.kecamatan == "35.09.19" and r.values == {"waterLevel": 1.5} and r.time == NOW - 1000


def test_rfc3339_with_offset_is_accepted_and_naive_is_refused():
    ok, _ = validate_telemetry(env(time="2026-11-28T08:00:00+07:00"), REGISTRY, 1_795_827_600_000, POLICY)
    assert isinstance(ok, Ok) and ok.value.time == 1_795_827_600_000
    bad, _ = validate_telemetry(env(time="2026-11-28T08:00:00"), REGISTRY, NOW, POLICY)
    assert isinstance(bad, Rejected) and bad.reason == reasons.INVALID_TIMESTAMP


def reason_of(e):
    result, _ = validate_telemetry(e, REGISTRY, NOW, POLICY)
    assert isinstance(result, Rejected), result
    return result.reason


def test_each_bad_input_has_its_reason():
    assert reason_of([1, 2]) == reasons.INVALID_ENVELOPE
    assert reason_of(env(id="")) == reasons.INVALID_ENVELOPE
    assert reason_of(env(type="jember.other.v1")) == reasons.UNKNOWN_TYPE
    assert reason_of(env(subject="nope")) == reasons.UNKNOWN_DEVICE
    assert reason_of(env(subject="old")) == reasons.REVOKED_DEVICE
    assert reason_of(env(time=NOW - 8 * 86_400_000)) == reasons.TOO_OLD
    assert reason_of(env(time=NOW + 600_000)) == reasons.TOO_FAR_IN_FUTURE
    assert reason_of(env(data={"values": {}})) == reasons.INVALID_PAYLOAD
    assert reason_of(env(data={"values": {"pm25": 3}})) == reasons.UNKNOWN_METRIC
    assert reason_of(env(data={"values": {"waterLevel": "1"}})) == reasons.INVALID_VALUE
    assert reason_of(env(data={"values": {"waterLevel": True}})) == reasons.INVALID_VALUE
    assert reason_of(env(data={"values": {"waterLevel": float("nan")}})) == reasons.INVALID_VALUE
    assert reason_of(env(data={"values": {"waterLevel": 99.0}})) == reasons.OUT_OF_RANGE


def test_bad_values_are_rejected_one_by_one_and_good_ones_kept():
    result, bad = validate_telemetry(env(data={"values": {"waterLevel": 1.0, "flow": -5, "x": 1}}),
                                     REGISTRY, NOW, POLICY)
    assert isinstance(result, Ok) and result.value.values == {"waterLevel": 1.0}
    assert sorted(b.reason for b in bad) == [reasons.OUT_OF_RANGE, reasons.UNKNOWN_METRIC]
