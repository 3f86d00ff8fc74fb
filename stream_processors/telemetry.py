"""The telemetry hot path for one input partition: validate, de-duplicate, window, emit.

Pure logic over (bytes, offset, now): no Kafka here. The runtime calls `process` per message,
`flush` at each checkpoint (dirty windows -> aggregates and region partials) and `snapshot`/`restore`
to keep the state across crashes and rebalances.
"""

from __future__ import annotations

import sys
import time
from array import array
from base64 import b64decode, b64encode
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import orjson

from schemas import reasons, topics
from schemas.envelope import TELEMETRY_TYPE
from schemas.results import Rejected

from . import windows as W
from .outputs import Outputs
from .validation import DeviceInfo, Reading, TimePolicy, validate_telemetry

WindowKey = tuple[str, str, int]  # (device_id or kecamatan, metric, window start ms)


class EnvelopeHandler(Protocol):
    """Another family of events on jember.ingest (device status, service events, ...), folded into the
    same partition's checkpoint. Each handler keeps its own JSON-serialisable state."""

    def handle(self, env: dict[str, Any], raw: bytes, offset: int, now_ms: int, out: Outputs) -> None: ...
    def flush(self, out: Outputs) -> None: ...
    def snapshot(self, full: bool) -> dict[str, Any]: ...
    def restore(self, payload: Mapping[str, Any]) -> None: ...


class ReadingObserver(Protocol):
    """Sees every accepted, in-window, non-duplicate reading (device status, alert rules) and the
    checkpoint clock. An observer with state also registers in `handlers` (or snapshots it itself)."""

    def on_reading(self, reading: Reading, out: Outputs) -> None: ...
    def on_flush(self, now_ms: int, out: Outputs) -> None: ...


def _pack(state: array) -> str:
    """A window's doubles for the checkpoint: base64 of the little-endian bytes (about 10x cheaper to
    write and read than a JSON list of floats, and exact)."""
    if sys.byteorder != "little":
        state = array("d", state)
        state.byteswap()
    return b64encode(state.tobytes()).decode("ascii")


def _unpack(values: str | list[float]) -> array:
    if isinstance(values, list):  # checkpoints written before the packed form
        return array("d", values)
    state = array("d")
    state.frombytes(b64decode(values))
    if sys.byteorder != "little":
        state.byteswap()
    return state


_WINDOW_FORMAT = "w2:"  # device windows in their bytes form (earlier checkpoints: doubles, see _unpack)


def _pack_window(state: bytes) -> str:
    return _WINDOW_FORMAT + b64encode(state).decode("ascii")


def _unpack_window(values: str | list[float], start: int) -> bytes:
    if isinstance(values, str) and values.startswith(_WINDOW_FORMAT):
        return b64decode(values[len(_WINDOW_FORMAT):])
    return W.from_doubles(_unpack(values), start)  # written by a worker before the bytes form


