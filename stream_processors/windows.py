"""Event-time tumbling windows with allowed lateness, as compact mergeable aggregators.

A device window (one per device, metric and window start) is an immutable `bytes`: six little-endian
doubles [count, min, max, sum, last, last_time] followed by one uint32 per observation time already
counted, as milliseconds after the window start. Keeping the times de-duplicates by (key, metric, time)
exactly like the readings table's primary key, so the aggregate of a window always equals the SQL
aggregate of its stored readings, whatever the redelivery. `bytes` rather than array('d'): one
allocation of 33 + 48 + 4n bytes instead of an 80-byte object plus 8n-byte times (about 110 instead of
176 bytes at six readings: the per-key memory bar of issue 10). An update builds a new `bytes`.

A kecamatan partial (times de-duplicated upstream) stays a mutable array('d') of the six header values.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterable

COUNT, MIN, MAX, SUM, LAST, LAST_TIME = range(6)
HEADER = 6
_HEAD = struct.Struct("<6d")
_TIME = struct.Struct("<I")
_HEAD_BYTES = _HEAD.size


def window_start(t_ms: int, size_ms: int) -> int:
    return t_ms - (t_ms % size_ms)


def initialize(value: float, t_ms: int, start: int) -> bytes:
    """A device window holding its first reading (`start` is the window start, <= t_ms)."""
    return _HEAD.pack(1.0, value, value, value, value, float(t_ms)) + _TIME.pack(t_ms - start)


def add(state: bytes, value: float, t_ms: int, start: int) -> bytes | None:
    """The device window with one more reading, or None for a time counted already (a duplicate)."""
    count, lo, hi, total, last, last_t = _HEAD.unpack_from(state)
    t = float(t_ms)
    if t > last_t:
        last, last_t = value, t  # "last" is the value at the highest observation time, not the last received
    elif t == last_t or (t_ms - start) in times_of(state):
        return None  # out of order and already counted
    return _HEAD.pack(count + 1.0, value if value < lo else lo, value if value > hi else hi, total + value,
                      last, last_t) + state[_HEAD_BYTES:] + _TIME.pack(t_ms - start)


def times_of(state: bytes) -> tuple[int, ...]:
    """The observation times counted in a device window, as ms after its start."""
    return struct.unpack_from(f"<{(len(state) - _HEAD_BYTES) // 4}I", state, _HEAD_BYTES)


def from_doubles(values: Iterable[float], start: int) -> bytes:
    """A device window from the earlier array('d') form [header..., absolute times...] (old checkpoints)."""
    v = list(values)
    return _HEAD.pack(*v[:HEADER]) + b"".join(_TIME.pack(int(t) - start) for t in v[HEADER:])


def initialize_partial(value: float, t_ms: int) -> array:
    """A kecamatan partial holding its first reading."""
    return array("d", (1.0, value, value, value, value, float(t_ms)))


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


def result(state: bytes | array) -> dict[str, float | int]:
    count, lo, hi, total, last, last_t = _HEAD.unpack_from(state) if isinstance(state, bytes) else state[:HEADER]
    n = int(count)
    return {
        "count": n,
        "min": lo,
        "max": hi,
        "sum": total,
        "mean": total / n if n else 0.0,
        "last": last,
        "last_time": int(last_t),
    }


def is_closed(start: int, size_ms: int, lateness_ms: int, watermark: int) -> bool:
    """A window accepts no more data once the watermark passed its end plus the allowed lateness."""
    return start + size_ms + lateness_ms <= watermark
