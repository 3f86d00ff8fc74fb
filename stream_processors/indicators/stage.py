"""The indicator stage of the worker: three StreamRunners.

A Kafka partition of `service-events` holds only some entities (it is keyed by entity id) and one of
`aggregates` only some windows, while a kecamatan's (and the kabupaten's) indicator spans them all.
So the stage re-keys first and computes in one place:

  service-events --(indicator-route)--------> internal.indicator-input  keyed by kabupaten (35.09)
  aggregates  --(indicator-sensor-route)--->  internal.indicator-input  (kecamatan scope, used metrics)
  internal.indicator-input --(indicators)--> indicators                 keyed by series|region|period|start

The route stages are stateless (their checkpoint is the offset). The `indicators` stage keeps an
`IndicatorState` per partition: every (indicator, region, period) cell of a kabupaten is computed by
one processor from the entities' facts, so the kabupaten rollup is exact (medians and distinct persons
are computed from the observations, not merged from kecamatan values). At-least-once delivery
anywhere upstream is harmless: folding an event twice changes no fact (compute.fold_event).

Cells are emitted (full value, idempotent upsert downstream) at each checkpoint flush when they
changed, and dropped `indicator_lateness_s` after their period end (event time); an observation for a
dropped cell is counted as late and never re-creates a partial cell. `arus indicators recompute`
rebuilds any range from the stored events with the same functions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import orjson

from infra.indicators import Catalogue, Indicator, load_catalogue
from infra.indicators.periods import HOUR_MS, period_end, period_start
from infra.settings import Settings
from schemas import reasons, topics
from schemas.results import Rejected

from ..alerting.lifecycle import AlertBook
from ..alerting.rules import IndicatorRule
from ..outputs import Outputs
from ..runtime import StreamRunner
from .compute import (
    IndicatorState,
    catalogue_fingerprint,
    entity_closed,
    kabupaten_of,
    person_fields,
    slim_event,
)

log = logging.getLogger("arus.worker.indicators")

_KEC_PREFIX = b'{"scope":"kecamatan"'


class _Stateless:
    """A route processor: its whole checkpoint is the input offset."""

    def __init__(self, partition: int, source_topic: str) -> None:
        self.partition = partition
        self.source_topic = source_topic
        self.offset = -1

    def _bad(self, message: str, raw: bytes, offset: int, now_ms: int, out: Outputs) -> None:
        out.dead_letter(Rejected(reasons.PROCESSING_ERROR, message), raw, self.source_topic, self.partition,
                        offset, now_ms, source="indicators")

    def flush(self, out: Outputs) -> None:
        return None

    def snapshot(self, full: bool) -> dict[str, Any]:
        return {"offset": self.offset, "full": full}

    def restore(self, payload: Mapping[str, Any]) -> None:
        self.offset = int(payload["offset"])

    def drop_closed(self) -> None:
        return None


class ServiceRoute(_Stateless):
    """service-events -> slim events of the catalogue's types, keyed by kabupaten."""

    def __init__(self, partition: int, source_topic: str, catalogue: Catalogue) -> None:
        super().__init__(partition, source_topic)
        self.fields = person_fields(catalogue)
        self.types = {i.formula.event.type for i in catalogue.by_source("service-events") if i.formula.event}

    def process(self, raw: bytes, offset: int, now_ms: int, out: Outputs) -> None:
        try:
            msg = orjson.loads(raw)
            if not isinstance(msg, dict):
                raise ValueError("not a JSON object")
            if msg.get("type") not in self.types:
                return
            ev = slim_event(msg, self.fields)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            self._bad(f"service event not usable for indicators: {exc}", raw, offset, now_ms, out)
            return
        out.emit(topics.INDICATOR_INPUT, kabupaten_of(ev["reg"]), ev)


class SensorRoute(_Stateless):
    """aggregates (kecamatan scope, metrics the catalogue uses) -> window states keyed by kabupaten."""

    def __init__(self, partition: int, source_topic: str, catalogue: Catalogue) -> None:
        super().__init__(partition, source_topic)
        self.metrics = {i.formula.metric for i in catalogue.by_source("aggregates") if i.formula.metric}

    def process(self, raw: bytes, offset: int, now_ms: int, out: Outputs) -> None:
        if not self.metrics or not raw.startswith(_KEC_PREFIX):
            return  # device-scope windows (the bulk of the topic) are skipped unparsed
        try:
            msg = orjson.loads(raw)
            if msg.get("metric") not in self.metrics:
                return
            kec = str(msg["key"])
            item = {"k": "agg", "kec": kec, "metric": str(msg["metric"]), "ws": int(msg["window_start"]),
                    "we": int(msg["window_end"]), "sum": float(msg["sum"]), "count": float(msg["count"])}
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
            self._bad(f"kecamatan aggregate not usable for indicators: {exc}", raw, offset, now_ms, out)
            return
        out.emit(topics.INDICATOR_INPUT, kabupaten_of(kec), item)


