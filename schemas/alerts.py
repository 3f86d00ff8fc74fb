"""The alert contract: what the stream emits on jember.alerts and how operators' commands reach it.

jember.alerts value (JSON), keyed by alert id:
    {"alert": {id, rule_id, entity, kind, region_code, kecamatan, metric, severity, state, value,
               message, opened_at, updated_at, acknowledged_at, acknowledged_by, resolved_at,
               resolved_by, trigger_event, version},          # times in epoch ms (or null)
     "event": {dedup, transition, time, severity, state, actor, value, note}}
`version` counts the stream's transitions of one alert; `event.dedup` is unique per transition
(`{id}:{version}` for the stream's own, `{id}:cmd:{command_id}` for an operator command) so replays
and the API's direct write of the same command collapse into one alert_events row.

Operators' acknowledge/resolve: the API writes the transition to the database at once (so every
console sees it) and produces a command envelope to jember.ingest so the stream's alert state learns
it (an operator-resolved alert is not updated again; the next trigger opens a new alert).
Stream updates never undo an operator's transition, except an explicit `reopened`.
"""

from __future__ import annotations

SEVERITIES = ("info", "warning", "major", "critical")  # ascending
STATES = ("open", "acknowledged", "resolved")
TRANSITIONS = ("opened", "escalated", "deescalated", "updated", "acknowledged", "resolved", "reopened")
COMMAND_TYPE = "jember.alert.command.v1"
COMMAND_ACTIONS = ("ack", "resolve")


def severity_rank(severity: str) -> int:
    return SEVERITIES.index(severity)


def command_key(entity: str) -> str:
    """Kafka key of a command for an alert on `entity`: the same key the entity's events carry on
    jember.ingest (device id), so the command reaches the partition that holds the alert's state."""
    return entity


def command_dedup(alert_id: str, command_id: str) -> str:
    return f"{alert_id}:cmd:{command_id}"
