"""Service events -> service_events, service_entities; daily cells -> service_daily (record sink specs).

- `service-events`: one row per event, INSERT ... ON CONFLICT DO NOTHING. Two unique keys make it land
  once: the primary key (time, source, event_id) for a redelivery, and the natural index
  (type, entity_id, status, time) for the same lifecycle step pushed over HTTP, CSV and Kafka under
  different CloudEvents ids. The same message upserts the entity: status, region and updated_at move
  only forward in event time (an out-of-order older event does not roll them back), opened_at is the
  earliest known opening, durations are merged (jsonb ||).
- `service-daily`: one ingest partition's full state of a (WIB day, kecamatan, type, measure) cell
  replaces that partition's row in service_daily_parts when its `version` (the partition's input
  offset) is not older; service_daily is then recomputed as the sum of the parts (migration 010).
- backfill: an event older than the worker's horizon (its day's cell is no longer in the stream state)
  carries `"recount": [[day, kecamatan, type], ...]`; after inserting its row, its partition's parts of those
  cells are rebuilt from the stored events of that partition (status counts; durations from each
  entity's earliest opening and closing events, counted on the day and kecamatan of the closing one)
  at version = the event's offset, then the totals.
Writes of one (day, kecamatan, type) take a transaction-scoped advisory lock, so concurrent sinks do
not lose each other's parts. Exactness across channels assumes producers key ingest records by entity
id (all Arus producers do): one entity, one partition.
Personal fields in `data` are already keyed hashes (the worker pseudonymised them).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, date, datetime
from typing import Any

import orjson

from schemas import topics
from schemas.regions import KABUPATEN_CODE
from schemas.service_events import LIFECYCLES

from .records import BadRecord, TableSpec, Write

INSERT_EVENT = (
    "INSERT INTO service_events (time, source, event_id, type, entity_id, status, region_code, kecamatan,"
    " agency, data, ingest_partition) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s)"
    " ON CONFLICT DO NOTHING"
)
UPSERT_ENTITY = (
    "INSERT INTO service_entities AS e (type, entity_id, status, region_code, kecamatan, category, opened_at,"
    " updated_at, durations) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb)"
    " ON CONFLICT (type, entity_id) DO UPDATE SET"
    " status = CASE WHEN EXCLUDED.updated_at >= e.updated_at THEN EXCLUDED.status ELSE e.status END,"
    " region_code = CASE WHEN EXCLUDED.updated_at >= e.updated_at THEN EXCLUDED.region_code ELSE e.region_code END,"
    " kecamatan = CASE WHEN EXCLUDED.updated_at >= e.updated_at THEN EXCLUDED.kecamatan ELSE e.kecamatan END,"
    " category = COALESCE(e.category, EXCLUDED.category),"
    " opened_at = LEAST(e.opened_at, EXCLUDED.opened_at),"
    " updated_at = GREATEST(e.updated_at, EXCLUDED.updated_at),"
    " durations = e.durations || EXCLUDED.durations"
)
# the partition's part of a cell: replaced only by the same or a newer version (input offset), so a
# stream cell message that overtakes nothing and is overtaken by a recount cannot roll it back
_PART_TAIL = (
    " ON CONFLICT (day, kecamatan, type, measure, part) DO UPDATE SET count = EXCLUDED.count,"
    " sum = EXCLUDED.sum, min = EXCLUDED.min, max = EXCLUDED.max, version = EXCLUDED.version, updated_at = now()"
    " WHERE EXCLUDED.version >= service_daily_parts.version"
)
_PART_COLUMNS = "(day, kecamatan, type, measure, part, count, sum, min, max, version, updated_at)"
UPSERT_PART = (
    f"INSERT INTO service_daily_parts {_PART_COLUMNS} VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now())"
    + _PART_TAIL
)
# service_daily = the sum of the parts
_TOTALS = (
    "INSERT INTO service_daily (day, kecamatan, type, measure, count, sum, min, max, updated_at)"
    " SELECT day, kecamatan, type, measure, sum(count)::bigint, sum(sum), min(min), max(max), now()"
    " FROM service_daily_parts WHERE day = %s AND kecamatan = %s AND type = %s{measure}"
    " GROUP BY day, kecamatan, type, measure"
    " ON CONFLICT (day, kecamatan, type, measure) DO UPDATE SET count = EXCLUDED.count, sum = EXCLUDED.sum,"
    " min = EXCLUDED.min, max = EXCLUDED.max, updated_at = now()"
)
TOTAL_CELL = _TOTALS.format(measure=" AND measure = %s")
TOTAL_DAY = _TOTALS.format(measure="")
LOCK_CELL = "SELECT pg_advisory_xact_lock(hashtext(%s))"  # per (day, kecamatan, type): concurrent sinks

# backfill recount of one partition's part of the (day, kecamatan, type) cells, from its stored events;
# one parameter block: the cell, the part and version, the WIB day as a UTC range
_CELL = (
    "WITH p AS (SELECT %s::date AS day, %s::text AS kec, %s::text AS type, %s::int AS part,"
    " %s::bigint AS version, (%s::date)::timestamp AT TIME ZONE 'Asia/Jakarta' AS lo,"
    " (%s::date + 1)::timestamp AT TIME ZONE 'Asia/Jakarta' AS hi)"
)
RECOUNT_STATUS = (
    _CELL + f" INSERT INTO service_daily_parts {_PART_COLUMNS}"
    " SELECT p.day, p.kec, p.type, COALESCE('status:' || e.status, 'events'), p.part, count(*), 0, NULL, NULL,"
    " p.version, now()"
    " FROM p JOIN service_events e ON e.type = p.type AND COALESCE(e.kecamatan, %s) = p.kec"
    " AND e.ingest_partition = p.part AND e.time >= p.lo AND e.time < p.hi"
    " GROUP BY p.day, p.kec, p.type, p.part, p.version, e.status" + _PART_TAIL
)
RECOUNT_DURATION = (
    _CELL + ", ends AS (SELECT e.entity_id, min(e.time) AS t_end FROM p JOIN service_events e"
    " ON e.type = p.type AND e.status = %s AND COALESCE(e.kecamatan, %s) = p.kec"
    " AND e.ingest_partition = p.part AND e.time >= p.lo AND e.time < p.hi GROUP BY e.entity_id),"
    " pairs AS (SELECT ends.t_end,"
    " (SELECT min(x.time) FROM service_events x, p WHERE x.type = p.type AND x.entity_id = ends.entity_id"
    "  AND x.status = %s) AS first_end,"
    " (SELECT min(x.time) FROM service_events x, p WHERE x.type = p.type AND x.entity_id = ends.entity_id"
    "  AND x.status = %s) AS t_start FROM ends),"
    " d AS (SELECT extract(epoch FROM t_end - t_start)::float8 AS s FROM pairs"
    "  WHERE first_end = t_end AND t_start IS NOT NULL AND t_start <= t_end)"
    f" INSERT INTO service_daily_parts {_PART_COLUMNS}"
    " SELECT p.day, p.kec, p.type, %s, p.part, count(d.s), COALESCE(sum(d.s), 0), min(d.s), max(d.s),"
    " p.version, now() FROM p, d GROUP BY p.day, p.kec, p.type, p.part, p.version" + _PART_TAIL
)


def _lock(day: date, kec: str, type_: str) -> Write:
    return (LOCK_CELL, (f"service_daily|{day}|{kec}|{type_}",))


def recount_writes(type_: str, day: date, kec: str, part: int, version: int) -> list[Write]:
    """Rebuild partition `part`'s share of the (day, kecamatan, type) cells from service_events (backfill
    behind the worker's horizon), then the totals."""
    cell = (day, kec, type_, part, version, day, day)
    writes: list[Write] = [_lock(day, kec, type_), (RECOUNT_STATUS, (*cell, KABUPATEN_CODE))]
    lifecycle = LIFECYCLES.get(type_)
    for name, start, end in lifecycle.durations if lifecycle is not None else ():
        writes.append((RECOUNT_DURATION, (*cell, end, KABUPATEN_CODE, end, start, name)))
    writes.append((TOTAL_DAY, (day, kec, type_)))
    return writes


