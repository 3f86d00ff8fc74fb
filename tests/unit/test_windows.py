from array import array

from hypothesis import given
from hypothesis import strategies as st

from stream_processors import windows as W


def test_window_start_aligns_to_size():
    assert W.window_start(125_000, 60_000) == 120_000
    assert W.window_start(120_000, 60_000) == 120_000


def test_add_counts_once_per_time_and_keeps_latest_by_observation_time():
    start = 60_000
    s = W.initialize(2.0, 61_000, start)
    s = W.add(s, 5.0, 63_000, start)
    assert s is not None
    s = W.add(s, 1.0, 62_000, start)  # out of order: counted, but not "last"
    assert s is not None
    assert W.add(s, 9.0, 62_000, start) is None  # same time again: a duplicate
    assert W.add(s, 9.0, 63_000, start) is None  # the latest time again
    assert W.add(s, 9.0, 61_000, start) is None  # the first time again
    r = W.result(s)
    assert r == {"count": 3, "min": 1.0, "max": 5.0, "sum": 8.0, "mean": 8.0 / 3, "last": 5.0, "last_time": 63_000}
    assert sorted(W.times_of(s)) == [1_000, 2_000, 3_000]
    assert len(s) == 48 + 3 * 4  # six doubles and a uint32 per time


def test_the_earlier_doubles_form_converts_to_the_same_window():
    start = 120_000
    old = [3.0, 1.0, 5.0, 8.0, 5.0, 123_000.0, 121_000.0, 123_000.0, 122_000.0]
    s = W.from_doubles(old, start)
    assert W.result(s) == {"count": 3, "min": 1.0, "max": 5.0, "sum": 8.0, "mean": 8.0 / 3, "last": 5.0,
                           "last_time": 123_000}
    assert W.times_of(s) == (1_000, 3_000, 2_000)
    assert W.add(s, 7.0, 122_000, start) is None


def test_is_closed_respects_lateness():
    assert not W.is_closed(0, 60_000, 10_000, 69_999)
    assert W.is_closed(0, 60_000, 10_000, 70_000)


@given(st.lists(st.tuples(st.integers(0, 59_999), st.floats(-1e6, 1e6)), min_size=1, max_size=60))
def test_window_equals_aggregate_of_distinct_times(readings):
    first_by_time: dict[int, float] = {}
    for t, v in readings:
        first_by_time.setdefault(t, v)
    s = W.initialize(readings[0][1], readings[0][0], 0)
    for t, v in readings[1:]:
        s = W.add(s, v, t, 0) or s
    r = W.result(s)
    values = list(first_by_time.values())
    assert r["count"] == len(first_by_time)
    assert r["min"] == min(values) and r["max"] == max(values)
    assert abs(r["sum"] - sum(values)) <= 1e-6 * max(1.0, sum(abs(v) for v in values))
    latest = max(first_by_time)
    assert r["last_time"] == latest and r["last"] == first_by_time[latest]


@given(st.lists(st.lists(st.tuples(st.integers(0, 59_999), st.floats(-1e3, 1e3)), min_size=1, max_size=10),
                min_size=1, max_size=5))
def test_merge_of_partials_equals_single_aggregate(parts):
    partials = []
    everything = W.initialize_partial(parts[0][0][1], parts[0][0][0])
    first = True
    for part in parts:
        p = W.initialize_partial(part[0][1], part[0][0])
        for t, v in part[1:]:
            W.add_unchecked(p, v, t)
        partials.append(p)
        for i, (t, v) in enumerate(part):
            if first and i == 0:
                continue
            W.add_unchecked(everything, v, t)
        first = False
    merged = W.merge(partials)
    assert merged is not None
    a, b = W.result(merged), W.result(everything)
    assert a["count"] == b["count"] and a["min"] == b["min"] and a["max"] == b["max"]
    assert abs(a["sum"] - b["sum"]) < 1e-6 * max(1.0, abs(b["sum"]))
    assert a["last_time"] == b["last_time"]


def test_merge_of_nothing_is_none():
    assert W.merge([]) is None
    assert isinstance(W.merge([array("d", [1, 1, 1, 1, 1, 1])]), array)
