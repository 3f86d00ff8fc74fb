"""`indicators` topic -> indicator_values (record sink spec).

Each message is the full value of one (series, region, period) cell, so the row is replaced (the
stream's latest state wins; a redelivery writes the same row). A message with `"deleted": true` is
the tombstone of a cell whose last observation moved to another cell (e.g. a case's category became
known): its row is deleted. Suppressed cells arrive with value, numerator, denominator and n_persons
already NULL; the table refuses anything else (CHECK indicator_values_suppressed_empty).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from schemas import topics

from .records import BadRecord, TableSpec, Write

UPSERT = (
    "INSERT INTO indicator_values (indicator_id, region_code, period_start, period, value, numerator,"
    " denominator, target, suppressed, computed_at, base_id, category, period_end, n_persons, standing, unit)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, now(), %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (indicator_id, region_code, period, period_start) DO UPDATE SET"
    " value = EXCLUDED.value, numerator = EXCLUDED.numerator, denominator = EXCLUDED.denominator,"
    " target = EXCLUDED.target, suppressed = EXCLUDED.suppressed, computed_at = now(),"
    " base_id = EXCLUDED.base_id, category = EXCLUDED.category, period_end = EXCLUDED.period_end,"
    " n_persons = EXCLUDED.n_persons, standing = EXCLUDED.standing, unit = EXCLUDED.unit"
)
DELETE = ("DELETE FROM indicator_values WHERE indicator_id = %s AND region_code = %s AND period = %s"
          " AND period_start = %s")
PERIODS = frozenset({"hour", "day", "week", "month"})


def _text(msg: Mapping[str, Any], name: str, optional: bool = False) -> str | None:
    v = msg.get(name)
    if v is None and optional:
        return None
    if not isinstance(v, str) or not v or len(v) > 200 or "\x00" in v:
        raise BadRecord(f"`{name}` must be a non-empty string")
    return v


def _ms(msg: Mapping[str, Any], name: str) -> datetime:
    v = msg.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 253402300800000:
        raise BadRecord(f"`{name}` must be epoch milliseconds")
    return datetime.fromtimestamp(v / 1000, UTC)


def _num(msg: Mapping[str, Any], name: str) -> float | None:
    v = msg.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or v != v or v in (float("inf"), float("-inf")):
        raise BadRecord(f"`{name}` must be a finite number or null")
    return float(v)


def row(msg: Mapping[str, Any]) -> tuple[Any, ...]:
    """The indicator_values row of a cell message (the recompute writes the same tuple)."""
    period = _text(msg, "period")
    if period not in PERIODS:
        raise BadRecord(f"`period` must be one of {sorted(PERIODS)}")
    suppressed = msg.get("suppressed")
    if not isinstance(suppressed, bool):
        raise BadRecord("`suppressed` must be true or false")
    value, numerator, denominator = _num(msg, "value"), _num(msg, "numerator"), _num(msg, "denominator")
    n_persons = msg.get("n_persons")
    if n_persons is not None and (isinstance(n_persons, bool) or not isinstance(n_persons, int)):
        raise BadRecord("`n_persons` must be an integer or null")
    if suppressed and any(v is not None for v in (value, numerator, denominator, n_persons)):
        raise BadRecord("a suppressed cell must not carry its value, parts or person count")
    standing = _text(msg, "standing", optional=True)
    return (
        _text(msg, "indicator_id"), _text(msg, "region_code"), _ms(msg, "period_start"), period, value,
        numerator, denominator, _num(msg, "target"), suppressed, _text(msg, "base_id", optional=True),
        _text(msg, "category", optional=True), _ms(msg, "period_end") if msg.get("period_end") is not None
        else None, n_persons, standing, _text(msg, "unit", optional=True),
    )


def indicator_writes(msg: dict[str, Any]) -> list[Write]:
    if msg.get("deleted") is True:
        period = _text(msg, "period")
        return [(DELETE, (_text(msg, "indicator_id"), _text(msg, "region_code"), period, _ms(msg, "period_start")))]
    return [(UPSERT, row(msg))]


SPECS: list[TableSpec] = [TableSpec(topics.INDICATORS, indicator_writes, name="indicator_values")]
