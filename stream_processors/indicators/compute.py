"""Pure indicator computation: entities -> observations -> cells -> values. No Kafka, no clock.

The same functions run live (stream_processors.indicators.stage) and in `arus indicators recompute`
(arus/indicator_recompute.py), which is how live == recompute holds.

Service indicators. Events are folded into per-entity facts (type, entity id): for each lifecycle
status the EARLIEST event time and the kecamatan of that event, the earliest known category and
person key, and the durations the upstream handler computed. Folding is commutative and idempotent
(earliest wins, ties broken by value), so the facts, and everything derived from them, do not depend
on arrival order or redelivery. An indicator's observation of an entity is its (earliest) event of
`formula.event.status`: at that event's time, in that event's kecamatan (and the kabupaten), with
the entity's category and person, and the durations computed from the earliest marks
(end - start, never negative; the event's own `durations` when a start is unknown here).
When an entity's facts change, its old observations are taken out of their cells and the new ones
put in (cells are retractable multisets), so a late or out-of-order event corrects every value.

Sensor indicators. Kecamatan 1-minute aggregates (replace semantics per window) are grouped per
(kecamatan, metric, WIB hour); the hour's mean (sum of sums / sum of counts, windows in time order)
is one observation with field `value`, moved as the mean changes; once the hour can no longer change
(`close_hour`) its windows are forgotten and later updates of them are ignored.

Cells: (series, region, period_start) -> {"n": observations, "k": numerator count,
"x": sorted values, "u": {person unit: refcount}}. `cell_result` turns a cell into the output value:
count = n (or k with numerator_when); sum = sum(x); ratio = k / n; mean = sum(x) / len(x); percentile = continuous percentile of
x (PostgreSQL percentile_cont); distinct = len(u); then * multiply / divide. Values are computed from
the sorted values, so the float result is the same whatever the order the observations came in.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterable, Mapping
from typing import Any

from infra.indicators import Catalogue, Indicator
from infra.indicators.periods import HOUR_MS, PERIOD_NAMES, period_end, period_start
from schemas.regions import KABUPATEN_CODE
from schemas.service_events import LIFECYCLES

Obs = tuple[float | None, int, str | None]  # (field value, numerator flag, person unit)
CellKey = tuple[str, str, int]  # (series id, region code, period start ms)
NO_CATEGORY = "NA"


# --------------------------------------------------------------------------- small helpers

def kabupaten_of(region: str) -> str:
    parts = region.split(".")
    return ".".join(parts[:2]) if len(parts) >= 2 else KABUPATEN_CODE


def dig(data: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(data, Mapping):
            return None
        data = data.get(part)
    return data


def percentile_cont(sorted_values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (PostgreSQL percentile_cont(q/100))."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return sorted_values[lo]
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _earlier(cur: list[Any] | None, t: int, value: Any) -> list[Any] | None:
    """[t, value] if it is earlier (or equal and smaller) than cur, else None (no change)."""
    if value is None or value == "":
        return None
    if cur is None or t < cur[0] or (t == cur[0] and str(value) < str(cur[1])):
        return [t, value]
    return None


def catalogue_fingerprint(catalogue: Catalogue) -> str:
    """Identifies the formulas a checkpointed state was computed with."""
    return hashlib.sha256(catalogue.model_dump_json().encode()).hexdigest()[:16]


def person_fields(catalogue: Catalogue) -> list[str]:
    return sorted({i.formula.person_field for i in catalogue.by_source("service-events")})


def slim_event(msg: Mapping[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    """The facts of a cleaned service event the indicators need (the route stage sends this; the
    recompute builds it from service_events rows). Raises KeyError/TypeError/ValueError when malformed."""
    t = msg["time"]
    if isinstance(t, bool) or not isinstance(t, int | float):
        raise ValueError("`time` must be epoch milliseconds")
    etype, entity, region = msg["type"], msg["entity_id"], msg["region"]
    if not isinstance(etype, str) or not isinstance(region, str) or entity in (None, ""):
        raise ValueError("`type`, `entity_id` and `region` are required")
    durations = msg.get("durations") or {}
    if not isinstance(durations, Mapping):
        raise ValueError("`durations` must be an object")
    data = msg.get("data") or {}
    persons = {f: v for f in fields if isinstance(v := dig(data, f), str | int) and not isinstance(v, bool)}
    status = msg.get("status")
    return {
        "k": "ev", "type": etype, "id": str(entity), "status": None if status is None else str(status),
        "t": int(t), "reg": region, "kec": msg.get("kecamatan") or None,
        "cat": msg.get("category") or None,
        "d": {str(k): float(v) for k, v in durations.items()
              if isinstance(v, int | float) and not isinstance(v, bool)},
        "p": {k: str(v) for k, v in persons.items()},
    }


# --------------------------------------------------------------------------- entities

def new_entity(etype: str, entity_id: str) -> dict[str, Any]:
    return {"t": etype, "id": entity_id, "m": {}, "c": None, "p": {}, "d": {}, "u": 0}


def fold_event(entity: dict[str, Any], ev: Mapping[str, Any]) -> bool:
    """Fold one slim event into an entity's facts; True when a fact changed. Commutative, idempotent."""
    changed = False
    t = int(ev["t"])
    if t > entity["u"]:
        entity["u"] = t
        changed = True
    status = ev.get("status") or ""
    kec = ev.get("kec") or ""
    mark = entity["m"].get(status)
    if mark is None or t < mark[0] or (t == mark[0] and kec < mark[1]):
        entity["m"][status] = [t, kec, kabupaten_of(str(ev.get("reg") or KABUPATEN_CODE))]
        changed = True
    new = _earlier(entity["c"], t, ev.get("cat"))
    if new is not None:
        entity["c"] = new
        changed = True
    for path, value in (ev.get("p") or {}).items():
        new = _earlier(entity["p"].get(path), t, value)
        if new is not None:
            entity["p"][path] = new
            changed = True
    for name, seconds in (ev.get("d") or {}).items():
        if entity["d"].get(name) != seconds:
            entity["d"][name] = seconds
            changed = True
    return changed