class _StageState(IndicatorState):
    def __init__(self, catalogue: Catalogue, min_persons: int, lateness_ms: int, sensor_close_ms: int) -> None:
        super().__init__(catalogue, min_persons)
        self.lateness_ms = lateness_ms
        self.sensor_close_ms = sensor_close_ms
        self.wm = 0  # highest service event time (capped at the wall clock + max future)
        self.swm = 0  # highest kecamatan window end

    def is_open(self, ind: Indicator, start: int) -> bool:
        end = period_end(ind.frequency, start) + self.lateness_ms
        if ind.source == "aggregates":
            return end + self.sensor_close_ms > self.swm
        return end > self.wm


class IndicatorAlerts:
    """`indicator` alert rules over the cells this partition emits: the newest period of an (indicator,
    region) decides; the alert's entity is `indicator@region`. Event time is the partition's watermark."""

    def __init__(self, rules: list[IndicatorRule]) -> None:
        self.rules = rules
        self.book = AlertBook()
        self.latest: dict[str, int] = {}  # indicator@region -> newest period start evaluated

    def on_cell(self, result: Mapping[str, Any], t: int, out: Outputs) -> None:
        if not self.rules or result.get("suppressed") or result.get("value") is None:
            return
        ind, region, period = str(result["indicator_id"]), str(result["region_code"]), str(result["period"])
        entity = f"{ind}@{region}"
        start = int(result["period_start"])
        if start < self.latest.get(entity, start):
            return  # a late correction of an older period does not speak for the indicator now
        self.latest[entity] = start
        value = float(result["value"])
        kec = region if region.count(".") == 2 else None
        for rule in self.rules:
            if not rule.matches(ind, region, period):
                continue
            if rule.breached(result.get("standing")):
                self.book.trigger(rule, entity, rule.severity, value, t, ("indicator", region, kec, ind), None, out)
            else:
                self.book.clear(rule, entity, t, value, None, out)

    def snapshot(self) -> dict[str, Any]:
        return {"book": self.book.snapshot(True), "latest": self.latest}

    def restore(self, payload: Mapping[str, Any]) -> None:
        self.book.restore(payload.get("book") or {"open": [], "closed": []})
        self.latest = dict(payload.get("latest") or {})


