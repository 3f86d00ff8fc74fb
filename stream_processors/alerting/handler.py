"""The alert rules inside the worker: glue between the evaluators and the two stages.

`AlertHandler`, one per jember.ingest partition, is at once
- a `ReadingObserver` of the telemetry hot path (threshold, rate and absence rules on each accepted
  reading; timers on each checkpoint),
- a service-event listener (SLA rules),
- the `EnvelopeHandler` of operators' commands (`schemas.alerts.COMMAND_TYPE`; the API keys them by
  the alert's entity, so they reach the partition holding its state). A command for an aggregate
  (kecamatan) alert is forwarded to the region-merge stage, which holds those,
and its snapshot carries the alert state (all of it, or what changed) in the partition's checkpoint.

`RegionAlerts`, one per region-merge partition: aggregate rules over the merged kecamatan windows.

Clocks (event time): rules compare event times with a reference time per partition = the highest event
time seen (the partition watermark for readings, the service events' own for SLA), plus the wall-clock
time elapsed since it last advanced. While data flows (live or replay) the reference is the watermark,
so a replay gives the same alerts; when a partition goes totally silent the reference keeps moving
with the wall clock, so a gauge that was the last one talking still gets its absence alert.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from schemas import reasons, topics
from schemas.alerts import COMMAND_ACTIONS
from schemas.envelope import parse_event_time
from schemas.results import Rejected

from ..outputs import Outputs
from .engine import AggregateRules, DeviceRules, SlaRules
from .lifecycle import AlertBook
from .rules import AggregateRule, RuleSet

log = logging.getLogger("arus.worker.alerts")


class EventClock:
    """The highest event time seen, moved on by the wall clock while nothing newer arrives."""

    __slots__ = ("last", "wall", "wm")

    def __init__(self) -> None:
        self.wm = 0
        self.wall = 0
        self.last = 0  # the reference never goes back (new data after a silence may be older than it)

    def see(self, event_ms: int) -> None:
        if event_ms > self.wm:
            self.wm = event_ms
            self.wall = 0  # the wall clock starts counting at the next checkpoint

    def ref(self, now_ms: int) -> int:
        if not self.wm:
            return 0
        if not self.wall:
            self.wall = now_ms
        self.last = max(self.last, self.wm + max(0, now_ms - self.wall))
        return self.last


def parse_command(env: Mapping[str, Any], now_ms: int) -> tuple[str, str, str, str, str, str, int] | str:
    """(action, actor, alert_id, rule_id, entity, command_id, time) or the reason it is refused."""
    data = env.get("data")
    if not isinstance(data, Mapping):
        return "an alert command needs a `data` object"
    fields = []
    for name in ("action", "actor", "alert_id", "rule_id", "entity", "command_id"):
        value = data.get(name)
        if not isinstance(value, str) or not value:
            return f"alert command: `data.{name}` must be a non-empty string"
        fields.append(value)
    if fields[0] not in COMMAND_ACTIONS:
        return f"alert command: action must be one of {', '.join(COMMAND_ACTIONS)}"
    t = parse_event_time(env.get("time"))
    return (*fields, int(t.timestamp() * 1000) if t is not None else now_ms)  # type: ignore[return-value]


class AlertHandler:
    def __init__(self, rules: RuleSet, partition: int, source_topic: str, watermark: Callable[[], int]) -> None:
        self.partition = partition
        self.source_topic = source_topic
        self.watermark = watermark
        self.book = AlertBook()
        self.devices = DeviceRules(rules, self.book)
        self.sla = SlaRules(rules, self.book)
        self.reopen = {r.id: r.reopen_window for r in rules.rules}
        self.aggregate_ids = {r.id for r in rules.of_type(AggregateRule)}
        self.clock = EventClock()
        self.sla_clock = EventClock()
        # the hot path calls the evaluator directly (one call per reading, none when no rule exists)
        self.on_reading = self.devices.on_reading if self.devices.active else _ignore

    # -- observer ------------------------------------------------------------------------------
    def on_flush(self, now_ms: int, out: Outputs) -> None:
        self.clock.see(self.watermark())
        ref = self.clock.ref(now_ms)
        if ref:
            self.devices.check(ref, out)
        sla_ref = self.sla_clock.ref(now_ms)
        if sla_ref:
            self.sla.check(sla_ref, out)
        self.book.expire(max(ref, sla_ref), self.reopen)

    # -- service events (listener) -------------------------------------------------------------
    def on_service_event(self, ev: Any, out: Outputs) -> None:
        if not self.sla.by_event:
            return
        t = int(ev.time_ms)
        self.sla_clock.see(t)
        self.sla.on_event(ev.type, str(ev.entity_id), ev.status, t, ev.region, ev.kecamatan, ev.id, out)

    # -- commands (EnvelopeHandler) ------------------------------------------------------------
    def handle(self, env: dict[str, Any], raw: bytes, offset: int, now_ms: int, out: Outputs) -> None:
        cmd = parse_command(env, now_ms)
        if isinstance(cmd, str):
            out.dead_letter(Rejected(reasons.INVALID_PAYLOAD, cmd), raw, self.source_topic, self.partition, offset,
                            now_ms)
            return
        action, actor, alert, rule_id, entity, command_id, t = cmd
        if self.book.command(action, actor, alert, rule_id, entity, command_id, t, out):
            return
        if rule_id in self.aggregate_ids:
            out.emit(topics.REGION_PARTIALS, entity, env)  # the kecamatan's merge partition holds it
        else:
            log.info("command %s for %s: the alert is not open here (resolved or unknown)", command_id, alert)

    def flush(self, out: Outputs) -> None:
        return None  # timers run in on_flush, which gets the checkpoint's clock

    def snapshot(self, full: bool) -> dict[str, Any]:
        # full: everything; otherwise what changed since the previous snapshot (restore applies them in order)
        return {"book": self.book.snapshot(full), "dev": self.devices.snapshot(full), "sla": self.sla.snapshot(full),
                "clk": [self.clock.wm, self.sla_clock.wm]}

    def restore(self, payload: Mapping[str, Any]) -> None:
        if "book" not in payload:
            return
        self.book.restore(payload["book"])
        self.devices.restore(payload.get("dev", {}))
        self.sla.restore(payload.get("sla", {}))
        wm, sla_wm = payload.get("clk", [0, 0])
        self.clock.wm, self.sla_clock.wm = int(wm), int(sla_wm)
        self.clock.wall = self.sla_clock.wall = 0  # set by the first flush's wall clock


def _ignore(reading: Any, out: Outputs) -> None:
    return None


class RegionAlerts:
    """Aggregate rules of one region-merge partition (entity = kecamatan code)."""

    def __init__(self, rules: RuleSet, size_ms: int) -> None:
        self.book = AlertBook()
        self.aggs = AggregateRules(rules, self.book, size_ms)
        self.reopen = {r.id: r.reopen_window for r in rules.rules}
        self.active = bool(self.aggs.by_metric)

    def on_window(self, kecamatan: str, metric: str, start: int, stats: Mapping[str, float], out: Outputs) -> None:
        self.aggs.on_window(kecamatan, metric, start, stats, out)

    def on_command(self, env: Mapping[str, Any], now_ms: int, out: Outputs) -> None:
        cmd = parse_command(env, now_ms)
        if isinstance(cmd, str):
            return  # validated by the ingest stage already
        action, actor, alert, rule_id, entity, command_id, t = cmd
        if not self.book.command(action, actor, alert, rule_id, entity, command_id, t, out):
            log.info("command %s for %s: the alert is not open here (resolved or unknown)", command_id, alert)

    def tick(self, watermark: int) -> None:
        self.book.expire(watermark, self.reopen)

    def snapshot(self) -> dict[str, Any]:
        return {"book": self.book.snapshot(), "agg": self.aggs.snapshot()}

    def restore(self, payload: Mapping[str, Any]) -> None:
        self.book.restore(payload.get("book", {}))
        self.aggs.restore(payload.get("agg", {}))
