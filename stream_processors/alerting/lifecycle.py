"""The alert lifecycle of one partition: at most one open alert per (rule, entity).

Evaluators say `trigger(severity)` or `clear()`; the book decides what that means for the alert and
emits each transition on jember.alerts (schemas/alerts.py): open a new alert, escalate or de-escalate
it, resolve it, re-open it when it triggers again within the rule's `reopen_window` after an
auto-resolve (same id, transition `reopened`), and hold back the auto-resolve of a flapping alert
(more than `max_reopens` re-opens within `flap_window`) until the condition stayed clear for
`reopen_window`. Operators' commands acknowledge (later changes keep it acknowledged) or resolve it
(closed for good in the stream: the next trigger opens a new alert with a new id).

Plain data in, records out: times are event-time epoch ms given by the caller; the state is JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from schemas import topics
from schemas.alerts import command_dedup, severity_rank

from ..outputs import Outputs

STREAM = "stream"
PUBLIC = ("id", "rule_id", "entity", "kind", "region_code", "kecamatan", "metric", "severity", "state", "value",
          "message", "opened_at", "updated_at", "acknowledged_at", "acknowledged_by", "resolved_at",
          "resolved_by", "trigger_event", "version")
Context = tuple[str | None, str | None, str | None, str | None]  # kind, region code, kecamatan, metric


class RuleLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def reopen_window(self) -> int: ...
    @property
    def max_reopens(self) -> int: ...
    @property
    def flap_window(self) -> int: ...
    def template(self, severity: str) -> str: ...


def alert_id(rule_id: str, entity: str, opened_at: int) -> str:
    return f"{rule_id}:{entity}:{opened_at}"


class AlertBook:
    def __init__(self) -> None:
        self.open: dict[tuple[str, str], dict[str, Any]] = {}
        self.closed: dict[tuple[str, str], dict[str, Any]] = {}  # auto-resolved, may re-open
        self._by_rule: dict[str, dict[str, dict[str, Any]]] = {}  # rule id -> entity -> open alert
        self._dirty: set[tuple[str, str]] = set()  # changed since the last snapshot
        self._templates: dict[tuple[str, str], str] = {}  # (rule id, severity) -> message template

    def _message(self, rule: RuleLike, entity: str, severity: str, value: float | None) -> str:
        template = self._templates.get((rule.id, severity))
        if template is None:
            template = self._templates[(rule.id, severity)] = rule.template(severity)
        return template.replace("{entity}", entity).replace("{value}", "" if value is None else f"{value:.4g}")

    def index(self, rule_id: str) -> dict[str, dict[str, Any]]:
        """The open alerts of one rule by entity (a live view, for evaluators' fast path)."""
        return self._by_rule.setdefault(rule_id, {})

    def _set_open(self, key: tuple[str, str], a: dict[str, Any]) -> None:
        self.open[key] = a
        self.index(key[0])[key[1]] = a

    def _drop_open(self, key: tuple[str, str]) -> None:
        del self.open[key]
        self.index(key[0]).pop(key[1], None)

    # -- stream transitions ------------------------------------------------------------------------
    def trigger(self, rule: RuleLike, entity: str, severity: str, value: float | None, t: int, ctx: Context,
                trigger_event: str | None, out: Outputs) -> None:
        key = (rule.id, entity)
        a = self.open.get(key)
        if a is None:
            self._dirty.add(key)
            old = self.closed.pop(key, None)
            if old is not None and 0 <= t - old["resolved_at"] <= rule.reopen_window:
                a = old
                self._set_open(key, a)
                a.update(state="open", severity=severity, value=value, resolved_at=None, resolved_by=None,
                         acknowledged_at=None, acknowledged_by=None, trigger_event=trigger_event,
                         message=self._message(rule, entity, severity, value), _clear_since=None)
                a["_reopens"] = [r for r in a["_reopens"] if t - r <= rule.flap_window] + [t]
                self._emit(a, "reopened", t, out)
                return
            kind, region, kec, metric = ctx
            a = {
                "id": alert_id(rule.id, entity, t), "rule_id": rule.id, "entity": entity, "kind": kind,
                "region_code": region, "kecamatan": kec, "metric": metric, "severity": severity, "state": "open",
                "value": value, "message": self._message(rule, entity, severity, value), "opened_at": t,
                "updated_at": t, "acknowledged_at": None, "acknowledged_by": None, "resolved_at": None,
                "resolved_by": None, "trigger_event": trigger_event, "version": 0,
                "_reopens": [], "_clear_since": None,
            }
            self._set_open(key, a)
            self._emit(a, "opened", t, out)
            return
        if a["_clear_since"] is not None:
            a["_clear_since"] = None
            self._dirty.add(key)
        if severity == a["severity"]:
            return  # the same condition again: no transition; `value` stays the one of the last transition
        self._dirty.add(key)
        up = severity_rank(severity) > severity_rank(a["severity"])
        a.update(severity=severity, value=value, trigger_event=trigger_event,
                 message=self._message(rule, entity, severity, value))
        self._emit(a, "escalated" if up else "deescalated", t, out)

    def clear(self, rule: RuleLike, entity: str, t: int, value: float | None, trigger_event: str | None,
              out: Outputs, force: bool = False) -> bool:
        """The condition cleared. Returns False while a flapping alert's resolve is held back."""
        key = (rule.id, entity)
        a = self.open.get(key)
        if a is None:
            return True
        self._dirty.add(key)
        note = None
        reopens = a["_reopens"]
        while reopens and t - reopens[0] > rule.flap_window:
            del reopens[0]  # re-opens older than the flap window no longer count
        if not force and len(reopens) > rule.max_reopens:
            since = a["_clear_since"]
            if since is None or t < since:
                a["_clear_since"] = t
                return False
            if t - since < rule.reopen_window:
                return False
            note = f"flapping: resolved after {(t - since) // 1000}s clear"
        a.update(state="resolved", resolved_at=t, resolved_by=STREAM, value=value, trigger_event=trigger_event,
                 _clear_since=None)
        self._emit(a, "resolved", t, out, note=note)
        self._drop_open(key)
        self.closed[key] = a
        return True

    def is_open(self, rule_id: str, entity: str) -> bool:
        return (rule_id, entity) in self.open

    def expire(self, t: int, reopen_window: Mapping[str, int]) -> None:
        """Forget auto-resolved alerts whose re-open window has passed (t: the partition's event time)."""
        if self.closed:
            for key in [k for k, a in self.closed.items()
                        if t - a["resolved_at"] > reopen_window.get(k[0], 0)]:
                del self.closed[key]
                self._dirty.add(key)

    # -- operators --------------------------------------------------------------------------------
    def command(self, action: str, actor: str, alert: str, rule_id: str, entity: str, command_id: str, t: int,
                out: Outputs) -> bool:
        """Apply an operator's ack/resolve; False when this partition does not hold the alert."""
        key = (rule_id, entity)
        a = self.open.get(key)
        if a is not None and a["id"] == alert:
            self._dirty.add(key)
            dedup = command_dedup(alert, command_id)
            if action == "ack":
                if a["state"] != "acknowledged":
                    a.update(state="acknowledged", acknowledged_at=t, acknowledged_by=actor)
                    self._emit(a, "acknowledged", t, out, actor=actor, dedup=dedup)
            else:
                a.update(state="resolved", resolved_at=t, resolved_by=actor, _clear_since=None)
                self._emit(a, "resolved", t, out, actor=actor, dedup=dedup)
                self._drop_open(key)  # not re-openable: the next trigger opens a new alert
            return True
        old = self.closed.get(key)
        if old is not None and old["id"] == alert:
            if action == "resolve":
                del self.closed[key]  # confirmed by an operator: a new trigger is a new alert
                self._dirty.add(key)
            return True
        return False

    def _emit(self, a: dict[str, Any], transition: str, t: int, out: Outputs, actor: str = STREAM,
              dedup: str | None = None, note: str | None = None) -> None:
        a["version"] += 1
        if t > a["updated_at"]:
            a["updated_at"] = t
        event = {"dedup": dedup or f"{a['id']}:{a['version']}", "transition": transition, "time": t,
                 "severity": a["severity"], "state": a["state"], "actor": actor, "value": a["value"], "note": note}
        out.emit(topics.ALERTS, a["id"], {"alert": {k: a[k] for k in PUBLIC}, "event": event})

    # -- checkpoint -------------------------------------------------------------------------------
    def snapshot(self, full: bool = True) -> dict[str, Any]:
        """Everything, or (full=False) the alerts changed since the last snapshot: [rule, entity, where, alert]
        with where = "o" (open), "c" (auto-resolved, re-openable) or None (forgotten)."""
        dirty, self._dirty = self._dirty, set()
        if full:
            return {"open": list(self.open.values()), "closed": list(self.closed.values())}
        delta: list[list[Any]] = []
        for key in dirty:
            where: str | None = "o"
            a = self.open.get(key)
            if a is None:
                a = self.closed.get(key)
                where = "c" if a is not None else None
            delta.append([key[0], key[1], where, a])
        return {"delta": delta}

    def restore(self, payload: Mapping[str, Any]) -> None:
        if "delta" in payload:
            for rule_id, entity, where, a in payload["delta"]:
                key = (rule_id, entity)
                if key in self.open:
                    self._drop_open(key)
                self.closed.pop(key, None)
                if where == "o":
                    self._set_open(key, dict(a))
                elif where == "c":
                    self.closed[key] = dict(a)
            return
        self.open = {}
        for entities in self._by_rule.values():
            entities.clear()  # the same dicts: evaluators hold them
        for a in payload.get("open", ()):
            self._set_open((a["rule_id"], a["entity"]), dict(a))
        self.closed = {(a["rule_id"], a["entity"]): dict(a) for a in payload.get("closed", ())}