class TelemetryPartition:
    def __init__(
        self, partition: int, source_topic: str, size_ms: int, lateness_ms: int, policy: TimePolicy,
        registry: Callable[[], Mapping[str, DeviceInfo]],
    ) -> None:
        self.partition = partition
        self.source_topic = source_topic
        self.size_ms = size_ms
        self.lateness_ms = lateness_ms
        self.policy = policy
        self.registry = registry
        self.offset = -1  # last input offset folded into the state
        self.watermark = 0  # highest observation time seen on this partition
        # the watermark of the last checkpoint written: its windows' final partials were delivered
        # before it, and a restart resumes from it (the merge stage drops windows on it)
        self.checkpointed_watermark = -1
        self._snapshot_watermark = -1
        self.source_partitions = 0  # of the ingest topic (set by the runtime; 0: unknown)
        self.devices: dict[WindowKey, bytes] = {}  # device windows (windows.py: immutable, compact)
        self.regions: dict[WindowKey, array] = {}
        self._starts: dict[int, int] = {}
        self.region_of: dict[str, str] = {}  # device -> region code, for the aggregate rows
        self.dirty_devices: set[WindowKey] = set()
        self.dirty_regions: set[WindowKey] = set()
        self.aggregate_interval_ms = 0  # least time between two emissions of a changing window
        self._unemitted: set[WindowKey] = set()
        self._last_emit_ms = 0
        # other event types on the same topic, by exact type or by type prefix ending in "."
        self.handlers: dict[str, EnvelopeHandler] = {}
        self.observers: list[ReadingObserver] = []
        # registry.refresh_if_older_than: a device registered a moment before its first reading was
        # received must not be refused because the snapshot was refreshed (rate-limited) just before
        self.refresh_registry: Callable[[int], bool] | None = None

    # -- hot path -------------------------------------------------------------------------------
    def process(self, raw: bytes, offset: int, now_ms: int, out: Outputs) -> None:
        try:
            env = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            self._reject(Rejected(reasons.MALFORMED_JSON, f"not JSON: {exc}"), raw, offset, now_ms, out)
            return
        event_type = env.get("type") if isinstance(env, dict) else None
        if event_type != TELEMETRY_TYPE and isinstance(event_type, str) and self.handlers:
            handler = self._handler_for(event_type)
            if handler is not None:
                handler.handle(env, raw, offset, now_ms, out)
                return
        result, bad_values = validate_telemetry(env, self.registry(), now_ms, self.policy)
        if (isinstance(result, Rejected) and result.reason == reasons.UNKNOWN_DEVICE and self.refresh_registry
                and isinstance(received := env.get("arusreceived"), int) and self.refresh_registry(received)):
            result, bad_values = validate_telemetry(env, self.registry(), now_ms, self.policy)
        device_id = env.get("subject") if isinstance(env, dict) else None
        for rejected in bad_values:
            self._reject(rejected, raw, offset, now_ms, out, device_id)
        if isinstance(result, Rejected):
            self._reject(result, raw, offset, now_ms, out, device_id)
            return
        reading = result.value
        self.fold(reading, raw, offset, now_ms, out)

    def fold(self, reading: Reading, raw: bytes, offset: int, now_ms: int, out: Outputs) -> None:
        size = self.size_ms
        start = reading.time - (reading.time % size)
        start = self._starts.setdefault(start, start)  # one int object per window start, shared by keys
        if W.is_closed(start, size, self.lateness_ms, self.watermark):
            self._late(reading, start, raw, offset, now_ms, out)
            return
        t = reading.time
        if t > self.watermark:
            self.watermark = t
        device, kec = sys.intern(reading.device_id), reading.kecamatan  # one string per device in keys
        fresh: dict[str, float] = {}
        for metric, value in reading.values.items():
            key = (device, metric, start)
            state = self.devices.get(key)
            if state is None:
                self.devices[key] = W.initialize(value, t, start)
            else:
                state = W.add(state, value, t, start)
                if state is None:
                    continue  # this (device, metric, time) was counted already
                self.devices[key] = state
            fresh[metric] = value
            self.dirty_devices.add(key)
            if kec is not None:
                rkey = (kec, metric, start)
                rstate = self.regions.get(rkey)
                if rstate is None:
                    self.regions[rkey] = W.initialize_partial(value, t)
                else:
                    W.add_unchecked(rstate, value, t)
                self.dirty_regions.add(rkey)
        if not fresh:
            self._reject(Rejected(reasons.DUPLICATE, f"reading {reading.id} was already received"),
                         raw, offset, now_ms, out, device)
            return
        self.region_of[device] = reading.region
        reading.values = fresh
        out.emit(topics.TELEMETRY, device, {
            "id": reading.id, "device_id": device, "kind": reading.kind, "region": reading.region,
            "time": t, "values": fresh, "received": reading.received,
        })
        for observer in self.observers:
            observer.on_reading(reading, out)

    def _late(self, reading: Reading, start: int, raw: bytes, offset: int, now_ms: int, out: Outputs) -> None:
        """A reading whose window closed (older than the allowed lateness behind this partition's
        watermark, but younger than max_age): stored as a raw reading flagged `late`, while its window's
        aggregate stays as it was; the device is told so with reason too_late. The watermark is per
        partition, so one device's buffered batch after an outage is late although valid: keep it."""
        device = reading.device_id
        out.emit(topics.TELEMETRY, device, {
            "id": reading.id, "device_id": device, "kind": reading.kind, "region": reading.region,
            "time": reading.time, "values": reading.values, "received": reading.received, "late": True,
        })
        self._reject(Rejected(
            reasons.TOO_LATE,
            f"stored as a late reading, but the aggregate of window {start} closed after the allowed "
            f"lateness of {self.lateness_ms // 1000}s and was not corrected",
        ), raw, offset, now_ms, out, device)

    def _handler_for(self, event_type: str) -> EnvelopeHandler | None:
        handler = self.handlers.get(event_type)
        if handler is None:
            for prefix, candidate in self.handlers.items():
                if prefix.endswith(".") and event_type.startswith(prefix):
                    return candidate
        return handler

    def _reject(self, rejected: Rejected, raw: bytes, offset: int, now_ms: int, out: Outputs,
                device_id: Any = None) -> None:
        out.dead_letter(rejected, raw, self.source_topic, self.partition, offset, now_ms,
                        device_id if isinstance(device_id, str) else None)

    # -- checkpoint -----------------------------------------------------------------------------
    def flush(self, out: Outputs, now_ms: int | None = None) -> None:
        """Emit the full state of the windows changed since the last emission (at most every
        `aggregate_interval_ms`), the partials of changed kecamatan windows, and close expired ones."""
        size, lateness, wm = self.size_ms, self.lateness_ms, self.watermark
        now = now_ms if now_ms is not None else time.time_ns() // 1_000_000
        devices = self.devices
        unemitted = self._unemitted
        unemitted.update(self.dirty_devices)
        # A window changes at every reading (6 times a minute at a 10 s cadence): its running state
        # goes out every few seconds, not at every checkpoint. Nothing is lost: a window held back
        # here is in the checkpointed state and always goes out, at the latest when it closes.
        if now - self._last_emit_ms >= self.aggregate_interval_ms:
            for key in unemitted:
                state = devices.get(key)
                if state is not None:
                    self._emit_device(key, state, False, out)
            unemitted.clear()
            self._last_emit_ms = now
        for key in self.dirty_regions:
            partial = self.regions.get(key)
            if partial is not None:
                self._emit_partial(key, partial, False, out)
        for key in [k for k in self.devices if W.is_closed(k[2], size, lateness, wm)]:
            self._emit_device(key, self.devices.pop(key), True, out)
            unemitted.discard(key)
        for key in [k for k in self.regions if W.is_closed(k[2], size, lateness, wm)]:
            self._emit_partial(key, self.regions.pop(key), True, out)
        for handler in self.handlers.values():
            handler.flush(out)
        if self.observers:
            for observer in self.observers:
                observer.on_flush(now, out)
        self._starts = {s: s for s in self._starts if not W.is_closed(s, size, lateness, wm)}

    def _emit_device(self, key: WindowKey, state: bytes, final: bool, out: Outputs) -> None:
        device, metric, start = key
        out.emit(topics.AGGREGATES, f"device|{device}|{metric}|{start}", {
            "scope": "device", "key": device, "region": self.region_of.get(device, ""), "metric": metric,
            "window_start": start, "window_end": start + self.size_ms, **W.result(state), "final": final,
        })

    def _emit_partial(self, key: WindowKey, state: array, final: bool, out: Outputs) -> None:
        kec, metric, start = key
        # keyed by kecamatan: all windows of a kecamatan meet in one merge partition (its aggregate alert rules
        # need the windows of a whole `over`, e.g. an hour); each record replaces its own (window, source) slot
        out.emit(topics.REGION_PARTIALS, kec, {
            "kecamatan": kec, "metric": metric, "window_start": start, "window_end": start + self.size_ms,
            "src": f"{self.source_topic}:{self.partition}", "state": list(state[: W.HEADER]),
            "watermark": self.watermark, "final": final,
            "closed": self.checkpointed_watermark, "of": self.source_partitions,  # for the merge's dropping
        })

    def snapshot(self, full: bool) -> dict[str, Any]:
        keys_d = self.devices.keys() if full else self.dirty_devices
        keys_r = self.regions.keys() if full else self.dirty_regions
        payload = {
            "offset": self.offset, "watermark": self.watermark, "full": full,
            "w": [[k[0], k[1], k[2], self.region_of.get(k[0], ""), _pack_window(self.devices[k])]
                  for k in keys_d if k in self.devices],
            "r": [[k[0], k[1], k[2], _pack(self.regions[k])] for k in keys_r if k in self.regions],
            "h": {name: h.snapshot(full) for name, h in self.handlers.items()},
        }
        self.dirty_devices = set()
        self.dirty_regions = set()
        self._snapshot_watermark = self.watermark
        return payload

    def checkpoint_written(self) -> None:
        """The runtime wrote the last snapshot to the state topic: a restart resumes from it."""
        self.checkpointed_watermark = self._snapshot_watermark

    def restore(self, payload: Mapping[str, Any]) -> None:
        if payload.get("full"):
            self.devices.clear()
            self.regions.clear()
        for device, metric, start, region, values in payload.get("w", ()):
            self.devices[(device, metric, start)] = _unpack_window(values, start)
            # its newest state may have been held back (aggregate_interval_ms) when the previous
            # owner stopped: emit every restored window once
            self._unemitted.add((device, metric, start))
            if region:
                self.region_of[device] = region
        for kec, metric, start, values in payload.get("r", ()):
            self.regions[(kec, metric, start)] = _unpack(values)
        for name, state in payload.get("h", {}).items():
            if name in self.handlers:
                self.handlers[name].restore({**state, "full": payload.get("full", False)})
        self.offset = int(payload["offset"])
        self.watermark = int(payload["watermark"])
        self.checkpointed_watermark = self._snapshot_watermark = self.watermark

    def drop_closed(self) -> None:
        size, lateness, wm = self.size_ms, self.lateness_ms, self.watermark
        self._starts = {s: s for s in self._starts if not W.is_closed(s, size, lateness, wm)}
        for table in (self.devices, self.regions):
            for key in [k for k in table if W.is_closed(k[2], size, lateness, wm)]:
                del table[key]