def entity_durations(entity: Mapping[str, Any]) -> dict[str, float]:
    """Durations from the earliest marks (end - start, never negative), else the upstream values."""
    out = dict(entity.get("d") or {})
    life = LIFECYCLES.get(entity["t"])
    marks = entity["m"]
    if life is not None:
        for name, start, end in life.durations:
            if start in marks and end in marks:
                seconds = (marks[end][0] - marks[start][0]) / 1000.0
                if seconds >= 0:
                    out[name] = seconds
                else:
                    out.pop(name, None)
    return out


def entity_closed(entity: Mapping[str, Any]) -> bool:
    life = LIFECYCLES.get(entity["t"])
    return life is None or not life.statuses or life.statuses[-1] in entity["m"]


def observations(ind: Indicator, entity: Mapping[str, Any]) -> list[tuple[CellKey, Obs]]:
    """The observations an entity contributes to an indicator's cells (none, or one per region level)."""
    f = ind.formula
    assert f.event is not None
    if entity["t"] != f.event.type:
        return []
    mark = entity["m"].get(f.event.status)
    if mark is None:
        return []
    t, kec, kab = mark
    category = entity["c"][1] if entity["c"] else None
    if f.categories and category not in f.categories:
        return []
    values: dict[str, float] = {}
    if f.fields():
        durations = entity_durations(entity)
        for name in f.fields():
            if name not in durations:
                return []  # the observation needs a value it does not have: left out
            values[name] = durations[name]
    if not all(c.holds(values[c.field]) for c in f.where):
        return []
    num = 1 if f.numerator_when and all(c.holds(values[c.field]) for c in f.numerator_when) else 0
    x = values[f.field] if f.field else None
    person = entity["p"].get(f.person_field)
    unit = str(person[1]) if person else f"entity:{entity['t']}:{entity['id']}"
    series = ind.id if ind.breakdown is None else f"{ind.id}.{category or NO_CATEGORY}"
    start = period_start(ind.frequency, t)
    obs: Obs = (x, num, unit)
    out: list[tuple[CellKey, Obs]] = []
    if "kecamatan" in ind.region_levels and kec and kec != kab:
        out.append(((series, kec, start), obs))
    if "kabupaten" in ind.region_levels:
        out.append(((series, kab, start), obs))
    return out


