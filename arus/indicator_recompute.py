"""`arus indicators recompute --from --to`: rebuild indicator_values from the stored events.

Reads service_events (and the kecamatan rows of aggregates for sensor indicators), turns each row into
the same slim event the worker's route stage sends, and runs the SAME pure functions
(stream_processors.indicators.compute) as the live stage. The range is widened to whole periods of
each indicator (a monthly indicator asked from the 10th is recomputed from the 1st); every entity with
an event in the widened range is loaded with ALL its events (its opening may be older), and only
cells inside the range are written. In one transaction the rows of the catalogue's series in the range
are deleted and the recomputed ones inserted, so running it twice gives the same table.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from datetime import UTC, datetime, time
from typing import Any
from zoneinfo import ZoneInfo

from consumers.indicator_rows import UPSERT, row
from infra.db import connect
from infra.indicators import Catalogue, load_catalogue
from infra.indicators.periods import PERIOD_NAMES, period_end, period_start
from infra.settings import Settings
from schemas.errors import ConfigError
from schemas.service_events import LIFECYCLES
from stream_processors.indicators.compute import compute, person_fields, slim_event

WIB = ZoneInfo("Asia/Jakarta")

EVENTS_SQL = """
SELECT e.time, e.source, e.event_id, e.type, e.entity_id, e.status, e.region_code, e.kecamatan, e.data,
       coalesce(n.durations, '{}'::jsonb)
FROM service_events e
LEFT JOIN service_entities n ON n.type = e.type AND n.entity_id = e.entity_id
WHERE e.type = ANY(%(types)s) AND (e.type, e.entity_id) IN (
    SELECT DISTINCT type, entity_id FROM service_events
    WHERE type = ANY(%(types)s) AND time >= %(lo)s AND time < %(hi)s)
"""
WINDOWS_SQL = """
SELECT key, metric, bucket, sum, count FROM aggregates
WHERE scope = 'kecamatan' AND metric = ANY(%(metrics)s) AND bucket >= %(lo)s AND bucket < %(hi)s
"""


def parse_when(text: str) -> datetime:
    """YYYY-MM-DD (WIB midnight) or an ISO 8601 time (WIB when it has no offset)."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"not a date or ISO 8601 time: {text!r}") from None
    if len(text) <= 10:
        value = datetime.combine(value.date(), time(0), WIB)
    return value if value.tzinfo else value.replace(tzinfo=WIB)


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def bounds(catalogue: Catalogue, start_ms: int, end_ms: int) -> dict[str, tuple[int, int]]:
    """Per frequency the whole periods that cover [start, end)."""
    out: dict[str, tuple[int, int]] = {}
    for f in {i.frequency for i in catalogue.indicators}:
        out[f] = (period_start(f, start_ms), period_end(f, period_start(f, end_ms - 1)))
    return out


def event_from_row(r: tuple[Any, ...], fields: Iterable[str]) -> dict[str, Any]:
    """A service_events row as the cleaned service-events message it was stored from."""
    t, source, event_id, etype, entity, status, region, kec, data, durations = r
    life = LIFECYCLES.get(etype)
    category = data.get(life.category_field) if life and life.category_field and isinstance(data, dict) else None
    return slim_event({
        "id": event_id, "source": source, "type": etype, "time": _ms(t), "region": region, "kecamatan": kec,
        "entity_id": entity, "status": status, "category": category, "durations": durations or {}, "data": data,
    }, fields)


def recompute(settings: Settings, start: datetime, end: datetime) -> dict[str, Any]:
    if end <= start:
        raise ConfigError("--to must be after --from")
    catalogue = load_catalogue(settings.indicator_catalogue_file)
    spans = bounds(catalogue, _ms(start), _ms(end))
    lo = min(a for a, _ in spans.values())
    hi = max(b for _, b in spans.values())
    types = sorted({i.formula.event.type for i in catalogue.by_source("service-events") if i.formula.event})
    metrics = sorted({i.formula.metric for i in catalogue.by_source("aggregates") if i.formula.metric})
    fields = person_fields(catalogue)
    with connect(settings.database_dsn()) as conn:
        params = {"types": types, "metrics": metrics, "lo": _dt(lo), "hi": _dt(hi)}
        events = [event_from_row(r, fields) for r in conn.execute(EVENTS_SQL, params).fetchall()]
        windows = [(k, m, _ms(b), float(s), float(c))
                   for k, m, b, s, c in conn.execute(WINDOWS_SQL, params).fetchall()] if metrics else []
        results = compute(catalogue, events, windows, settings.indicator_min_persons)
        keep = []
        for r in results:
            ind = catalogue.get(r["base_id"])
            assert ind is not None
            a, b = spans[ind.frequency]
            if a <= r["period_start"] < b:
                keep.append(r)
        deleted = 0
        with conn.transaction():
            for ind in catalogue.indicators:
                a, b = spans[ind.frequency]
                cur = conn.execute(
                    "DELETE FROM indicator_values WHERE (indicator_id = %s OR indicator_id LIKE %s)"
                    " AND period = %s AND period_start >= %s AND period_start < %s",
                    (ind.id, ind.id + ".%", PERIOD_NAMES[ind.frequency], _dt(a), _dt(b)))
                deleted += cur.rowcount
            with conn.cursor() as cur:
                cur.executemany(UPSERT, [row(r) for r in keep])
    return {"from": _dt(lo).isoformat(), "to": _dt(hi).isoformat(), "events": len(events),
            "windows": len(windows), "cells": len(keep), "suppressed": sum(1 for r in keep if r["suppressed"]),
            "replaced": deleted}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    rc = sub.add_parser("recompute", help="rebuild indicator_values of a time range from stored events")
    rc.add_argument("--from", dest="start", required=True, help="YYYY-MM-DD (WIB) or ISO 8601 time")
    rc.add_argument("--to", dest="end", required=True, help="exclusive; YYYY-MM-DD (WIB) or ISO 8601 time")
    sub.add_parser("check", help="validate the indicator catalogue and list its indicators")


def main(settings: Settings, args: argparse.Namespace) -> int:
    if args.action == "check":
        catalogue = load_catalogue(settings.indicator_catalogue_file)
        origin = settings.indicator_catalogue_file or "shipped example catalogue"
        print(f"{origin}: {len(catalogue.indicators)} indicators, valid"
              + (" (EXAMPLE: placeholder targets)" if catalogue.example else ""))
        for ind in catalogue.indicators:
            print(f"  {ind.id:<48} {ind.frequency:<8} {ind.formula.kind:<10} {ind.owner_agency}")
        return 0
    summary = recompute(settings, parse_when(args.start), parse_when(args.end))
    print(f"recomputed {summary['cells']} cells ({summary['suppressed']} suppressed) from {summary['events']} "
          f"events and {summary['windows']} windows, {summary['from']} .. {summary['to']}; "
          f"{summary['replaced']} previous rows replaced")
    return 0
