"""Semantic validation of telemetry envelopes: returns Ok | Rejected, never raises."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from schemas import reasons
from schemas.envelope import TELEMETRY_TYPE, parse_event_time
from schemas.regions import kecamatan_of
from schemas.results import Ok, Rejected
from schemas.sensors import SENSOR_KINDS


class DeviceInfo(Protocol):
    @property
    def device_id(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def region_code(self) -> str: ...
    @property
    def revoked(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class TimePolicy:
    max_age_ms: int
    max_future_ms: int


@dataclass(slots=True)
class Reading:
    """One accepted telemetry envelope: the valid values of one device at one observation time."""

    id: str
    device_id: str
    kind: str
    region: str
    kecamatan: str | None
    time: int
    values: dict[str, float]
    received: int


def validate_telemetry(
    env: Any, registry: Mapping[str, DeviceInfo], now_ms: int, policy: TimePolicy
) -> tuple[Ok[Reading] | Rejected, list[Rejected]]:
    """Check one envelope; returns the overall result and per-value rejections (bad values of an
    otherwise valid reading are dead-lettered one by one, the valid ones still land)."""
    if not isinstance(env, dict):
        return Rejected(reasons.INVALID_ENVELOPE, "envelope is not a JSON object", env), []
    event_id = env.get("id")
    if not isinstance(event_id, str) or not event_id or len(event_id) > 200:
        return Rejected(reasons.INVALID_ENVELOPE, "envelope id must be a non-empty string", env), []
    if env.get("type") != TELEMETRY_TYPE:
        return Rejected(reasons.UNKNOWN_TYPE, f"unsupported event type {env.get('type')!r}", env), []
    device_id = env.get("subject")
    if not isinstance(device_id, str):
        return Rejected(reasons.INVALID_ENVELOPE, "telemetry needs `subject` = device id", env), []
    device = registry.get(device_id)
    if device is None:
        return Rejected(reasons.UNKNOWN_DEVICE, f"device {device_id!r} is not registered", env), []
    if device.revoked:
        return Rejected(reasons.REVOKED_DEVICE, f"device {device_id!r} is revoked", env), []
    t = parse_event_time(env.get("time"))
    if t is None:
        return Rejected(reasons.INVALID_TIMESTAMP, "`time` must be RFC 3339 with an offset or epoch ms", env), []
    t_ms = int(t.timestamp() * 1000)
    if t_ms < now_ms - policy.max_age_ms:
        return Rejected(reasons.TOO_OLD, f"observation time {t.isoformat()} is older than allowed", env), []
    if t_ms > now_ms + policy.max_future_ms:
        return Rejected(
            reasons.TOO_FAR_IN_FUTURE, f"observation time {t.isoformat()} is ahead of the clock", env
        ), []
    data = env.get("data")
    values = data.get("values") if isinstance(data, dict) else None
    if not isinstance(values, dict) or not values:
        return Rejected(reasons.INVALID_PAYLOAD, "`data.values` must be a non-empty object", env), []
    metrics = SENSOR_KINDS[device.kind].metrics
    good: dict[str, float] = {}
    bad: list[Rejected] = []
    for name, value in values.items():
        spec = metrics.get(name)
        if spec is None:
            bad.append(Rejected(
                reasons.UNKNOWN_METRIC,
                f"{name!r} is not a metric of kind {device.kind} ({', '.join(metrics)})", env, {"metric": name},
            ))
        elif isinstance(value, bool) or not isinstance(value, int | float):
            bad.append(Rejected(reasons.INVALID_VALUE, f"{name} must be a number", env, {"metric": name}))
        elif not math.isfinite(value):
            bad.append(Rejected(reasons.INVALID_VALUE, f"{name} is not finite", env, {"metric": name}))
        elif not spec.min <= value <= spec.max:
            bad.append(Rejected(
                reasons.OUT_OF_RANGE,
                f"{name}={value} {spec.unit} is outside the plausible range {spec.min}..{spec.max}",
                env, {"metric": name},
            ))
        else:
            good[name] = float(value)
    if not good:
        first = bad[0]
        return Rejected(first.reason, first.message, env, first.position), bad[1:]
    received = env.get("arusreceived")
    return Ok(Reading(
        event_id, device_id, device.kind, device.region_code, kecamatan_of(device.region_code), t_ms, good,
        received if isinstance(received, int) else now_ms,
    )), bad