class IndicatorPartition:
    """One partition of internal.indicator-input: the cells of the kabupatens hashed to it."""

    def __init__(self, partition: int, source_topic: str, catalogue: Catalogue, *, min_persons: int,
                 lateness_ms: int, sensor_close_ms: int, entity_retention_ms: int, max_future_ms: int,
                 rules: list[IndicatorRule] | None = None) -> None:
        self.partition = partition
        self.source_topic = source_topic
        self.offset = -1
        self.state = _StageState(catalogue, min_persons, lateness_ms, sensor_close_ms)
        self.entity_retention_ms = entity_retention_ms
        self.max_future_ms = max_future_ms
        self.frequencies = sorted({i.frequency for i in catalogue.indicators})
        self._swept_hour = -1
        self.fingerprint = catalogue_fingerprint(catalogue)
        self._rebuild = False  # the restored state was computed with another catalogue
        self.alerts = IndicatorAlerts(rules or [])

    # -- hot path -------------------------------------------------------------------------------
    def process(self, raw: bytes, offset: int, now_ms: int, out: Outputs) -> None:
        st = self.state
        try:
            msg = orjson.loads(raw)
            kind = msg.get("k")
            if kind == "ev":
                t = int(msg["t"])
                if t <= now_ms + self.max_future_ms and t > st.wm:
                    st.wm = t
                st.apply_event(msg)
            elif kind == "agg":
                ws, we = int(msg["ws"]), int(msg["we"])
                hour = ws - ws % HOUR_MS
                if hour + HOUR_MS + st.sensor_close_ms <= st.swm:
                    st.late += 1  # its hour is closed: the hourly observation was taken already
                    return
                st.apply_window(str(msg["kec"]), str(msg["metric"]), ws, float(msg["sum"]), float(msg["count"]))
                if now_ms + self.max_future_ms >= we > st.swm:
                    st.swm = we
            else:
                raise ValueError(f"unknown record kind {kind!r}")
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
            out.dead_letter(Rejected(reasons.PROCESSING_ERROR, f"bad indicator input: {exc}"), raw,
                            self.source_topic, self.partition, offset, now_ms, source="indicators")

    def flush(self, out: Outputs) -> None:
        st = self.state
        for hkey in sorted(st.hours):
            hour = int(hkey.rsplit("|", 1)[1])
            if hour + HOUR_MS + st.sensor_close_ms <= st.swm:
                st.close_hour(hkey)
        for ck in sorted(st.emit):
            result = st.result(ck)
            if result is not None:
                out.emit(topics.INDICATORS, f"{result['indicator_id']}|{result['region_code']}|"
                         f"{result['period']}|{result['period_start']}", result)
                self.alerts.on_cell(result, max(st.wm, st.swm), out)
        for ck in sorted(st.tombstones):
            gone = st.tombstone(ck)
            if gone is not None:
                out.emit(topics.INDICATORS, f"{gone['indicator_id']}|{gone['region_code']}|"
                         f"{gone['period']}|{gone['period_start']}", gone)
        st.emit = set()
        st.tombstones = set()
        self.drop_closed()

    def drop_closed(self) -> None:
        st = self.state
        if self._rebuild:
            self._rebuild = False
            log.warning("indicator catalogue changed since the last checkpoint of partition %s: cells rebuilt "
                        "from the %d entities held; run `arus indicators recompute` over the open periods",
                        self.partition, len(st.entities))
            st.rebuild()
        for ck in list(st.cells):
            series, _, start = ck.split("|")
            ind = st.catalogue.get(series.partition(".")[0])
            if ind is None or not st.is_open(ind, int(start)):
                st.drop("cells", ck)
        # entities expire on a scale of days: sweep them when the watermark enters a new hour, not at
        # every checkpoint (a sweep is O(entities))
        if st.wm // HOUR_MS == self._swept_hour:
            return
        self._swept_hour = st.wm // HOUR_MS
        for ekey, entity in list(st.entities.items()):
            u = int(entity["u"])
            # every cell the entity's latest event can touch is closed: a redelivery can no longer count
            horizon = max(period_end(f, period_start(f, u)) for f in self.frequencies) + st.lateness_ms
            if horizon > st.wm:
                continue
            if entity_closed(entity) or u + self.entity_retention_ms <= st.wm:
                st.drop("entities", ekey)

    # -- checkpoint -----------------------------------------------------------------------------
    def snapshot(self, full: bool) -> dict[str, Any]:
        st = self.state
        tables = {"entities": st.entities, "hours": st.hours, "cells": st.cells}
        payload: dict[str, Any] = {"offset": self.offset, "full": full, "wm": st.wm, "swm": st.swm,
                                   "cat": self.fingerprint}
        for kind, table in tables.items():
            keys = table.keys() if full else st.changed[kind]
            payload[kind] = {k: table[k] for k in keys if k in table}
            if not full:
                payload[f"{kind}-"] = sorted(st.deleted[kind])
        st.changed = {k: set() for k in tables}
        st.deleted = {k: set() for k in tables}
        if self.alerts.rules:
            payload["alerts"] = self.alerts.snapshot()  # small: one entry per (indicator, region)
        return payload

    def restore(self, payload: Mapping[str, Any]) -> None:
        st = self.state
        tables: dict[str, dict[str, Any]] = {"entities": st.entities, "hours": st.hours, "cells": st.cells}
        for kind, table in tables.items():
            if payload.get("full"):
                table.clear()
            for key in payload.get(f"{kind}-", ()):
                table.pop(key, None)
            table.update(payload.get(kind) or {})
        self.offset = int(payload["offset"])
        if "alerts" in payload:
            self.alerts.restore(payload["alerts"])
        st.wm = int(payload.get("wm", 0))
        st.swm = int(payload.get("swm", 0))
        st.emit = set()
        if payload.get("cat") != self.fingerprint:
            self._rebuild = True  # cells hold observations of other formulas: rebuilt in drop_closed
        elif payload.get("full"):
            self._rebuild = False


def indicator_runners(settings: Settings, common: Mapping[str, Any],
                      rules: list[IndicatorRule] | None = None) -> list[StreamRunner]:
    """The three runners of the indicator stage (validates the catalogue: a bad file stops the worker)."""
    catalogue = load_catalogue(settings.indicator_catalogue_file)
    prefix = settings.consumer_group_prefix
    service_events = settings.topic(topics.SERVICE_EVENTS)
    aggregates = settings.topic(topics.AGGREGATES)
    source = settings.topic(topics.INDICATOR_INPUT)
    sensor_close_ms = (settings.window_seconds + settings.allowed_lateness_s + settings.region_retention_s) * 1000
    runners = [
        StreamRunner(name="indicator-route", group_id=f"{prefix}-indicator-route", source_topic=service_events,
                     state_topic=settings.topic(topics.INDICATOR_ROUTE_STATE),
                     factory=lambda p: ServiceRoute(p, service_events, catalogue), **common),
        StreamRunner(name="indicators", group_id=f"{prefix}-indicators", source_topic=source,
                     state_topic=settings.topic(topics.INDICATOR_STATE),
                     factory=lambda p: IndicatorPartition(
                         p, source, catalogue, min_persons=settings.indicator_min_persons,
                         lateness_ms=settings.indicator_lateness_s * 1000, sensor_close_ms=sensor_close_ms,
                         entity_retention_ms=settings.indicator_entity_retention_s * 1000,
                         max_future_ms=settings.max_future_s * 1000, rules=rules),
                     **common),
    ]
    if catalogue.by_source("aggregates"):
        runners.append(StreamRunner(
            name="indicator-sensor-route", group_id=f"{prefix}-indicator-sensor-route", source_topic=aggregates,
            state_topic=settings.topic(topics.INDICATOR_SENSOR_ROUTE_STATE),
            factory=lambda p: SensorRoute(p, aggregates, catalogue), **common))
    return runners
