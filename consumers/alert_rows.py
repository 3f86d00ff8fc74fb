"""jember.alerts -> alerts (one row per alert) and alert_events (one row per transition): record sink spec.

Each message is {"alert": <the alert after the transition>, "event": <the transition>} (schemas/alerts.py).
- alerts: upsert by id; only a higher `version` (the stream's transition counter) changes the row, so
  redeliveries and overtaken messages change nothing. The stream never undoes an operator's state: an
  acknowledged row stays acknowledged and a resolved row stays resolved (the API writes operators'
  transitions straight to the table, the stream may learn of them later), except with an explicit
  `reopened` transition, which opens the alert again.
- alert_events: INSERT ... ON CONFLICT (dedup) DO NOTHING (dedup `{id}:{version}` for the stream's own
  transitions, `{id}:cmd:{command_id}` for operators' commands, shared with the API's direct write).
  The table's trigger NOTIFYs arus_alert_events, which feeds the SSE endpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from schemas import topics
from schemas.alerts import SEVERITIES, STATES, TRANSITIONS

from .records import BadRecord, TableSpec, Write
from .rows import ms_to_datetime

_MAX_MS = 253_402_300_799_999
_COLUMNS = ("id", "rule_id", "entity", "kind", "region_code", "kecamatan", "metric", "severity", "state", "value",
            "message", "opened_at", "updated_at", "acknowledged_at", "acknowledged_by", "resolved_at",
            "resolved_by", "trigger_event", "version")
_TIMES = frozenset({"opened_at", "updated_at", "acknowledged_at", "resolved_at"})
_REQUIRED = frozenset({"id", "rule_id", "entity", "severity", "state", "opened_at", "updated_at", "version"})

UPSERT_ALERT = (
    f"INSERT INTO alerts AS a ({', '.join(_COLUMNS)}) VALUES ({', '.join(f'%({c})s' for c in _COLUMNS)})"
    " ON CONFLICT (id) DO UPDATE SET"
    " severity = EXCLUDED.severity, value = EXCLUDED.value, message = EXCLUDED.message,"
    " updated_at = GREATEST(a.updated_at, EXCLUDED.updated_at), trigger_event = EXCLUDED.trigger_event,"
    " version = EXCLUDED.version,"
    " state = CASE WHEN %(reopened)s THEN EXCLUDED.state WHEN a.state = 'resolved' THEN a.state"
    "   WHEN a.state = 'acknowledged' AND EXCLUDED.state = 'open' THEN a.state ELSE EXCLUDED.state END,"
    " acknowledged_at = CASE WHEN %(reopened)s THEN EXCLUDED.acknowledged_at"
    "   ELSE COALESCE(a.acknowledged_at, EXCLUDED.acknowledged_at) END,"
    " acknowledged_by = CASE WHEN %(reopened)s THEN EXCLUDED.acknowledged_by"
    "   ELSE COALESCE(a.acknowledged_by, EXCLUDED.acknowledged_by) END,"
    " resolved_at = CASE WHEN %(reopened)s THEN EXCLUDED.resolved_at WHEN a.state = 'resolved' THEN a.resolved_at"
    "   ELSE EXCLUDED.resolved_at END,"
    " resolved_by = CASE WHEN %(reopened)s THEN EXCLUDED.resolved_by WHEN a.state = 'resolved' THEN a.resolved_by"
    "   ELSE EXCLUDED.resolved_by END"
    " WHERE a.version < EXCLUDED.version"
)
INSERT_EVENT = (
    "INSERT INTO alert_events (dedup, alert_id, time, transition, severity, state, actor, value, note)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (dedup) DO NOTHING"
)


def _time(value: Any, name: str) -> datetime | None:
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= _MAX_MS:
        raise BadRecord(f"`{name}` must be epoch milliseconds")
    return ms_to_datetime(value)


def _text(value: Any, name: str, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value) or "\x00" in value:
        raise BadRecord(f"`{name}` must be text")
    return value


def _number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRecord(f"`{name}` must be a number")
    return float(value)


def convert(msg: Mapping[str, Any]) -> list[Write]:
    alert, event = msg.get("alert"), msg.get("event")
    if not isinstance(alert, Mapping) or not isinstance(event, Mapping):
        raise BadRecord("an alert message has `alert` and `event` objects")
    missing = _REQUIRED - {k for k, v in alert.items() if v is not None}
    if missing:
        raise BadRecord(f"alert lacks {', '.join(sorted(missing))}")
    if alert["severity"] not in SEVERITIES or event.get("severity") not in SEVERITIES:
        raise BadRecord(f"severity must be one of {', '.join(SEVERITIES)}")
    if alert["state"] not in STATES or event.get("state") not in STATES:
        raise BadRecord(f"state must be one of {', '.join(STATES)}")
    transition = event.get("transition")
    if transition not in TRANSITIONS:
        raise BadRecord(f"transition must be one of {', '.join(TRANSITIONS)}")
    version = alert["version"]
    if type(version) is not int or version < 0:
        raise BadRecord("`version` must be a non-negative integer")
    values: dict[str, Any] = {}
    for col in _COLUMNS:
        v = alert.get(col)
        if col in _TIMES:
            values[col] = _time(v, col)
        elif col == "value":
            values[col] = _number(v, col)
        elif col == "version":
            values[col] = version
        else:
            values[col] = _text(v, col, required=col in _REQUIRED)
    values["message"] = values["message"] or ""
    if values["opened_at"] is None or values["updated_at"] is None:
        raise BadRecord("opened_at and updated_at are required")
    values["reopened"] = transition == "reopened"
    ev = (
        _text(event.get("dedup"), "event.dedup", required=True), values["id"], _time(event.get("time"), "event.time"),
        transition, event["severity"], event["state"], _text(event.get("actor"), "event.actor", required=True),
        _number(event.get("value"), "event.value"), _text(event.get("note"), "event.note"),
    )
    if ev[2] is None:
        raise BadRecord("event.time is required")
    return [(UPSERT_ALERT, values), (INSERT_EVENT, ev)]  # type: ignore[list-item]  # named parameters


SPECS = [TableSpec(topic=topics.ALERTS, convert=convert, name="alerts+alert_events")]
