"""Device status envelopes (`online` / `offline`, from the device or its MQTT last will).

Status of a registered device is forwarded to jember.device-status keyed by device id; anything else is
dead-lettered with its reason. Stateless, so its checkpoint part is empty.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from schemas import reasons, topics
from schemas.envelope import parse_event_time
from schemas.results import Rejected

from .outputs import Outputs
from .validation import DeviceInfo

STATUSES = frozenset({"online", "offline"})


class DeviceStatusHandler:
    def __init__(self, partition: int, source_topic: str,
                 registry: Callable[[], Mapping[str, DeviceInfo]]) -> None:
        self.partition = partition
        self.source_topic = source_topic
        self.registry = registry

    def handle(self, env: dict[str, Any], raw: bytes, offset: int, now_ms: int, out: Outputs) -> None:
        device_id = env.get("subject")
        data = env.get("data")
        status = data.get("status") if isinstance(data, dict) else None
        t = parse_event_time(env.get("time"))
        rejected: Rejected | None = None
        if not isinstance(device_id, str):
            rejected = Rejected(reasons.INVALID_ENVELOPE, "status needs `subject` = device id")
        elif status not in STATUSES:
            rejected = Rejected(reasons.INVALID_PAYLOAD, "status must be `online` or `offline`")
        elif t is None:
            rejected = Rejected(reasons.INVALID_TIMESTAMP, "`time` must be RFC 3339 with an offset or epoch ms")
        elif (device := self.registry().get(device_id)) is None:
            rejected = Rejected(reasons.UNKNOWN_DEVICE, f"device {device_id!r} is not registered")
        elif device.revoked:
            rejected = Rejected(reasons.REVOKED_DEVICE, f"device {device_id!r} is revoked")
        if rejected is not None:
            out.dead_letter(rejected, raw, self.source_topic, self.partition, offset, now_ms,
                            device_id if isinstance(device_id, str) else None)
            return
        assert t is not None and isinstance(device_id, str)
        out.emit(topics.DEVICE_STATUS, device_id, {
            "device_id": device_id, "status": status, "time": int(t.timestamp() * 1000), "id": env.get("id"),
        })

    def flush(self, out: Outputs) -> None:
        return None

    def snapshot(self, full: bool) -> dict[str, Any]:
        return {}

    def restore(self, payload: Mapping[str, Any]) -> None:
        return None
