"""Evaluation of the rules in event time: plain classes fed with (entity, time, value), no Kafka.

- `LevelTracker`: a rule with severity levels (threshold, rate, aggregate) over one value per entity:
  per-level hysteresis (enter `above`, leave under `clear_below`), `for` N consecutive readings or a
  duration before a level is entered; leaving is immediate (the hysteresis band absorbs the noise).
- `RateTracker`: the change of a metric over `over` (latest minus the oldest sample within it) -> levels.
- `AbsenceTracker`: devices whose last observation is older than `after` at the reference time.
- `DeviceRules`: every device-scoped rule of a partition, indexed once per device (kind, device,
  region) and metric: a reading of a device no rule covers costs one dict lookup and nothing else.
- `SlaRules`: service entities whose start status is not followed by their end status within `within`.
- `AggregateRules`: mean/min/max/sum/count of a metric over `over` per kecamatan, from the merged
  1-minute kecamatan windows of the region-merge stage.

Every evaluator keeps JSON-serialisable state (`snapshot`/`restore`) and talks to an `AlertBook`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping
from typing import Any

from ..outputs import Outputs
from ..validation import Reading
from .lifecycle import AlertBook, Context
from .rules import AbsenceRule, AggregateRule, RateRule, RuleSet, SlaRule, ThresholdRule

LeveledRule = ThresholdRule | RateRule | AggregateRule
SLA_FORGET_MS = 400 * 86_400_000  # a breached entity without an end is forgotten after this (its alert stays)


class LevelTracker:
    """State per entity: [level, held, streak_0..n-1, since_0..n-1]; absent while calm."""

    __slots__ = ("book", "clears", "dirty", "enters", "for_ms", "for_n", "n", "open", "rule", "severities", "sign",
                 "simple", "state", "threshold", "top")

    def __init__(self, rule: LeveledRule, book: AlertBook) -> None:
        self.rule = rule
        self.book = book
        self.sign = rule.levels[0].direction
        self.enters = [lv.enter * self.sign for lv in rule.levels]
        self.clears = [lv.clear * self.sign for lv in rule.levels]
        self.severities = [lv.severity for lv in rule.levels]
        self.n = len(rule.levels)
        self.top = self.n - 1
        self.threshold = self.enters[0]  # nothing to do at or under this while calm
        self.for_n = rule.for_readings if isinstance(rule, ThresholdRule | RateRule) else 1
        self.for_ms = rule.for_ms if isinstance(rule, ThresholdRule | RateRule) else 0
        self.simple = self.for_n == 1 and not self.for_ms
        self.open = book.index(rule.id)  # entity -> open alert of this rule
        self.state: dict[str, list[int]] = {}
        self.dirty: set[str] = set()  # entities whose state changed since the last snapshot

    def observe(self, entity: str, value: float, t: int, ctx: Context, event_id: str | None, out: Outputs) -> None:
        x = value * self.sign
        st = self.state.get(entity)
        enters, clears = self.enters, self.clears
        if st is None:
            if x <= self.threshold:
                return
            st = self.state[entity] = [-1, 0] + [0] * (2 * self.n)
        else:
            level = st[0]
            if level >= 0 and not st[1] and x >= clears[level] and (level == self.top or x <= enters[level + 1]):
                if entity in self.open:  # still at its level (the usual case while an alert is open)
                    if level < self.top and not self.simple:
                        for i in range(level + 1, self.n):
                            st[2 + i] = 0  # a higher level's streak is broken
                        self.dirty.add(entity)
                    return
        self.dirty.add(entity)
        n, level = self.n, st[0]
        target = -1
        for i in range(n - 1, -1, -1):
            if x > enters[i] or (i <= level and x >= clears[i]):
                target = i
                break
        if self.simple:
            sustained = target
        else:
            sustained = -1
            for i in range(n):
                if target >= i:
                    if st[2 + i] == 0:
                        st[2 + n + i] = t
                    st[2 + i] += 1
                    if (st[2 + i] >= self.for_n) if not self.for_ms else (t - st[2 + n + i] >= self.for_ms):
                        sustained = i
                else:
                    st[2 + i] = 0
        new = max(level, sustained) if target > level else target
        if new >= 0:
            if new == level and not st[1]:
                if entity in self.open:  # the same level again: nothing to tell (fast path)
                    return
            st[0] = new
            st[1] = 0
            self.book.trigger(self.rule, entity, self.severities[new], value, t, ctx, event_id, out)
        elif level >= 0 or st[1]:
            st[0] = -1
            st[1] = 0 if self.book.clear(self.rule, entity, t, value, event_id, out) else 1
        if st[0] < 0 and not st[1] and not any(st[2:2 + n]):
            del self.state[entity]

    def snapshot(self, full: bool = True) -> dict[str, Any]:
        dirty, self.dirty = self.dirty, set()
        if full:
            return {"s": self.state}
        return {"d": {e: self.state.get(e) for e in dirty}}

    def restore(self, payload: Mapping[str, Any]) -> None:
        if "d" in payload:
            for e, st in payload["d"].items():
                if st is None:
                    self.state.pop(e, None)
                else:
                    self.state[e] = list(st)
        else:
            self.state = {k: list(v) for k, v in payload.get("s", {}).items()}


class RateTracker:
    """Samples within `over` per entity; the change (latest minus oldest) feeds a LevelTracker."""

    __slots__ = ("dirty", "levels", "over", "samples")

    def __init__(self, rule: RateRule, book: AlertBook) -> None:
        self.over = rule.over
        self.levels = LevelTracker(rule, book)
        self.samples: dict[str, tuple[list[int], list[float]]] = {}  # entity -> (times, values), in time order
        self.dirty: set[str] = set()

    def observe(self, entity: str, value: float, t: int, ctx: Context, event_id: str | None, out: Outputs) -> None:
        s = self.samples.get(entity)
        if s is None:
            s = self.samples[entity] = ([], [])
        times, values = s
        if times and t <= times[-1]:
            return  # late or repeated sample: the rate is about the newest data
        times.append(t)
        values.append(value)
        self.dirty.add(entity)
        cut = t - self.over
        if times[0] < cut:
            drop = bisect_left(times, cut)
            del times[:drop], values[:drop]
        self.levels.observe(entity, value - values[0], t, ctx, event_id, out)

    def snapshot(self, full: bool = True) -> dict[str, Any]:
        dirty, self.dirty = self.dirty, set()
        samples = self.samples if full else {e: self.samples[e] for e in dirty if e in self.samples}
        return {"s" if full else "d": samples, "l": self.levels.snapshot(full)}

    def restore(self, payload: Mapping[str, Any]) -> None:
        restored = {k: (list(v[0]), list(v[1])) for k, v in payload.get("s", payload.get("d", {})).items()}
        if "d" in payload:
            self.samples.update(restored)
        else:
            self.samples = restored
        self.levels.restore(payload.get("l", {}))


class AbsenceTracker:
    """Last observation per device; `check(ref)` opens an alert for each device silent longer than
    `after` at the reference time (opened_at = last observation + after, so replays give the same id)."""

    __slots__ = ("after", "book", "ctx", "dirty", "firing", "last", "next_due", "rule")

    def __init__(self, rule: AbsenceRule, book: AlertBook) -> None:
        self.rule = rule
        self.book = book
        self.after = rule.after
        self.last: dict[str, int] = {}
        self.ctx: dict[str, Context] = {}
        self.firing: set[str] = set()
        self.next_due = 0  # no device is due before this (a lower bound)
        self.dirty: set[str] = set()

    def seen(self, device: str, t: int, ctx: Context, event_id: str, out: Outputs) -> None:
        last = self.last.get(device)
        if last is None:
            self.ctx[device] = ctx
            if not self.next_due or t + self.after < self.next_due:
                self.next_due = t + self.after
        elif t <= last:
            return
        self.last[device] = t
        self.dirty.add(device)
        if device in self.firing and self.book.clear(self.rule, device, t, None, event_id, out):
            self.firing.discard(device)
            if t + self.after < self.next_due:
                self.next_due = t + self.after

    def check(self, ref: int, out: Outputs) -> None:
        if not self.last or ref < self.next_due:
            return
        after, nxt = self.after, 0
        for device, last in self.last.items():
            due = last + after
            if device in self.firing:
                continue
            if ref >= due:
                self.firing.add(device)
                self.book.trigger(self.rule, device, self.rule.severity, None, due, self.ctx[device], None, out)
            elif not nxt or due < nxt:
                nxt = due
        self.next_due = nxt or ref + after

    def snapshot(self, full: bool = True) -> dict[str, Any]:
        dirty, self.dirty = self.dirty, set()
        if full:
            return {"last": self.last, "ctx": self.ctx, "firing": sorted(self.firing)}
        return {"dl": {d: [self.last[d], self.ctx[d]] for d in dirty}, "firing": sorted(self.firing)}

    def restore(self, payload: Mapping[str, Any]) -> None:
        if "dl" in payload:
            for d, (last, ctx) in payload["dl"].items():
                self.last[d] = last
                self.ctx[d] = tuple(ctx)  # type: ignore[assignment]
        else:
            self.last = dict(payload.get("last", {}))
            self.ctx = {k: tuple(v) for k, v in payload.get("ctx", {}).items()}  # type: ignore[misc]
        self.firing = set(payload.get("firing", ()))
        self.next_due = 0


class _Plan:
    """What the device-scoped rules need from one device: built once per device."""

    __slots__ = ("absence", "ctx", "kind", "metrics", "region")

    def __init__(self, kind: str, region: str, ctx: Context, metrics: dict[str, tuple[Context, list[Any]]],
                 absence: list[AbsenceTracker]) -> None:
        self.kind, self.region, self.ctx, self.metrics, self.absence = kind, region, ctx, metrics, absence


class DeviceRules:
    """Threshold, rate and absence rules over the readings of one partition."""

    def __init__(self, rules: RuleSet, book: AlertBook) -> None:
        self.book = book
        self.trackers: dict[str, LevelTracker | RateTracker] = {}
        self.absence: dict[str, AbsenceTracker] = {}
        for r in rules.of_type(ThresholdRule):
            self.trackers[r.id] = LevelTracker(r, book)
        for r in rules.of_type(RateRule):
            self.trackers[r.id] = RateTracker(r, book)
        for r in rules.of_type(AbsenceRule):
            self.absence[r.id] = AbsenceTracker(r, book)
        # rules indexed by kind (None = any kind), then narrowed per device in its plan
        self.by_kind: dict[str | None, list[ThresholdRule | RateRule | AbsenceRule]] = {}
        for r in [*rules.of_type(ThresholdRule), *rules.of_type(RateRule), *rules.of_type(AbsenceRule)]:
            self.by_kind.setdefault(r.kind, []).append(r)
        self.plans: dict[str, _Plan] = {}
        self.active = bool(self.by_kind)

    def _plan(self, reading: Reading) -> _Plan:
        device, kind, region = reading.device_id, reading.kind, reading.region
        metrics: dict[str, list[Any]] = {}
        absence: list[AbsenceTracker] = []
        for r in [*self.by_kind.get(None, ()), *self.by_kind.get(kind, ())]:
            if not r.matches_device(device, kind, region):
                continue
            if isinstance(r, AbsenceRule):
                absence.append(self.absence[r.id])
            else:
                metrics.setdefault(r.metric, []).append(self.trackers[r.id])
        kec = reading.kecamatan
        plan = self.plans[device] = _Plan(kind, region, (kind, region, kec, None),
                                          {m: ((kind, region, kec, m), trs) for m, trs in metrics.items()}, absence)
        return plan

    def on_reading(self, reading: Reading, out: Outputs) -> None:
        plan = self.plans.get(reading.device_id)
        if plan is None or plan.kind != reading.kind or plan.region != reading.region:
            plan = self._plan(reading)
        metrics = plan.metrics
        if not metrics and not plan.absence:
            return
        device, t = reading.device_id, reading.time
        for tracker in plan.absence:
            last = tracker.last.get(device)
            if last is not None and device not in tracker.firing:
                if t > last:
                    tracker.last[device] = t
                    tracker.dirty.add(device)
            else:
                tracker.seen(device, t, plan.ctx, reading.id, out)
        if metrics:
            for metric, value in reading.values.items():
                entry = metrics.get(metric)
                if entry is not None:
                    ctx, trackers = entry
                    for tr in trackers:
                        tr.observe(device, value, t, ctx, reading.id, out)

    def check(self, ref: int, out: Outputs) -> None:
        for tracker in self.absence.values():
            tracker.check(ref, out)

    def snapshot(self, full: bool = True) -> dict[str, Any]:
        return {"t": {k: v.snapshot(full) for k, v in self.trackers.items()},
                "a": {k: v.snapshot(full) for k, v in self.absence.items()}}

    def restore(self, payload: Mapping[str, Any]) -> None:
        for k, v in payload.get("t", {}).items():
            if k in self.trackers:
                self.trackers[k].restore(v)
        for k, v in payload.get("a", {}).items():
            if k in self.absence:
                self.absence[k].restore(v)


class SlaRules:
    """Per SLA rule, the entities whose start status came and whose end status has not (yet)."""

    def __init__(self, rules: RuleSet, book: AlertBook) -> None:
        self.book = book
        self.rules: list[SlaRule] = rules.of_type(SlaRule)
        self.by_event: dict[str, list[SlaRule]] = {}
        for r in self.rules:
            self.by_event.setdefault(r.event, []).append(r)
        # rule id -> entity -> [start time, region, kecamatan, fired 0/1]
        self.pending: dict[str, dict[str, list[Any]]] = {r.id: {} for r in self.rules}
        # rule id -> entity -> end time (an end seen before its start: the late start is not pending)
        self.ended: dict[str, dict[str, int]] = {r.id: {} for r in self.rules}
        self.next_due = 0
        self.dirty: set[tuple[str, str]] = set()  # (rule id, entity) changed since the last snapshot

    def on_event(self, event_type: str, entity: str, status: str | None, t: int, region: str | None,
                 kecamatan: str | None, event_id: str | None, out: Outputs) -> None:
        for rule in self.by_event.get(event_type, ()):
            if not rule.matches_region(region):
                continue
            pending, ended = self.pending[rule.id], self.ended[rule.id]
            if status in rule.starts:
                if entity in pending or ended.get(entity, -1) >= t:
                    continue
                pending[entity] = [t, region, kecamatan, 0]
                self.dirty.add((rule.id, entity))
                due = t + rule.within
                if not self.next_due or due < self.next_due:
                    self.next_due = due
            elif status in rule.ends:
                p = pending.pop(entity, None)
                self.dirty.add((rule.id, entity))
                if p is None:
                    ended[entity] = max(t, ended.get(entity, t))
                elif p[3]:
                    self.book.clear(rule, entity, t, None, event_id, out, force=True)

    def check(self, ref: int, out: Outputs) -> None:
        if not self.rules or not self.next_due or ref < self.next_due:
            return
        nxt = 0
        for rule in self.rules:
            within = rule.within
            stale = []
            for entity, p in self.pending[rule.id].items():
                if p[3]:
                    if ref - p[0] > SLA_FORGET_MS:
                        stale.append(entity)  # breached long ago and never ended: its alert stays open
                    continue
                due = p[0] + within
                if ref >= due:
                    p[3] = 1
                    self.dirty.add((rule.id, entity))
                    self.book.trigger(rule, entity, rule.severity, None, due,
                                      (rule.event, p[1], p[2], None), None, out)
                elif not nxt or due < nxt:
                    nxt = due
            for entity in stale:
                del self.pending[rule.id][entity]
                self.dirty.add((rule.id, entity))
            ended = self.ended[rule.id]
            if ended:  # an out-of-order start older than this is not expected any more
                for entity in [e for e, t in ended.items() if ref - t > within]:
                    del ended[entity]
                    self.dirty.add((rule.id, entity))
        self.next_due = nxt

    def snapshot(self, full: bool = True) -> dict[str, Any]:
        dirty, self.dirty = self.dirty, set()
        if full:
            return {"p": self.pending, "e": self.ended}
        return {"d": [[rid, e, self.pending[rid].get(e), self.ended[rid].get(e)] for rid, e in dirty
                      if rid in self.pending]}

    def restore(self, payload: Mapping[str, Any]) -> None:
        for rid, e, p, ended in payload.get("d", ()):
            if rid in self.pending:
                self.pending[rid].pop(e, None)
                self.ended[rid].pop(e, None)
                if p is not None:
                    self.pending[rid][e] = list(p)
                if ended is not None:
                    self.ended[rid][e] = ended
        for rid, entities in payload.get("p", {}).items():
            if rid in self.pending:
                self.pending[rid] = {k: list(v) for k, v in entities.items()}
        for rid, entities in payload.get("e", {}).items():
            if rid in self.ended:
                self.ended[rid] = dict(entities)
        self.next_due = min((p[0] + r.within for r in self.rules for p in self.pending[r.id].values() if not p[3]),
                            default=0)


class AggregateRules:
    """Rules over the merged kecamatan windows: keeps, per (kecamatan, metric) a rule needs, the
    windows of the longest `over` as [count, sum, min, max, last_time] and re-evaluates on each update."""

    def __init__(self, rules: RuleSet, book: AlertBook, size_ms: int) -> None:
        self.book = book
        self.size_ms = size_ms
        self.by_metric: dict[str, list[tuple[AggregateRule, LevelTracker]]] = {}
        for r in rules.of_type(AggregateRule):
            self.by_metric.setdefault(r.metric, []).append((r, LevelTracker(r, book)))
        self.keep = {m: max(r.over for r, _ in rules_) for m, rules_ in self.by_metric.items()}
        self.windows: dict[str, dict[str, dict[int, list[float]]]] = {}  # metric -> kec -> start -> stats

    def on_window(self, kecamatan: str, metric: str, start: int, stats: Mapping[str, float], out: Outputs) -> None:
        rules = self.by_metric.get(metric)
        if not rules:
            return
        wins = self.windows.setdefault(metric, {}).setdefault(kecamatan, {})
        wins[start] = [stats["count"], stats["sum"], stats["min"], stats["max"], stats.get("last_time", 0)]
        latest = max(wins)
        for s in [s for s in wins if s + self.size_ms + self.keep[metric] <= latest + self.size_ms]:
            del wins[s]
        for rule, tracker in rules:
            if not rule.matches_region(kecamatan):
                continue
            lo = latest + self.size_ms - rule.over
            sel = [w for s, w in wins.items() if s >= lo]
            count = sum(w[0] for w in sel)
            if not count:
                continue
            if rule.agg == "mean":
                value = sum(w[1] for w in sel) / count
            elif rule.agg == "sum":
                value = sum(w[1] for w in sel)
            elif rule.agg == "min":
                value = min(w[2] for w in sel)
            elif rule.agg == "max":
                value = max(w[3] for w in sel)
            else:
                value = float(count)
            t = int(max(w[4] for w in sel)) or latest + self.size_ms
            tracker.observe(kecamatan, value, t, (None, kecamatan, kecamatan, metric),
                            f"kecamatan|{kecamatan}|{metric}|{latest}", out)

    def snapshot(self) -> dict[str, Any]:
        return {"w": {m: {k: [[s, *w] for s, w in wins.items()] for k, wins in kecs.items()}
                      for m, kecs in self.windows.items()},
                "l": {r.id: tr.snapshot() for rules in self.by_metric.values() for r, tr in rules}}

    def restore(self, payload: Mapping[str, Any]) -> None:
        self.windows = {m: {k: {int(w[0]): list(w[1:]) for w in wins} for k, wins in kecs.items()}
                        for m, kecs in payload.get("w", {}).items()}
        levels = payload.get("l", {})
        for rules in self.by_metric.values():
            for r, tr in rules:
                tr.restore(levels.get(r.id, {}))