def _str(msg: Mapping[str, Any], name: str, optional: bool = False) -> str | None:
    value = msg.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise BadRecord(f"`{name}` must be a non-empty string")
    return value


def _time(value: Any, name: str, optional: bool = False) -> datetime | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRecord(f"`{name}` must be epoch milliseconds")
    return datetime.fromtimestamp(value / 1000.0, UTC)


def _int(value: Any, name: str, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRecord(f"`{name}` must be an integer")
    return value


def _num(value: Any, name: str, optional: bool = True) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRecord(f"`{name}` must be a number")
    return float(value)


def service_event_writes(msg: dict[str, Any]) -> list[Write]:
    t = _time(msg.get("time"), "time")
    type_, entity = _str(msg, "type"), str(msg.get("entity_id") or "")
    if not entity:
        raise BadRecord("`entity_id` is missing")
    status = _str(msg, "status", optional=True)
    region, kec = _str(msg, "region"), _str(msg, "kecamatan", optional=True)
    data = msg.get("data")
    if data is None:
        data = {}
    part = _int(msg.get("part"), "part", optional=True)
    durations = msg.get("durations") or {}
    if not isinstance(durations, dict) or not all(isinstance(v, int | float) for v in durations.values()):
        raise BadRecord("`durations` must map names to seconds")
    writes: list[Write] = [(INSERT_EVENT, (
        t, _str(msg, "source"), _str(msg, "id"), type_, entity, status, region, kec,
        _str(msg, "agency", optional=True), orjson.dumps(data).decode(), part,
    ))]
    if status is not None:
        writes.append((UPSERT_ENTITY, (
            type_, entity, status, region, kec, _str(msg, "category", optional=True),
            _time(msg.get("opened_at"), "opened_at", optional=True), t, orjson.dumps(durations).decode(),
        )))
    recount = msg.get("recount") or []
    if not isinstance(recount, list):
        raise BadRecord("`recount` must be a list of [day, kecamatan, type]")
    for item in recount:
        if not (isinstance(item, list) and len(item) in (2, 3) and all(isinstance(x, str) for x in item)):
            raise BadRecord("`recount` must be a list of [day, kecamatan, type]")
        try:
            day = date.fromisoformat(item[0])
        except ValueError as exc:
            raise BadRecord(f"recount day must be YYYY-MM-DD: {exc}") from exc
        if part is None:
            raise BadRecord("`recount` needs `part`")
        assert type_ is not None
        cell_type = item[2] if len(item) == 3 else type_
        writes.extend(recount_writes(cell_type, day, item[1], part, _int(msg.get("offset"), "offset") or 0))
    return writes


def service_daily_writes(msg: dict[str, Any]) -> list[Write]:
    try:
        day = date.fromisoformat(str(msg.get("day")))
    except ValueError as exc:
        raise BadRecord(f"`day` must be YYYY-MM-DD: {exc}") from exc
    count = msg.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise BadRecord("`count` must be a non-negative integer")
    kec, type_, measure = _str(msg, "kecamatan"), _str(msg, "type"), _str(msg, "measure")
    assert kec is not None and type_ is not None
    return [
        _lock(day, kec, type_),
        (UPSERT_PART, (
            day, kec, type_, measure, _int(msg.get("part"), "part"), count,
            _num(msg.get("sum", 0.0), "sum", optional=False), _num(msg.get("min"), "min"), _num(msg.get("max"), "max"),
            _int(msg.get("version"), "version"),
        )),
        (TOTAL_CELL, (day, kec, type_, measure)),
    ]


SPECS: list[TableSpec] = [
    TableSpec(topics.SERVICE_EVENTS, service_event_writes, name="service_events"),
    TableSpec(topics.SERVICE_DAILY, service_daily_writes, name="service_daily"),
]
