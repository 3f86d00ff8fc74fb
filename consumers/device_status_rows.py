"""jember.device-status -> devices.status, status_time, status_reason, last_seen (record sink spec).

Each message is a transition of one device (stream_processors/device_status.py). Both statements are
idempotent and order-proof: the status moves only forward in transition time (a redelivered or
overtaken older transition changes nothing), and last_seen only forward in observation time, as the
hot sink does for readings (greatest of max(time)).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from schemas import topics

from .records import BadRecord, TableSpec, Write
from .rows import ms_to_datetime

STATUSES = frozenset({"online", "offline"})
REASONS = frozenset({"status_message", "reading", "silent"})
_MIN_MS, _MAX_MS = 0, 253_402_300_799_999  # up to 9999-12-31

UPDATE_STATUS = (
    "UPDATE devices SET status = %s, status_reason = %s, status_time = %s"
    " WHERE device_id = %s AND (status_time IS NULL OR status_time <= %s)"
    " AND (status, status_reason, status_time) IS DISTINCT FROM (%s::text, %s::text, %s::timestamptz)"
)
UPDATE_LAST_SEEN = (
    "UPDATE devices SET last_seen = %s WHERE device_id = %s AND (last_seen IS NULL OR last_seen < %s)"
)


def _ms(msg: Mapping[str, Any], name: str, optional: bool = False) -> datetime | None:
    value = msg.get(name)
    if value is None and optional:
        return None
    if type(value) is not int or not _MIN_MS <= value <= _MAX_MS:
        raise BadRecord(f"`{name}` must be epoch milliseconds")
    return ms_to_datetime(value)


def convert(msg: Mapping[str, Any]) -> list[Write]:
    device_id, status, reason = msg.get("device_id"), msg.get("status"), msg.get("reason", "status_message")
    if not isinstance(device_id, str) or not device_id or len(device_id) > 128 or "\x00" in device_id:
        raise BadRecord("`device_id` must be a device id")
    if status not in STATUSES:
        raise BadRecord("`status` must be online or offline")
    if reason not in REASONS:
        raise BadRecord(f"`reason` must be one of {', '.join(sorted(REASONS))}")
    t = _ms(msg, "time")
    seen = _ms(msg, "last_seen", optional=True)
    writes: list[Write] = [(UPDATE_STATUS, (status, reason, t, device_id, t, status, reason, t))]
    if seen is not None:
        writes.append((UPDATE_LAST_SEEN, (seen, device_id, seen)))
    return writes


# devices rows are also updated by the hot sink (last_seen): lock them in device_id order
SPECS = [TableSpec(topic=topics.DEVICE_STATUS, convert=convert, name="devices.status",
                   lock_key=lambda msg: str(msg.get("device_id")))]
