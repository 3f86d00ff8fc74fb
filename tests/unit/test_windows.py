from array import array

from hypothesis import given
from hypothesis import strategies as st

from stream_processors import windows as W


def test_window_start_aligns_to_size():
    assert W.window_start(125_000, 60_000) == 120_000
    assert W.window_start(120_000, 60_000) == 120_000


def test_add_counts_once_per_time_and_keeps_latest_by_observation_time():
    s = W.initialize(2.0, 1_000)
    assert W.add(s, 5.0, 3_000)
    assert W.add(s, 1.0, 2_000)  # out of order: counted, but not "last"
    assert not W.add(s, 9.0, 2_000)  # same time again: a duplicate
    r = W.result(s)
    assert r == {"count": 3, "min": 1.0, "max": 5.0, "sum": 8.0, "mean": 8.0 / 3, "last": 5.0, "last_time": 3000}


def test_is_closed_respects_lateness():
    assert not W.is_closed(0, 60_000, 10_000, 69_999)
    assert W.is_closed(0, 60_000, 10_000, 70_000)


@given(st.lists(st.tuples(st.integers(0, 59_999), st.floats(-1e6, 1e6)), min_size=1, max_size=60))
def test_window_equals_aggregate_of_distinct_times(readings):
    first_by_time: dict[int, float] = {}
    for t, v in readings:
        first_by_time.setdefault(t, v)
    s = W.initialize(readings[0][1], readings[0][0])
    for t, v in readings[1:]:
        W.add(s, v, t)
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
    everything = W.initialize(parts[0][0][1], parts[0][0][0], keep_times=False)
    first = True
    for part in parts:
        p = W.initialize(part[0][1], part[0][0], keep_times=False)
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