def hour_observations(ind: Indicator, kec: str, hour_start: int, mean: float) -> list[tuple[CellKey, Obs]]:
    f = ind.formula
    if not all(c.holds(mean) for c in f.where):
        return []
    num = 1 if f.numerator_when and all(c.holds(mean) for c in f.numerator_when) else 0
    start = period_start(ind.frequency, hour_start)
    obs: Obs = (mean, num, None)
    out: list[tuple[CellKey, Obs]] = []
    if "kecamatan" in ind.region_levels:
        out.append(((ind.id, kec, start), obs))
    if "kabupaten" in ind.region_levels:
        out.append(((ind.id, kabupaten_of(kec), start), obs))
    return out


def hour_mean(windows: Mapping[Any, list[float]]) -> float | None:
    """Mean of an hour from its 1-minute windows {window_start: [sum, count]}, in window order."""
    total, count = 0.0, 0.0
    for ws in sorted(windows, key=int):
        s, c = windows[ws]
        total += s
        count += c
    return total / count if count else None


# --------------------------------------------------------------------------- cells (aggregators)

def cell_initialize() -> dict[str, Any]:
    return {"n": 0, "k": 0, "x": [], "u": {}}


def cell_add(cell: dict[str, Any], obs: Obs) -> None:
    x, num, unit = obs
    cell["n"] += 1
    cell["k"] += num
    if x is not None:
        bisect.insort(cell["x"], x)
    if unit is not None:
        cell["u"][unit] = cell["u"].get(unit, 0) + 1


def cell_remove(cell: dict[str, Any], obs: Obs) -> None:
    x, num, unit = obs
    cell["n"] -= 1
    cell["k"] -= num
    if x is not None:
        i = bisect.bisect_left(cell["x"], x)
        if i < len(cell["x"]) and cell["x"][i] == x:
            del cell["x"][i]
    if unit is not None and unit in cell["u"]:
        cell["u"][unit] -= 1
        if cell["u"][unit] <= 0:
            del cell["u"][unit]


def cell_result(ind: Indicator, series: str, region: str, start: int, cell: Mapping[str, Any],
                min_persons: int) -> dict[str, Any]:
    """The published value of a cell (the `indicators` topic message and the indicator_values row)."""
    f = ind.formula
    n, k, xs = int(cell["n"]), int(cell["k"]), cell["x"]
    numerator: float | None
    denominator: float | None
    raw: float | None
    if f.kind == "count":  # with numerator_when: how many observations meet it (of n observed)
        raw = float(k if f.numerator_when else n)
        numerator, denominator = raw, (float(n) if f.numerator_when else None)
    elif f.kind == "sum":
        raw = float(sum(xs))
        numerator, denominator = raw, float(len(xs))
    elif f.kind == "ratio":
        raw = k / n if n else None
        numerator, denominator = float(k), float(n)
    elif f.kind == "mean":
        raw = sum(xs) / len(xs) if xs else None
        numerator, denominator = float(sum(xs)), float(len(xs))
    elif f.kind == "percentile":
        assert f.q is not None
        raw = percentile_cont(list(xs), f.q)
        numerator, denominator = None, float(len(xs))
    else:  # distinct
        raw = float(len(cell["u"]))
        numerator, denominator = raw, None
    value = raw * f.multiply / f.divide if raw is not None else None
    n_persons = len(cell["u"]) if ind.personal else None
    suppressed = ind.personal and (n_persons or 0) < min_persons
    category = series.partition(".")[2] or None
    out = {
        "indicator_id": series, "base_id": ind.id, "category": category, "region_code": region,
        "region_level": "kabupaten" if region.count(".") == 1 else "kecamatan",
        "period": PERIOD_NAMES[ind.frequency], "period_start": start,
        "period_end": period_end(ind.frequency, start), "value": value, "numerator": numerator,
        "denominator": denominator, "n_persons": n_persons, "target": ind.target.value,
        "standing": ind.target.standing(value), "suppressed": suppressed, "unit": ind.unit,
    }
    if suppressed:  # a small cell says nothing: not the value, not its parts, not how small it is
        out.update(value=None, numerator=None, denominator=None, n_persons=None, standing=None)
    return out


