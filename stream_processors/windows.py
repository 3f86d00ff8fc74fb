"""Event-time tumbling windows with allowed lateness, as compact mergeable aggregators.

A window's state is one array('d'): [count, min, max, sum, last, last_time, t1, t2, ...] where t* are
the observation times (epoch ms) already counted. Keeping the times (8 bytes each) de-duplicates by
(key, metric, time) exactly like the readings table's primary key, so the aggregate of a window always
equals the SQL aggregate of its stored readings, whatever the redelivery.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

COUNT, MIN, MAX, SUM, LAST, LAST_TIME = range(6)
HEADER = 6


def window_start(t_ms: int, size_ms: int) -> int:
    return t_ms - (t_ms % size_ms)


def initialize(value: float, t_ms: int, keep_times: bool = True) -> array:
    state = array("d", (1.0, value, value, value, value, float(t_ms)))
    if keep_times:
        state.append(float(t_ms))
    return state


def add(state: array, value: float, t_ms: int) -> bool:
    """Fold one reading into a window that keeps its times; False (and no change) for a duplicate time."""
    t = float(t_ms)
    if t > state[LAST_TIME]:
        state[LAST] = value  # "last" is the value at the highest observation time, not the last received
        state[LAST_TIME] = t
    elif t in state[HEADER:]:  # out of order: check it is not a reading we already counted
        return False
    state.append(t)
    state[COUNT] += 1.0
    if value < state[MIN]:
        state[MIN] = value
    if value > state[MAX]:
        state[MAX] = value
    state[SUM] += value
    return True


def add_unchecked(state: array, value: float, t_ms: int) -> None:
    """Fold a reading already de-duplicated upstream (region partials keep no times)."""
    t = float(t_ms)
    if t > state[LAST_TIME]:
        state[LAST] = value
        state[LAST_TIME] = t
    state[COUNT] += 1.0
    if value < state[MIN]:
        state[MIN] = value
    if value > state[MAX]:
        state[MAX] = value
    state[SUM] += value


def merge(states: Iterable[array]) -> array | None:
    """Merge partial aggregates of the same window (times are not carried over)."""
    out: array | None = None
    for s in states:
        if out is None:
            out = array("d", s[:HEADER])
            continue
        out[COUNT] += s[COUNT]
        out[MIN] = min(out[MIN], s[MIN])
        out[MAX] = max(out[MAX], s[MAX])
        out[SUM] += s[SUM]
        if s[LAST_TIME] > out[LAST_TIME]:
            out[LAST] = s[LAST]
            out[LAST_TIME] = s[LAST_TIME]
    return out


def result(state: array) -> dict[str, float | int]:
    count = int(state[COUNT])
    return {
        "count": count,
        "min": state[MIN],
        "max": state[MAX],
        "sum": state[SUM],
        "mean": state[SUM] / count if count else 0.0,
        "last": state[LAST],
        "last_time": int(state[LAST_TIME]),
    }


def is_closed(start: int, size_ms: int, lateness_ms: int, watermark: int) -> bool:
    """A window accepts no more data once the watermark passed its end plus the allowed lateness."""
    return start + size_ms + lateness_ms <= watermark
