"""consumers.rows: Kafka JSON -> COPY rows, and poison messages -> dead letter rows."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.rows import (
    AGGREGATES_COLUMNS,
    DEAD_LETTERS_COLUMNS,
    READINGS_COLUMNS,
    Batch,
    Kind,
    _reading_rows_careful,
    _reading_rows_fast,
    dedupe_aggregates,
    ms_to_datetime,
    parse_aggregate,
    parse_dead_letter,
    parse_reading,
    poison_row,
)
from schemas.reasons import PROCESSING_ERROR
from schemas.results import Ok, Rejected

T0 = 1767225600123  # 2026-01-01T00:00:00.123Z


def reading(**over: object) -> dict[str, object]:
    msg: dict[str, object] = {
        "id": "ev-1", "device_id": "wl-001", "kind": "water_level", "region": "35.09.01.2001",
        "time": T0, "values": {"waterLevel": 1.25, "batteryLevel": 3}, "received": T0 + 5,
    }
    msg.update(over)
    return msg


def aggregate(**over: object) -> dict[str, object]:
    msg: dict[str, object] = {
        "scope": "device", "key": "wl-001", "region": "35.09.01.2001", "metric": "waterLevel",
        "window_start": 1767225600000, "window_end": 1767225660000, "count": 3, "min": 1.0,
        "max": 2.0, "sum": 4.5, "mean": 1.5, "last": 2.0, "last_time": T0, "final": False,
    }
    msg.update(over)
    return msg


def dead_letter(**over: object) -> dict[str, object]:
    msg: dict[str, object] = {
        "id": "dl-1", "reason": "malformed_json", "message": "expected a value", "source": "mqtt",
        "device_id": "wl-001", "topic": "jember/v1/wl-001/telemetry", "partition": None, "offset": None,
        "raw": "{oops", "raw_encoding": "utf-8", "time": T0,
    }
    msg.update(over)
    return msg


def ok_value(result: Ok[object] | Rejected) -> object:
    assert isinstance(result, Ok), result
    return result.value


def rejected(result: Ok[object] | Rejected) -> Rejected:
    assert isinstance(result, Rejected), result
    assert result.reason == PROCESSING_ERROR
    return result


# --------------------------------------------------------------------------- time


def test_ms_to_datetime_is_exact_and_aware() -> None:
    dt = ms_to_datetime(T0)
    assert dt == datetime(2026, 1, 1, 0, 0, 0, 123000, tzinfo=UTC)
    assert dt.tzinfo is UTC
    # float division would round some values; the conversion must be exact for every millisecond
    for ms in (1, 999, 1_700_000_000_001, 1_767_225_599_999):
        assert ms_to_datetime(ms).timestamp() * 1000 == pytest.approx(ms, abs=1e-3)
        assert ms_to_datetime(ms).microsecond == (ms % 1000) * 1000


# --------------------------------------------------------------------------- readings


def test_reading_gives_one_row_per_metric() -> None:
    rows = ok_value(parse_reading(orjson.dumps(reading())))
    assert isinstance(rows, list)
    t = ms_to_datetime(T0)
    assert rows == [
        (t, "wl-001", "35.09.01.2001", "waterLevel", 1.25, "ev-1"),
        (t, "wl-001", "35.09.01.2001", "batteryLevel", 3.0, "ev-1"),
    ]
    assert all(type(r[4]) is float for r in rows)
    assert len(rows[0]) == len(READINGS_COLUMNS)


def test_reading_with_no_values_gives_no_rows() -> None:
    assert ok_value(parse_reading(orjson.dumps(reading(values={})))) == []


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"{not json", "not valid UTF-8 JSON"),
        (b"\xff\xfe", "not valid UTF-8 JSON"),
        (None, "null"),
        (b"[1, 2]", "must be a JSON object"),
        (orjson.dumps({k: v for k, v in reading().items() if k != "values"}), "missing field 'values'"),
        (orjson.dumps({k: v for k, v in reading().items() if k != "device_id"}), "missing field 'device_id'"),
        (orjson.dumps(reading(time="2026-01-01T00:00:00Z")), "'time' must be an integer"),
        (orjson.dumps(reading(time=10**17)), "not a representable"),
        (orjson.dumps(reading(values={"waterLevel": "high"})), "must be a number"),
        (orjson.dumps(reading(values={"waterLevel": True})), "must be a number"),
        (orjson.dumps(reading(values={"waterLevel": None})), "must be a number"),
        (orjson.dumps(reading(values=[1, 2])), "'values' must be an object"),
        (orjson.dumps(reading(device_id="wl\x00001")), "NUL"),
        (orjson.dumps(reading(values={"water\x00": 1.0})), "without NUL"),
        (orjson.dumps(reading(device_id="x" * 10_000)), "characters long"),
        (orjson.dumps(reading(id="")), "characters long"),
    ],
)
def test_poison_readings_are_rejected_with_a_clear_message(raw: bytes | None, needle: str) -> None:
    r = rejected(parse_reading(raw))
    assert needle in r.message
    assert r.message.startswith("telemetry message: ")


def test_integral_float_time_is_accepted() -> None:
    rows = ok_value(parse_reading(orjson.dumps(reading(time=float(T0)))))
    assert isinstance(rows, list) and rows[0][0] == ms_to_datetime(T0)


# --------------------------------------------------------------------------- aggregates


def test_aggregate_row() -> None:
    row = ok_value(parse_aggregate(orjson.dumps(aggregate())))
    assert row == (
        ms_to_datetime(1767225600000), "device", "wl-001", "35.09.01.2001", "waterLevel",
        ms_to_datetime(1767225660000), 3, 1.0, 2.0, 4.5, 1.5, 2.0, ms_to_datetime(T0), False,
    )
    assert isinstance(row, tuple) and len(row) == len(AGGREGATES_COLUMNS)


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"scope": "province"}, "'scope' must be one of"),
        ({"count": -1}, "out of range"),
        ({"count": 1.5}, "must be an integer"),
        ({"min": "1"}, "'min' must be a number"),
        ({"final": "yes"}, "'final' must be a boolean"),
        ({"window_start": None}, "'window_start' must be an integer"),
    ],
)
def test_poison_aggregates(over: dict[str, object], needle: str) -> None:
    r = rejected(parse_aggregate(orjson.dumps(aggregate(**over))))
    assert needle in r.message


def test_missing_aggregate_field() -> None:
    msg = aggregate()
    del msg["mean"]
    assert "missing field 'mean'" in rejected(parse_aggregate(orjson.dumps(msg))).message


def test_dedupe_aggregates_keeps_last_state_per_key() -> None:
    a1 = ok_value(parse_aggregate(orjson.dumps(aggregate(count=1))))
    b1 = ok_value(parse_aggregate(orjson.dumps(aggregate(key="wl-002", count=1))))
    a2 = ok_value(parse_aggregate(orjson.dumps(aggregate(count=2))))
    other_window = ok_value(parse_aggregate(orjson.dumps(aggregate(window_start=1767225660000, count=9))))
    out = dedupe_aggregates([a1, b1, a2, other_window])  # type: ignore[list-item]
    assert [(r[2], r[6]) for r in out] == [("wl-001", 2), ("wl-002", 1), ("wl-001", 9)]


# --------------------------------------------------------------------------- dead letters


def test_dead_letter_row() -> None:
    row = ok_value(parse_dead_letter(orjson.dumps(dead_letter(partition=2, offset=17))))
    assert row == (
        "dl-1", ms_to_datetime(T0), "malformed_json", "expected a value", "mqtt", "wl-001",
        "jember/v1/wl-001/telemetry", 2, 17, "{oops", "utf-8",
    )
    assert isinstance(row, tuple) and len(row) == len(DEAD_LETTERS_COLUMNS)


def test_dead_letter_with_nul_in_raw_is_kept_exactly_as_base64() -> None:
    row = ok_value(parse_dead_letter(orjson.dumps(dead_letter(raw="a\x00b", message="m\x00"))))
    assert isinstance(row, tuple)
    assert row[10] == "base64" and base64.b64decode(row[9]) == b"a\x00b"
    assert "\x00" not in row[3]


def test_dead_letter_base64_passes_through() -> None:
    raw = base64.b64encode(b"\xff\x00").decode()
    row = ok_value(parse_dead_letter(orjson.dumps(dead_letter(raw=raw, raw_encoding="base64"))))
    assert isinstance(row, tuple) and row[9:] == (raw, "base64")


@pytest.mark.parametrize(
    "over",
    [{"raw_encoding": "latin-1"}, {"partition": -1}, {"device_id": 5}, {"time": "now"}],
)
def test_poison_dead_letters(over: dict[str, object]) -> None:
    rejected(parse_dead_letter(orjson.dumps(dead_letter(**over))))


# --------------------------------------------------------------------------- poison rows and batches


def test_poison_row_is_deterministic_and_keeps_the_raw_bytes() -> None:
    raw = b'{"device_id": "wl-009", "values": 7, \xff'
    r = rejected(parse_reading(raw))
    kw = {"topic": "jember.telemetry", "partition": 3, "offset": 41, "timestamp_ms": T0}
    row = poison_row(r, raw, **kw)  # type: ignore[arg-type]
    assert row == poison_row(r, raw, **kw)  # type: ignore[arg-type]
    assert row[0].startswith("sink:") and len(row[0]) == 45
    # the id depends on the content and the topic only: a re-produced duplicate is the same dead letter
    assert poison_row(r, raw, topic="jember.telemetry", partition=0, offset=99, timestamp_ms=0)[0] == row[0]
    assert poison_row(r, raw, topic="jember.aggregates", partition=3, offset=41, timestamp_ms=T0)[0] != row[0]
    assert poison_row(r, raw + b" ", topic="jember.telemetry", partition=3, offset=41, timestamp_ms=T0)[0] != row[0]
    assert row[1] == ms_to_datetime(T0) and row[1].tzinfo is not None
    assert row[2] == PROCESSING_ERROR
    assert "jember.telemetry[3]@41" in row[3]
    assert row[6:9] == ("jember.telemetry", 3, 41)
    assert row[10] == "base64" and base64.b64decode(row[9]) == raw


def test_poison_row_names_the_device_when_it_can() -> None:
    raw = orjson.dumps(reading(values="x"))
    row = poison_row(rejected(parse_reading(raw)), raw, topic="t", partition=0, offset=0, timestamp_ms=T0)
    assert row[5] == "wl-001"
    assert row[9:] == (raw.decode(), "utf-8")


def test_batch_routes_messages_and_counts_poison() -> None:
    b = Batch()
    pos = {"partition": 0, "timestamp_ms": T0}
    assert b.add(Kind.TELEMETRY, orjson.dumps(reading()), topic="p.telemetry", offset=0, **pos)
    assert not b.add(Kind.TELEMETRY, b"garbage", topic="p.telemetry", offset=1, **pos)
    assert b.add(Kind.AGGREGATES, orjson.dumps(aggregate(count=1)), topic="p.aggregates", offset=0, **pos)
    assert b.add(Kind.AGGREGATES, orjson.dumps(aggregate(count=2)), topic="p.aggregates", offset=1, **pos)
    assert b.add(Kind.DLQ, orjson.dumps(dead_letter(topic="mqtt-topic")), topic="p.dlq", offset=0, **pos)
    assert not b.add(Kind.DLQ, b"{}", topic="p.dlq", offset=1, **pos)
    assert len(b.readings) == 2
    assert [r[6] for r in b.aggregate_rows()] == [2]  # last state wins within a batch
    assert [d[0][:5] for d in b.dead_letters] == ["sink:", "dl-1", "sink:"]
    assert [d[6:9] for d in b.dead_letters] == [("p.telemetry", 0, 1), ("mqtt-topic", None, None), ("p.dlq", 0, 1)]
    assert b.poison == 2
    assert len(b) == 2 + 1 + 3


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)), st.sampled_from(list(Kind)))
def test_arbitrary_bytes_never_raise(raw: bytes, kind: Kind) -> None:
    b = Batch()
    b.add(kind, raw, topic="t", partition=0, offset=0, timestamp_ms=T0)
    assert len(b) >= 0
    for row in b.dead_letters:
        assert all("\x00" not in v for v in row if isinstance(v, str))


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["id", "device_id", "region", "time", "values", "kind", "received"]),
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
                  st.dictionaries(st.text(max_size=10), st.one_of(st.floats(allow_nan=False), st.integers(),
                                                                   st.text(max_size=5)), max_size=3)),
    )
)
def test_arbitrary_json_objects_never_raise(msg: dict[str, object]) -> None:
    try:
        raw = orjson.dumps(msg)
    except (TypeError, orjson.JSONEncodeError):
        return
    result = parse_reading(raw)
    if isinstance(result, Ok):
        for row in result.value:
            assert isinstance(row[0], datetime) and row[0].tzinfo is not None
            assert isinstance(row[4], float)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {"id": st.text(max_size=600), "device_id": st.text(max_size=140), "region": st.text(max_size=70)},
        optional={
            "time": st.one_of(st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(), st.text()),
            "values": st.one_of(
                st.dictionaries(st.text(max_size=140), st.one_of(st.floats(), st.integers(-(2**63), 2**63 - 1),
                                                                  st.booleans(), st.none()), max_size=3),
                st.lists(st.integers(), max_size=2),
            ),
        },
    )
)
def test_fast_path_agrees_with_the_careful_path(msg: dict[str, object]) -> None:
    try:
        raw = orjson.dumps(msg)
    except (TypeError, orjson.JSONEncodeError):
        return
    fast = _reading_rows_fast(raw)
    careful = _reading_rows_careful(raw)
    if fast is not None:
        assert fast == careful  # whatever the fast path accepts, the careful one accepts identically


class _Rec:
    def __init__(self, value: bytes | None, offset: int) -> None:
        self.value, self.offset, self.timestamp = value, offset, T0


def test_add_records_matches_add() -> None:
    values = [orjson.dumps(reading(id=f"e{i}", time=T0 + i)) for i in range(5)] + [b"nope", None]
    one, bulk = Batch(), Batch()
    for i, v in enumerate(values):
        one.add(Kind.TELEMETRY, v, topic="t", partition=1, offset=i, timestamp_ms=T0)
    assert bulk.add_records(Kind.TELEMETRY, [_Rec(v, i) for i, v in enumerate(values)], topic="t", partition=1) == 2
    assert (bulk.readings, bulk.dead_letters, bulk.poison) == (one.readings, one.dead_letters, one.poison)
    agg = Batch()
    assert agg.add_records(Kind.AGGREGATES, [_Rec(orjson.dumps(aggregate()), 0), _Rec(b"{}", 1)],
                           topic="a", partition=0) == 1
    assert len(agg.aggregates) == 1 and len(agg.dead_letters) == 1


def test_last_seen_throttle_writes_each_device_at_most_once_per_interval_with_its_newest_time() -> None:
    from datetime import UTC, datetime, timedelta

    from consumers.sink import LastSeenThrottle

    t0 = datetime(2026, 11, 28, tzinfo=UTC)
    row = lambda dev, s: (t0 + timedelta(seconds=s), dev, "35.09.19", "waterLevel", 1.0, f"{dev}/{s}")  # noqa: E731
    th = LastSeenThrottle(5.0)
    th.add([row("a", 1), row("b", 2), row("a", 3)])
    assert th.take(100.0) == (["a", "b"], [t0 + timedelta(seconds=3), t0 + timedelta(seconds=2)])
    th.add([row("a", 4), row("a", 2)])  # an older (late) reading never moves it back
    assert th.take(102.0) == ([], [])  # within the interval: held
    assert th.has_due(105.0) and not th.has_due(104.0)
    assert th.take(105.0) == (["a"], [t0 + timedelta(seconds=4)])
    th.add([row("b", 9)])
    devices, times = th.take(106.0)
    th.restore(devices, times)  # a failed write puts them back, due at once
    assert th.take(106.5) == (["b"], [t0 + timedelta(seconds=9)])
    th.add([row("c", 1)])
    assert th.take(106.6, everything=True) == (["c"], [t0 + timedelta(seconds=1)])


def test_a_flush_splits_by_device_so_parallel_copies_touch_disjoint_keys():
    from consumers.sink import split_by_device

    rows = [(t, f"d{t % 5}", "waterLevel", float(t)) for t in range(50)]
    parts = split_by_device(rows, 2)  # type: ignore[arg-type]
    assert sorted(r for p in parts for r in p) == sorted(rows)  # nothing lost or doubled
    assert all(parts)
    devices = [{r[1] for r in p} for p in parts]
    assert not devices[0] & devices[1]
    for p in parts:  # each device's rows keep their order
        for d in {r[1] for r in p}:
            assert [r[0] for r in p if r[1] == d] == [r[0] for r in rows if r[1] == d]
