"""Pure maths and reporting of the benchmark: percentiles, steady-state rates, the product's bars,
the JSON document and the table. No I/O here (unit-tested in tests/unit/test_bench.py)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# The keys `--out` always writes (null when a stage did not run or failed).
REQUIRED_KEYS = (
    "transport_eps", "gateway_eps", "worker_eps_per_core", "sink_rows_per_s", "copy_rows_per_s",
    "e2e_eps", "publish_to_row_p99_ms", "alert_latency_p99_ms", "window_state_bytes_per_key",
)


@dataclass(frozen=True)
class Bar:
    """A quality bar of the product (shared/PRODUCT.md, issue 10)."""

    key: str
    label: str
    unit: str
    bar: float | None  # None: no bar of its own (a reference figure)
    higher_is_better: bool = True
    goal: float | None = None  # a stricter goal beside the bar (alert latency: 100 ms)


BARS: tuple[Bar, ...] = (
    Bar("transport_eps", "transport: raw aiokafka consume", "msg/s", None),
    Bar("transport_produce_eps", "transport: raw aiokafka produce", "msg/s", None),
    Bar("gateway_eps", "gateway: MQTT -> Kafka ingest", "events/s", None),
    Bar("worker_eps_per_core", "worker: events per CPU second", "events/s/core", 20_000.0),
    Bar("worker_eps_wall", "worker: events per wall second", "events/s", None),
    Bar("sink_rows_per_s", "sink: readings rows per second", "rows/s", 150_000.0),
    Bar("sink_rows_per_cpu_s", "sink: rows per sink CPU second", "rows/s/core", 150_000.0),
    Bar("copy_rows_per_s", "plain COPY into an unlogged table", "rows/s", None),
    Bar("e2e_eps", "end to end MQTT -> PostgreSQL, sustained", "events/s", 10_000.0),
    Bar("publish_to_row_p50_ms", "publish -> row, p50 (moderate rate)", "ms", 1_000.0, False, 100.0),
    Bar("publish_to_row_p99_ms", "publish -> row, p99 (moderate rate)", "ms", 1_000.0, False, 100.0),
    Bar("alert_latency_p50_ms", "publish -> alert on SSE, p50", "ms", 1_000.0, False, 100.0),
    Bar("alert_latency_p99_ms", "publish -> alert on SSE, p99", "ms", 1_000.0, False, 100.0),
    Bar("window_state_bytes_per_key", "window state per active key", "bytes", 250.0, False),
)
BAR_BY_KEY = {b.key: b for b in BARS}


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's
    default); None for no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, not {q}")
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    frac = pos - lo
    return data[lo] + (data[hi] - data[lo]) * frac


def latency_summary(values_ms: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, p50, p90, p99, max of latencies in ms (rounded to 0.1 ms)."""

    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 1)

    return {
        "count": len(values_ms),
        "mean": r(sum(values_ms) / len(values_ms)) if values_ms else None,
        "p50": r(percentile(values_ms, 50)),
        "p90": r(percentile(values_ms, 90)),
        "p99": r(percentile(values_ms, 99)),
        "max": r(max(values_ms)) if values_ms else None,
    }


@dataclass(frozen=True)
class Sample:
    """One observation of a stage: wall time (monotonic s), items done, CPU seconds of the system
    under test (0 when not measured)."""

    t: float
    count: float
    cpu: float = 0.0


@dataclass(frozen=True)
class Window:
    seconds: float
    count: float
    cpu: float

    @property
    def rate(self) -> float | None:
        return self.count / self.seconds if self.seconds > 0 else None

    @property
    def per_cpu(self) -> float | None:
        return self.count / self.cpu if self.cpu > 0 else None