# --------------------------------------------------------------------------- the whole state

def _ckey(key: CellKey) -> str:
    return f"{key[0]}|{key[1]}|{key[2]}"


def parse_ckey(s: str) -> CellKey:
    series, region, start = s.split("|")
    return series, region, int(start)


class IndicatorState:
    """Entities, sensor hours and cells of one kabupaten-keyed partition (or of a recompute run).

    `is_open(ind, period_start)` decides whether a cell may still change (the stage closes cells past
    their period end plus the allowed lateness; the recompute keeps everything open). Changes are
    recorded in `changed_*` / `deleted_*` for the stage's snapshots and `emit` for its flush.
    """

    def __init__(self, catalogue: Catalogue, min_persons: int) -> None:
        self.catalogue = catalogue
        self.min_persons = min_persons
        self.service = catalogue.by_source("service-events")
        self.sensor = catalogue.by_source("aggregates")
        self.types = {i.formula.event.type for i in self.service if i.formula.event is not None}
        self.metrics = {i.formula.metric for i in self.sensor if i.formula.metric is not None}
        self.person_fields = person_fields(catalogue)
        self.entities: dict[str, dict[str, Any]] = {}
        # "kec|metric|hour" -> {"w": {window start: [sum, count]}, "m": the hour's mean now observed}
        self.hours: dict[str, dict[str, Any]] = {}
        self.cells: dict[str, dict[str, Any]] = {}
        self.emit: set[str] = set()
        self.tombstones: set[str] = set()  # cells emitted before that became empty (deleted downstream)
        self.changed: dict[str, set[str]] = {"entities": set(), "hours": set(), "cells": set()}
        self.deleted: dict[str, set[str]] = {"entities": set(), "hours": set(), "cells": set()}
        self.late = 0  # observations for cells that are closed already (not applied)

    def is_open(self, ind: Indicator, start: int) -> bool:  # the stage overrides
        return True

    def _touch(self, kind: str, key: str) -> None:
        self.changed[kind].add(key)
        self.deleted[kind].discard(key)

    def drop(self, kind: str, key: str) -> None:
        table: dict[str, Any] = getattr(self, kind)
        table.pop(key, None)
        self.changed[kind].discard(key)
        self.deleted[kind].add(key)
        if kind == "cells":
            self.emit.discard(key)

    def _apply(self, ind: Indicator, key: CellKey, obs: Obs, add: bool) -> None:
        if not self.is_open(ind, key[2]):
            self.late += 1
            return
        ck = _ckey(key)
        cell = self.cells.get(ck)
        if cell is None:
            if not add:
                return
            cell = self.cells[ck] = cell_initialize()
        (cell_add if add else cell_remove)(cell, obs)
        if cell["n"] <= 0:  # its last observation moved elsewhere: the cell no longer exists
            self.drop("cells", ck)
            self.tombstones.add(ck)
            return
        self.tombstones.discard(ck)
        self.emit.add(ck)
        self._touch("cells", ck)

    def _observe(self, entity: Mapping[str, Any]) -> dict[tuple[str, CellKey, Obs], Indicator]:
        found: dict[tuple[str, CellKey, Obs], Indicator] = {}
        for ind in self.service:
            for key, obs in observations(ind, entity):
                found[(ind.id, key, obs)] = ind
        return found

    def apply_event(self, ev: Mapping[str, Any]) -> None:
        """Fold a slim service event; move the entity's observations if its facts changed."""
        if ev["type"] not in self.types:
            return
        ekey = f"{ev['type']}|{ev['id']}"
        entity = self.entities.get(ekey)
        before: dict[tuple[str, CellKey, Obs], Indicator] = {}
        if entity is None:
            entity = self.entities[ekey] = new_entity(str(ev["type"]), str(ev["id"]))
        else:
            before = self._observe(entity)
        if not fold_event(entity, ev):
            return  # a redelivery or an event that changes no fact
        self._touch("entities", ekey)
        after = self._observe(entity)
        for item, ind in before.items():
            if item not in after:
                self._apply(ind, item[1], item[2], add=False)
        for item, ind in after.items():
            if item not in before:
                self._apply(ind, item[1], item[2], add=True)

    def _hour_obs(self, hkey: str, mean: float | None, add: bool) -> None:
        if mean is None:
            return
        kec, metric, hour = hkey.split("|")
        for ind in self.sensor:
            if ind.formula.metric == metric:
                for key, obs in hour_observations(ind, kec, int(hour), mean):
                    self._apply(ind, key, obs, add=add)

    def apply_window(self, kec: str, metric: str, window_start: int, total: float, count: float) -> None:
        """A kecamatan 1-minute aggregate (the latest state of the window replaces the previous). The
        hour's observation follows its mean at once (the old one leaves its cells, the new one enters),
        so sensor indicators are live while the hour fills."""
        if metric not in self.metrics:
            return
        hour = window_start - window_start % HOUR_MS
        hkey = f"{kec}|{metric}|{hour}"
        state = self.hours.setdefault(hkey, {"w": {}, "m": None})
        state["w"][str(window_start)] = [float(total), float(count)]
        self._touch("hours", hkey)
        mean = hour_mean(state["w"])
        if mean != state["m"]:
            self._hour_obs(hkey, state["m"], add=False)
            self._hour_obs(hkey, mean, add=True)
            state["m"] = mean

    def close_hour(self, hkey: str) -> None:
        """The hour can no longer change: forget its windows (its observation stays in the cells)."""
        self.drop("hours", hkey)

    def rebuild(self) -> None:
        """Recompute every cell from the entities and open sensor hours held (after a catalogue change).
        Observations of sensor hours already closed are not held any more: those need a recompute."""
        for ck in list(self.cells):
            self.drop("cells", ck)
        self.tombstones = set()
        for entity in self.entities.values():
            for (_, key, obs), ind in self._observe(entity).items():
                self._apply(ind, key, obs, add=True)
        for hkey, state in self.hours.items():
            self._hour_obs(hkey, state.get("m"), add=True)

    def result(self, ck: str) -> dict[str, Any] | None:
        cell = self.cells.get(ck)
        if cell is None:
            return None
        series, region, start = parse_ckey(ck)
        ind = self.catalogue.get(series.partition(".")[0])
        if ind is None:
            return None
        return cell_result(ind, series, region, start, cell, self.min_persons)

    def tombstone(self, ck: str) -> dict[str, Any] | None:
        """The message that deletes an emptied cell's row (same key as its values)."""
        series, region, start = parse_ckey(ck)
        ind = self.catalogue.get(series.partition(".")[0])
        if ind is None:
            return None
        return {"indicator_id": series, "base_id": ind.id, "region_code": region,
                "period": PERIOD_NAMES[ind.frequency], "period_start": start, "deleted": True}

    def results(self) -> list[dict[str, Any]]:
        return [r for ck in sorted(self.cells) if (r := self.result(ck)) is not None]


def compute(catalogue: Catalogue, events: Iterable[Mapping[str, Any]],
            windows: Iterable[tuple[str, str, int, float, float]] = (), min_persons: int = 5) -> list[dict[str, Any]]:
    """Batch: every indicator value of a set of slim events and kecamatan windows."""
    state = IndicatorState(catalogue, min_persons)
    for ev in events:
        state.apply_event(ev)
    for kec, metric, ws, total, count in windows:
        state.apply_window(kec, metric, ws, total, count)
    return state.results()
