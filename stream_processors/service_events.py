"""Agency service events on jember.ingest: validate, pseudonymise, de-duplicate, track lifecycles,
aggregate per kecamatan per WIB day.

One `ServiceEventHandler` per ingest partition, plugged into `TelemetryPartition.handlers` for the type
prefixes of the service families (`register`). For each envelope:

1. validate (schemas.service_events.validate_service_event against the Kemendagri regions). A refused
   event goes to the dead-letter topic with its raw payload SEALED (infra.privacy.seal, key
   Settings.pii_key): the dead letter's raw is `{"sealed": <token>, "type", "id", "source", "key"}`, so
   `arus dlq replay` can unseal it and re-inject the original bytes, and nothing personal is in clear on
   the dlq topic or in dead_letters. Words of the reject message that repeat a personal value are masked.
2. pseudonymise `data` (NIK, names, phone numbers -> keyed hash) unless the producer (HTTP / CSV ingest)
   did it already: agencies producing straight to Kafka send them in clear, this is the first processor.
3. de-duplicate, within the entity's state: by (source, id), and by the natural key (type, entity,
   status, event time) so the same event sent over two channels (HTTP and Kafka, different CloudEvents
   ids) is counted once.
4. lifecycle: per (type, entity) the earliest event time of each status seen. A duration
   (from_status -> to_status, schemas.service_events.LIFECYCLES) is computed once, as soon as both ends
   are known, whichever arrives first (resolved before opened works); it is never negative: when the
   closing time precedes the opening time no duration is produced; an unknown start gives none.
5. emit the cleaned event to `service-events` keyed by entity id (with all durations known so far for
   the entity and the entity's opening time), then call the listeners (SLA alerts).
6. daily cells: per (WIB day, kecamatan, type, measure) count/sum/min/max, measure `status:<s>` for each
   event and `<duration name>` for each duration (in the day/kecamatan of the closing event). Cells
   changed since the last flush are emitted with their full state to `service-daily` (idempotent upserts).
   Events of a kabupaten-level region count under the kabupaten code `35.09`. Each partition counts the
   events it receives, so a cell message is this partition's PART of the cell (`part` = partition,
   `version` = the last input offset folded in); the sink keeps one row per part in
   service_daily_parts (a newer version replaces an older one) and service_daily = the sum of the parts.

Partitioning: the lifecycle of an entity is tracked by the partition that receives its events, so every
producer keys ingest records by entity id (case_id, complaint_id, ...). `entity_key` gives that key.

State is JSON-serialisable, checkpointed with the partition (full snapshot or deltas with deletions) and
bounded by event time, with one horizon H (`horizon_ms`, default 7 days) behind the partition's service
watermark (the highest accepted event time):
- daily cells whose WIB day ended before the horizon are dropped (their last full state is in the table);
- closed entities (last status of their lifecycle) whose last event is before the horizon are dropped
  (with their event ids and natural keys): any event with time >= horizon still meets every earlier event
  of the same natural key in the state, so the stream's counts of the days it keeps are exact;
- open entities are kept for `idle_retention_ms` (400 days, the acceptance window of service events:
  agencies enter records late), then dropped; an event for a dropped entity starts a fresh entity (no
  duration across the gap).
Backfill: service events may be up to 400 days old (SERVICE_MAX_AGE_MS: last year's spreadsheet). An
event whose cell day is behind the horizon is not counted in the stream (its cell was dropped, counting
would overwrite the table with a partial count); its service-events message carries
`"recount": [[day, kecamatan, type], ...]` and the record sink recomputes this partition's part of those
cells from service_events in the same transaction as the event's row (consumers/service_rows.py), exact
by the table's unique keys. The same happens to cells changed since the last flush when an event moves
the watermark so far that they fall behind the horizon (flush never emits a cell behind it: a recount
may have replaced that part already, at a later offset). Ordering: the recount rides on an event of
this partition, so (entities keyed by id) it reaches the sink after the rows it counts.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import orjson

from infra import privacy
from schemas import reasons, topics
from schemas import service_events as se
from schemas.regions import KABUPATEN_CODE, load_regions
from schemas.results import Rejected

from .outputs import Outputs

log = logging.getLogger("arus.worker.services")

DAY_MS = 86_400_000
WIB_OFFSET_MS = 7 * 3_600_000  # Asia/Jakarta, no daylight saving

HORIZON_MS = 7 * DAY_MS
IDLE_RETENTION_MS = 400 * DAY_MS

Listener = Callable[[Any, Outputs], None]  # (ServiceEvent, Outputs)


def wib_day(time_ms: int) -> str:
    """The Asia/Jakarta calendar day (YYYY-MM-DD) of an epoch-ms instant."""
    return _day_name((time_ms + WIB_OFFSET_MS) // DAY_MS)


@lru_cache(maxsize=4096)
def _day_name(day: int) -> str:
    return datetime.fromtimestamp(day * 86_400, UTC).strftime("%Y-%m-%d")


@lru_cache(maxsize=4096)
def wib_day_end_ms(day: str) -> int:
    start = int(datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC).timestamp() * 1000) - WIB_OFFSET_MS
    return start + DAY_MS


def family_prefixes(types: Iterable[str]) -> list[str]:
    """`jember.complaint.v1` -> `jember.complaint.`, `jember.welfare.case.v1` -> `jember.welfare.`."""
    out: list[str] = []
    for t in types:
        parts = t.split(".")
        prefix = ".".join(parts[:2]) + "." if len(parts) >= 3 else t
        if prefix not in out:
            out.append(prefix)
    return out


def entity_key(env: Mapping[str, Any]) -> str | None:
    """The Kafka key producers use for a service envelope: its entity id (same entity, same partition)."""
    lc = se.LIFECYCLES.get(env.get("type"))  # type: ignore[arg-type]
    data = env.get("data")
    if lc is not None and isinstance(data, Mapping):
        value = data.get(lc.entity_field)
        if isinstance(value, str | int) and not isinstance(value, bool):
            return str(value)
    subject = env.get("subject")
    return subject if isinstance(subject, str) and subject else None


def _personal_values(data: Any, depth: int = 0) -> set[str]:
    """String forms of the values under personal keys (to mask them in reject messages)."""
    found: set[str] = set()
    if depth > 4:
        return found
    if isinstance(data, Mapping):
        for k, v in data.items():
            if privacy.is_personal_key(k) and isinstance(v, str | int) and str(v).strip():
                found.add(str(v))
            elif isinstance(v, Mapping | list):
                found |= _personal_values(v, depth + 1)
    elif isinstance(data, list):
        for v in data[:100]:
            found |= _personal_values(v, depth + 1)
    return found


_DIGITS = re.compile(r"\d{8,}")


def scrub(message: str, data: Any) -> str:
    """A reject message with personal values (and any long digit run, e.g. a malformed NIK) masked."""
    for value in sorted(_personal_values(data), key=len, reverse=True):
        if len(value) >= 3:
            message = message.replace(value, "***")
    return _DIGITS.sub("***", message)


class _Alias:
    """The same handler under another type prefix: handles, but owns no state (flush/snapshot no-ops), so
    the partition's checkpoint holds the handler's state once."""

    def __init__(self, target: ServiceEventHandler) -> None:
        self.target = target

    def handle(self, env: dict[str, Any], raw: bytes, offset: int, now_ms: int, out: Outputs) -> None:
        self.target.handle(env, raw, offset, now_ms, out)

    def flush(self, out: Outputs) -> None:
        return None

    def snapshot(self, full: bool) -> dict[str, Any]:
        return {}

    def restore(self, payload: Mapping[str, Any]) -> None:
        return None


class ServiceEventHandler:
    def __init__(
        self, partition: int, source_topic: str, pii_key: bytes, max_age_ms: int, max_future_ms: int,
        listeners: list[Listener] | None = None, *, horizon_ms: int = HORIZON_MS,
        idle_retention_ms: int = IDLE_RETENTION_MS,
    ) -> None:
        self.partition = partition
        self.source_topic = source_topic
        self.pii_key = pii_key
        self.max_age_ms = max_age_ms
        self.max_future_ms = max_future_ms
        self.listeners: list[Listener] = list(listeners or [])
        self.horizon_ms = horizon_ms
        self.idle_retention_ms = max(idle_retention_ms, horizon_ms)
        self._recount: set[tuple[str, str, str]] = set()  # (day, kec, type) the sink must recount
        self.last_offset = -1  # the version of the cells emitted at the next flush
        self.regions = load_regions()
        self.watermark = 0  # highest event time accepted on this partition
        # "type|entity" -> {"s": current status, "u": its event ms, "k": its kecamatan,
        #   "ts": {status: earliest ms}, "tk": {status: kecamatan of that earliest event},
        #   "ev": ["status@ms", ...] (natural keys), "i": ["source|id", ...], "d": {duration: seconds}}
        self.entities: dict[str, dict[str, Any]] = {}
        # "day|kecamatan|type|measure" -> [count, sum, min, max]
        self.cells: dict[str, list[float | None]] = {}
        self._emit_cells: set[str] = set()
        self._dirty: dict[str, set[str]] = {"entities": set(), "cells": set()}
        self._deleted: dict[str, set[str]] = {"entities": set(), "cells": set()}

    # -- registration ---------------------------------------------------------------------------
    def register(self, handlers: MutableMapping[str, Any], types: Iterable[str] | None = None) -> None:
        """Plug this handler into a partition's handlers for each service family prefix."""
        prefixes = family_prefixes(types if types is not None else se.SERVICE_TYPES)
        for i, prefix in enumerate(prefixes):
            handlers[prefix] = self if i == 0 else _Alias(self)

    # -- hot path -------------------------------------------------------------------------------
    def handle(self, env: dict[str, Any], raw: bytes, offset: int, now_ms: int, out: Outputs) -> None:
        result = se.validate_service_event(env, self.regions, now_ms, self.max_age_ms, self.max_future_ms)
        if isinstance(result, Rejected):
            self._reject(result, env, raw, offset, now_ms, out)
            return
        ev = result.value
        # always (idempotent): data hashed at HTTP/CSV ingest may still hold a NIK used as an id
        ev = dataclasses.replace(ev, data=privacy.pseudonymise(ev.data, self.pii_key),
                                 entity_id=privacy.protect_identifier(ev.entity_id, self.pii_key),
                                 id=privacy.protect_identifier(ev.id, self.pii_key))
        sid = f"{ev.source}|{ev.id}"
        t = int(ev.time_ms)
        ekey = f"{ev.type}|{ev.entity_id}"
        entity = self.entities.get(ekey)
        mark = f"{ev.status}@{t}"
        if entity is not None and sid in entity["i"]:
            self._duplicate(ev, f"event {ev.id!r} from {ev.source!r} was already received", env, raw, offset,
                            now_ms, out)
            return
        if entity is not None and mark in entity["ev"]:
            # the same lifecycle step through another channel (HTTP + Kafka): one event
            self._duplicate(ev, f"{ev.type} {ev.entity_id} {ev.status} at {t} was already received "
                                f"(another channel)", env, raw, offset, now_ms, out)
            return
        self.last_offset = max(self.last_offset, offset)
        self._recount = set()
        if t > self.watermark:
            self.watermark = t
            self._pass_horizon()
        kec = ev.kecamatan or KABUPATEN_CODE  # a kabupaten-level event counts under 35.09
        if entity is None:
            entity = {"s": ev.status, "u": t, "k": kec, "ts": {}, "tk": {}, "ev": [], "i": [], "d": {}}
            self.entities[ekey] = entity
        self._deleted["entities"].discard(ekey)
        self._dirty["entities"].add(ekey)
        entity["ev"].append(mark)
        entity["i"].append(sid)
        if t >= entity["u"]:
            entity["s"], entity["u"], entity["k"] = ev.status, t, kec
        ts: dict[str, int] = entity["ts"]
        if ev.status is not None and (ev.status not in ts or t < ts[ev.status]):
            ts[ev.status] = t
            entity["tk"][ev.status] = kec
        self._count(wib_day(t), kec, ev.type, f"status:{ev.status}" if ev.status else "events", None)
        # durations completed by this event (either end may arrive first)
        lifecycle = se.LIFECYCLES.get(ev.type)
        if lifecycle is not None:
            for name, start, end in lifecycle.durations:
                if name in entity["d"] or start not in ts or end not in ts:
                    continue
                if ev.status not in (start, end):
                    continue
                seconds = (ts[end] - ts[start]) / 1000.0
                if seconds < 0:
                    continue  # closing before opening in event time: no duration, never negative
                entity["d"][name] = seconds
                # in the cell of the closing event (its WIB day and kecamatan)
                self._count(wib_day(ts[end]), entity["tk"].get(end, kec), ev.type, name, seconds)
        opened = ts.get(lifecycle.statuses[0]) if lifecycle is not None and lifecycle.statuses else None
        msg: dict[str, Any] = {
            "id": ev.id, "source": ev.source, "type": ev.type, "time": t, "region": ev.region,
            "kecamatan": ev.kecamatan, "entity_id": ev.entity_id, "status": ev.status, "category": ev.category,
            "agency": ev.agency, "durations": dict(entity["d"]), "opened_at": opened, "data": ev.data,
            "part": self.partition, "offset": offset,
        }
        if self._recount:
            msg["recount"] = sorted([d, k, ty] for d, k, ty in self._recount)  # this partition's part, at `offset`
        out.emit(topics.SERVICE_EVENTS, str(ev.entity_id), msg)
        for listener in self.listeners:
            try:
                listener(ev, out)
            except Exception:  # a listener's bug must not stop the stream; no event data in the log
                log.exception("service-event listener %r failed on %s %s", listener, ev.type, ev.id)

    def _pass_horizon(self) -> None:
        """The watermark moved: changes of cells now behind the horizon that were not emitted yet will
        never be (flush skips them), so the sink recounts those cells after this event's row."""
        horizon = self.watermark - self.horizon_ms
        for key in [k for k in self._emit_cells if wib_day_end_ms(k.split("|", 1)[0]) < horizon]:
            day, kec, type_, _ = key.split("|", 3)
            self._recount.add((day, kec, type_))
            self._emit_cells.discard(key)

    def _count(self, day: str, kec: str, type_: str, measure: str, value: float | None) -> None:
        if wib_day_end_ms(day) < self.watermark - self.horizon_ms:
            self._recount.add((day, kec, type_))  # backfill: the sink recounts this cell from the table
            return
        key = f"{day}|{kec}|{type_}|{measure}"
        cell = self.cells.get(key)
        if cell is None:
            cell = self.cells[key] = [0, 0.0, None, None]
        cell[0] = int(cell[0] or 0) + 1
        if value is not None:
            cell[1] = float(cell[1] or 0.0) + value
            cell[2] = value if cell[2] is None else min(float(cell[2]), value)
            cell[3] = value if cell[3] is None else max(float(cell[3]), value)
        self._emit_cells.add(key)
        self._dirty["cells"].add(key)
        self._deleted["cells"].discard(key)

    def _duplicate(self, ev: Any, message: str, env: dict[str, Any], raw: bytes, offset: int, now_ms: int,
                   out: Outputs) -> None:
        self._reject(Rejected(reasons.DUPLICATE, message), env, raw, offset, now_ms, out)

    def _reject(self, rejected: Rejected, env: dict[str, Any], raw: bytes, offset: int, now_ms: int,
                out: Outputs) -> None:
        """Dead-letter with the raw payload sealed (encrypted): it may hold personal data in clear."""
        data = env.get("data")
        wrapper = {
            "sealed": privacy.seal(raw, self.pii_key),
            "type": env.get("type") if isinstance(env.get("type"), str) else None,
            # a NIK used as an id must not leave in clear here either; the key is the one the
            # entity's accepted events have (hashed the same way)
            "id": scrub(str(privacy.protect_identifier(env["id"], self.pii_key)), None)
            if isinstance(env.get("id"), str) else None,
            "source": env.get("source") if isinstance(env.get("source"), str) else None,
            "key": privacy.protect_identifier(k, self.pii_key) if (k := entity_key(env)) is not None else None,
        }
        safe = Rejected(rejected.reason, scrub(rejected.message, data), None, rejected.position)
        out.dead_letter(safe, orjson.dumps(wrapper), self.source_topic, self.partition, offset, now_ms)

    # -- checkpoint -----------------------------------------------------------------------------
    def flush(self, out: Outputs) -> None:
        """Emit the full state of each daily cell changed since the last flush; drop expired state."""
        horizon = self.watermark - self.horizon_ms
        for key in sorted(self._emit_cells):
            cell = self.cells.get(key)
            if cell is None:
                continue
            day, kec, type_, measure = key.split("|", 3)
            if wib_day_end_ms(day) < horizon:
                # behind the horizon: a recount from the stored events may have replaced this part
                # already (at a later offset); emitting it now, at this flush's version, would roll it back
                continue
            out.emit(topics.SERVICE_DAILY, key, {
                "day": day, "kecamatan": kec, "type": type_, "measure": measure, "count": int(cell[0] or 0),
                "sum": float(cell[1] or 0.0), "min": cell[2], "max": cell[3],
                "part": self.partition, "version": self.last_offset,
            })
        self._emit_cells = set()
        self.expire()

    def expire(self) -> None:
        wm = self.watermark
        horizon = wm - self.horizon_ms
        for key in [k for k in self.cells if wib_day_end_ms(k.split("|", 1)[0]) < horizon]:
            self._drop("cells", self.cells, key)
        for key, ent in list(self.entities.items()):
            lifecycle = se.LIFECYCLES.get(key.split("|", 1)[0])
            closed = lifecycle is None or (bool(lifecycle.statuses) and ent["s"] == lifecycle.statuses[-1])
            idle = wm - int(ent["u"])
            if idle > self.idle_retention_ms or (closed and idle > self.horizon_ms):
                self._drop("entities", self.entities, key)

    def _drop(self, kind: str, table: dict[str, Any], key: str) -> None:
        del table[key]
        self._dirty[kind].discard(key)
        self._deleted[kind].add(key)
        if kind == "cells":
            self._emit_cells.discard(key)

    def snapshot(self, full: bool) -> dict[str, Any]:
        tables: dict[str, dict[str, Any]] = {"entities": self.entities, "cells": self.cells}
        payload: dict[str, Any] = {"wm": self.watermark, "lo": self.last_offset}
        for kind, table in tables.items():
            keys = table.keys() if full else self._dirty[kind]
            payload[kind] = {k: table[k] for k in keys if k in table}
            if not full:
                payload[f"{kind}-"] = sorted(self._deleted[kind])
        self._dirty = {k: set() for k in tables}
        self._deleted = {k: set() for k in tables}
        return payload

    def restore(self, payload: Mapping[str, Any]) -> None:
        tables: dict[str, dict[str, Any]] = {"entities": self.entities, "cells": self.cells}
        for kind, table in tables.items():
            if payload.get("full"):
                table.clear()
            for key in payload.get(f"{kind}-", ()):
                table.pop(key, None)
            for key, value in (payload.get(kind) or {}).items():
                table[key] = value
        self.watermark = max(self.watermark, int(payload.get("wm", 0))) if not payload.get("full") \
            else int(payload.get("wm", 0))
        self.last_offset = max(self.last_offset, int(payload.get("lo", -1)))
        self._emit_cells = set()

    def state(self) -> dict[str, Any]:
        """The whole state (tests compare it across snapshot/restore)."""
        return {"wm": self.watermark, "lo": self.last_offset, "entities": orjson.loads(orjson.dumps(self.entities)),
                "cells": orjson.loads(orjson.dumps(self.cells))}