def steady_window(samples: Sequence[Sample], target: float) -> Window | None:
    """The interval from the last observation before output started to the first observation at or
    past `target`: it leaves out start-up (imports, group join, restore) but keeps all processing.

    None when no output was observed at all.
    """
    if not samples:
        return None
    start = None
    for i, s in enumerate(samples):
        if s.count > samples[0].count:
            start = max(0, i - 1)
            break
    if start is None:
        return None
    end = len(samples) - 1
    for j in range(start, len(samples)):
        if samples[j].count >= target:
            end = j
            break
    a, b = samples[start], samples[end]
    return Window(b.t - a.t, b.count - a.count, b.cpu - a.cpu)


def window_between(samples: Sequence[Sample], t0: float, t1: float) -> Window | None:
    """Change between the last sample at or before t0 and the first at or after t1 (None if the
    samples do not cover the interval)."""
    before = [s for s in samples if s.t <= t0]
    after = [s for s in samples if s.t >= t1]
    if not before or not after:
        return None
    a, b = before[-1], after[0]
    return Window(b.t - a.t, b.count - a.count, b.cpu - a.cpu)


def ratio(key: str, value: float | None) -> float | None:
    """value / bar (None without a bar or a value). Above 1 is good for throughput; for latency and
    memory (lower is better) below 1 is good."""
    bar = BAR_BY_KEY.get(key)
    if bar is None or bar.bar is None or value is None:
        return None
    return value / bar.bar


def meets(key: str, value: float | None) -> bool | None:
    bar = BAR_BY_KEY.get(key)
    if bar is None or bar.bar is None or value is None:
        return None
    return value >= bar.bar if bar.higher_is_better else value <= bar.bar


def _fmt_num(value: float | None, unit: str) -> str:
    if value is None:
        return "null"
    if unit == "ms":
        return f"{value:,.1f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:,.2f}"


def format_table(figures: dict[str, Any], notes: dict[str, str] | None = None) -> str:
    """The human table: each figure, its bar, the ratio and whether it meets the bar."""
    notes = notes or {}
    rows = [("figure", "value", "unit", "bar", "ratio", "ok")]
    for b in BARS:
        if b.key not in figures:
            continue
        v = figures[b.key]
        r = ratio(b.key, v)
        m = meets(b.key, v)
        bar_txt = "-" if b.bar is None else (("" if b.higher_is_better else "<= ") + _fmt_num(b.bar, b.unit))
        if b.goal is not None:
            bar_txt += f" (goal {_fmt_num(b.goal, b.unit)})"
        rows.append((
            b.label, _fmt_num(v, b.unit), b.unit, bar_txt,
            "-" if r is None else f"{r:.2f}",
            "-" if m is None else ("yes" if m else "NO"),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2].ljust(widths[2]),
                 row[3].ljust(widths[3]), row[4].rjust(widths[4]), row[5]]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    for key, text in notes.items():
        lines.append(f"note: {key}: {text}")
    return "\n".join(lines)


def build_document(figures: dict[str, Any], machine: dict[str, Any], stages: dict[str, Any],
                   command: str, notes: dict[str, str] | None = None) -> dict[str, Any]:
    """The JSON written by --out: every required key (null when not measured), the bars and ratios,
    the machine and each stage's details."""
    doc: dict[str, Any] = {k: figures.get(k) for k in REQUIRED_KEYS}
    for k, v in figures.items():
        doc.setdefault(k, v)
    doc["ratios"] = {k: ratio(k, v) for k, v in figures.items() if ratio(k, v) is not None}
    doc["bars"] = {b.key: {"bar": b.bar, "goal": b.goal, "unit": b.unit,
                           "higher_is_better": b.higher_is_better} for b in BARS if b.bar is not None}
    doc["notes"] = dict(notes or {})
    doc["machine"] = machine
    doc["command"] = command
    doc["stages"] = stages
    return doc


def rate_or_none(count: float, seconds: float) -> float | None:
    return count / seconds if seconds > 0 and count > 0 else None


def mean(values: Iterable[float]) -> float | None:
    vals = list(values)
    return sum(vals) / len(vals) if vals else None
