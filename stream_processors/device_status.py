"""Device status: online/offline per device, derived in the stream, transitions to jember.device-status.

Three inputs decide a device's status:
- `status` envelopes (`online` / `offline` on jember/v1/{id}/status, retained, and the MQTT last will):
  applied at once unless older than the status already held (`time` of the envelope, which the
  gateway stamps with its receive time, or with 0 for a retained status the broker replays on
  subscription: of unknown age, it only sets the status of a device without a newer one);
- readings (this handler observes the telemetry partition's `fold`): a reading makes the device
  online (reason `reading`) unless an offline status message was received after the reading;
- silence: a device online for longer than `silence_factor` x its kind's `expected_interval_s`
  without a reading becomes offline (reason `silent`).

Clocks. Silence cannot be measured in event time: a partition's watermark stops when its devices
stop, which is exactly when silence must be detected. It is measured on the worker's wall clock
instead: a device's activity time is the latest of the gateway's receive time of its reading and the
worker's clock at the previous checkpoint (so a worker that lags behind its input does not mistake
the backlog for silence), and the silence check runs at every checkpoint (`on_flush`, every
checkpoint interval, also when no input arrives). After a restore each device gets a full tolerance
from the moment the worker resumed, so a restarted worker working through a backlog does not flap
its devices offline. `last_seen` is by observation time (the device's own clock), never moved back.

Only transitions are emitted, keyed by device id:
    {"device_id", "status": "online"|"offline", "reason": "status_message"|"reading"|"silent",
     "time": epoch ms of the transition (its ordering key), "last_seen": epoch ms or null, "id"}
`time` only grows per device, so the sink keeps the newest status whatever the redelivery.

State (JSON, in the partition's checkpoint): device -> [status, reason, time, last_seen, active];
a delta snapshot carries the devices changed since the previous one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from schemas import reasons, topics
from schemas.envelope import parse_event_time
from schemas.results import Rejected
from schemas.sensors import SENSOR_KINDS

from .outputs import Outputs
from .validation import DeviceInfo, Reading

STATUSES = frozenset({"online", "offline"})
ONLINE, OFFLINE = "online", "offline"
BY_MESSAGE, BY_READING, BY_SILENCE = "status_message", "reading", "silent"
STATUS, REASON, SINCE, SEEN, ACTIVE = range(5)
DEFAULT_INTERVAL_S = 600  # for a kind missing from the catalogue (should not happen)


class DeviceStatusHandler:
    """Handler of `status` envelopes and observer of readings for one ingest partition."""

    def __init__(self, partition: int, source_topic: str,
                 registry: Callable[[], Mapping[str, DeviceInfo]], silence_factor: float = 3.0) -> None:
        self.partition = partition
        self.source_topic = source_topic
        self.registry = registry
        self.silence_factor = silence_factor
        self.devices: dict[str, list[Any]] = {}
        self.dirty: set[str] = set()
        self.clock_ms = 0  # the worker's clock at the last checkpoint
        self.resumed_ms: int | None = None  # the first checkpoint of this instance (start or restore)
        self._tolerance: dict[str, int] = {}  # kind -> silence tolerance in ms

    # -- status envelopes -----------------------------------------------------------------------
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
        assert t is not None and isinstance(device_id, str) and isinstance(status, str)
        t_ms = int(t.timestamp() * 1000)
        st = self.devices.get(device_id)
        if st is None:
            st = self.devices[device_id] = [None, None, 0, None, 0]
        elif t_ms < st[SINCE]:
            return  # older than the status we hold (a redelivery, or overtaken by a reading)
        if status == ONLINE:
            st[ACTIVE] = max(st[ACTIVE], t_ms, self.clock_ms)  # the silence timer starts now
            self.dirty.add(device_id)
        if st[STATUS] != status:
            self._transition(device_id, st, status, BY_MESSAGE, t_ms, out,
                             env.get("id") if isinstance(env.get("id"), str) else None)

    # -- readings (observer of TelemetryPartition.fold) -------------------------------------------
    def on_reading(self, reading: Reading, out: Outputs) -> None:
        device_id = reading.device_id
        st = self.devices.get(device_id)
        if st is None:
            st = self.devices[device_id] = [None, None, 0, None, 0]
        t, seen = reading.time, st[SEEN]
        if seen is None or t > seen:
            st[SEEN] = t
        received = reading.received
        active = received if received > self.clock_ms else self.clock_ms  # (no max(): hot path)
        if active > st[ACTIVE]:
            st[ACTIVE] = active
        self.dirty.add(device_id)
        if st[STATUS] == ONLINE:
            return
        if st[STATUS] == OFFLINE and st[REASON] == BY_MESSAGE and received < st[SINCE]:
            return  # received before the device said offline (or its last will fired): stays offline
        # online again; `time` stays monotonic per device even across gateway clocks
        self._transition(device_id, st, ONLINE, BY_READING, max(received, st[SINCE] + 1), out, None)

    def on_flush(self, now_ms: int, out: Outputs) -> None:
        """Silence check, at every checkpoint (also when no input arrived)."""
        self.clock_ms = max(self.clock_ms, now_ms)
        if self.resumed_ms is None:
            self.resumed_ms = now_ms
        floor = self.resumed_ms
        registry = None
        for device_id, st in self.devices.items():
            if st[STATUS] != ONLINE:
                continue
            if registry is None:
                registry = self.registry()
            info = registry.get(device_id)
            tolerance = self.tolerance_ms(info.kind if info is not None else "")
            if max(st[ACTIVE], floor) + tolerance < now_ms:
                self._transition(device_id, st, OFFLINE, BY_SILENCE, max(now_ms, st[SINCE] + 1), out, None)

    def tolerance_ms(self, kind: str) -> int:
        tol = self._tolerance.get(kind)
        if tol is None:
            spec = SENSOR_KINDS.get(kind)
            interval = spec.expected_interval_s if spec is not None else DEFAULT_INTERVAL_S
            tol = self._tolerance[kind] = max(1, int(interval * 1000 * self.silence_factor))
        return tol

    def _transition(self, device_id: str, st: list[Any], status: str, reason: str, t_ms: int,
                    out: Outputs, event_id: str | None) -> None:
        st[STATUS], st[REASON], st[SINCE] = status, reason, t_ms
        self.dirty.add(device_id)
        out.emit(topics.DEVICE_STATUS, device_id, {
            "device_id": device_id, "status": status, "reason": reason, "time": t_ms, "last_seen": st[SEEN],
            "id": event_id or f"{device_id}/{status}/{t_ms}",
        })

    # -- EnvelopeHandler: checkpoint ------------------------------------------------------------
    def flush(self, out: Outputs) -> None:
        return None  # the silence check needs the clock: on_flush

    def snapshot(self, full: bool) -> dict[str, Any]:
        keys = self.devices.keys() if full else self.dirty
        payload = {"d": {k: list(self.devices[k]) for k in keys if k in self.devices}}
        self.dirty = set()
        return payload

    def restore(self, payload: Mapping[str, Any]) -> None:
        if payload.get("full"):
            self.devices.clear()
        for device_id, st in (payload.get("d") or {}).items():
            if isinstance(st, list) and len(st) == 5:
                self.devices[device_id] = list(st)
