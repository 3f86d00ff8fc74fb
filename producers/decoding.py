"""MQTT payload → CloudEvents envelopes: the gateway's hot path, pure functions only.

Only transport-level checks happen here (topic shape, size, UTF-8, JSON syntax, structure, a parseable
`ts`); whether the device is known, metric names, ranges and time bounds are the worker's job, so the
gateway stays fast and needs no registry.

Payload shapes are pluggable: `SHAPES` is an ordered table of (name, detect, to_compact) entries and
`register_shape()` adds one. Every shape is reduced to the compact form (`Compact`), from which one
envelope per reading is built. FIWARE Smart Data Models entities are the second built-in shape, and
`FIWARE_TYPES` (entity type → metric → source attributes) is the table to extend for another type.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from schemas import reasons
from schemas.envelope import STATUS_TYPE, TELEMETRY_TYPE, iso_utc_ms, parse_event_time
from schemas.messages import DeadLetterMsg
from schemas.results import Ok, Rejected

DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TOPIC_ROOT = "jember/v1/"
MAX_READINGS = 1000  # per array payload: bounds the work one MQTT message can cause
MAX_STATUS_BYTES = 256

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


# --------------------------------------------------------------------------- topics


def device_id_from_topic(topic: str, leaf: str | None = None) -> str | None:
    """The device id of `jember/v1/{device_id}/{leaf}` (any leaf when None); None when the topic has
    another shape or the id is not a valid device id."""
    if not topic.startswith(TOPIC_ROOT):
        return None
    parts = topic[len(TOPIC_ROOT):].split("/")
    if len(parts) != 2 or (leaf is not None and parts[1] != leaf):
        return None
    device_id = parts[0]
    return device_id if DEVICE_ID_RE.match(device_id) else None


def errors_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}{device_id}/errors"


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True, slots=True)
class Compact:
    """One reading in the compact form every payload shape is reduced to."""

    ts: Any  # as sent: RFC 3339 string or epoch ms
    seq: int | None
    values: dict[str, Any]
    extra: dict[str, Any] | None = None  # shape-specific provenance copied into `data`


Detect = Callable[[dict[str, Any]], bool]
ToCompact = Callable[[dict[str, Any]], "Compact | Rejected"]


def _is_compact(obj: dict[str, Any]) -> bool:
    return "values" in obj or "ts" in obj


def _compact(obj: dict[str, Any]) -> Compact | Rejected:
    if "ts" not in obj:
        return Rejected(reasons.INVALID_PAYLOAD, "missing `ts` (RFC 3339 with offset, or epoch ms)")
    if "values" not in obj:
        return Rejected(reasons.INVALID_PAYLOAD, 'missing `values` (an object such as {"waterLevel": 1.2})')
    values = obj["values"]
    if not isinstance(values, dict):
        return Rejected(reasons.INVALID_PAYLOAD, "`values` must be an object of metric name to number")
    seq = obj.get("seq")
    if seq is not None and (type(seq) is not int or seq < 0):
        return Rejected(reasons.INVALID_PAYLOAD, "`seq` must be a non-negative integer when given")
    return Compact(obj["ts"], seq, values)


# FIWARE Smart Data Models: entity type → Arus metric → candidate attribute names, first match wins.
FIWARE_TYPES: dict[str, dict[str, tuple[str, ...]]] = {
    "AirQualityObserved": {m: (m,) for m in (
        "pm25", "pm10", "no2", "o3", "co", "so2", "temperature", "relativeHumidity")},
    "WeatherObserved": {m: (m,) for m in ("precipitation", "temperature", "relativeHumidity")},
    "TrafficFlowObserved": {m: (m,) for m in ("intensity", "averageVehicleSpeed", "occupancy")},
    "WasteContainer": {m: (m,) for m in ("fillingLevel", "temperature")},
    "NoiseLevelObserved": {m: (m,) for m in ("LAeq", "LAmax")},
    "Streetlight": {m: (m,) for m in ("illuminanceLevel", "powerConsumption")},
    "WaterObserved": {"waterLevel": ("waterLevel", "currentLevel", "height"), "flow": ("flow",)},
    "FloodMonitoring": {"waterLevel": ("waterLevel", "currentLevel", "height"), "flow": ("flow",)},
}

# UN/CEFACT unit codes that differ from the Arus unit of a metric: factor to multiply by.
_FRACTIONS = ("relativeHumidity", "fillingLevel", "occupancy", "illuminanceLevel")
_UNIT_FACTORS: dict[tuple[str, str], float] = {
    ("waterLevel", "CMT"): 0.01,
    ("waterLevel", "MMT"): 0.001,
    **{(m, "P1"): 0.01 for m in _FRACTIONS},
}


def _is_fiware(obj: dict[str, Any]) -> bool:
    return isinstance(obj.get("type"), str) and ("id" in obj or "dateObserved" in obj)


def _attr(raw: Any) -> tuple[Any, str | None]:
    """(value, unitCode) of a key-values attribute, an NGSI-v2 normalized one
    ({"type", "value", "metadata": {"unitCode": {"value"}}}) or an NGSI-LD Property."""
    if isinstance(raw, dict):
        unit = raw.get("unitCode")
        meta = raw.get("metadata")
        if unit is None and isinstance(meta, dict) and isinstance(meta.get("unitCode"), dict):
            unit = meta["unitCode"].get("value")
        value = raw.get("value")
        if isinstance(value, dict) and "@value" in value:  # NGSI-LD {"@type": "DateTime", "@value": ...}
            value = value["@value"]
        return value, unit if isinstance(unit, str) else None
    return raw, None


def _fiware(obj: dict[str, Any]) -> Compact | Rejected:
    etype = obj["type"]
    table = FIWARE_TYPES.get(etype)
    if table is None:
        return Rejected(
            reasons.UNKNOWN_TYPE,
            f"unsupported entity type {etype!r}; supported: {', '.join(FIWARE_TYPES)} or the compact "
            'form {"ts": ..., "values": {...}}',
        )
    ts = None
    for name in ("dateObserved", "dateObservedTo", "dateObservedFrom"):
        if name in obj:
            ts = _attr(obj[name])[0]
            break
    if ts is None:
        return Rejected(reasons.INVALID_PAYLOAD, f"{etype} entity needs `dateObserved` (or dateObservedTo)")
    values: dict[str, float] = {}
    for metric, names in table.items():
        for name in names:
            if name not in obj:
                continue
            value, unit = _attr(obj[name])
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue  # non-numeric attributes (text, structured values) are not metrics
            if unit is not None:
                value = value * _UNIT_FACTORS.get((metric, unit), 1.0)
            values[metric] = value
            break
    if not values:
        wanted = sorted({n for names in table.values() for n in names})
        return Rejected(
            reasons.INVALID_PAYLOAD, f"{etype} entity has no numeric attribute among {', '.join(wanted)}"
        )
    entity_id = obj.get("id")
    return Compact(ts, None, values, {"entity": {"id": entity_id if isinstance(entity_id, str) else None,
                                                 "type": etype}})


SHAPES: list[tuple[str, Detect, ToCompact]] = [
    ("compact", _is_compact, _compact),
    ("fiware", _is_fiware, _fiware),
]


def register_shape(name: str, detect: Detect, to_compact: ToCompact, *, first: bool = False) -> None:
    """Accept another payload shape: `detect(obj)` says whether an object has it, `to_compact(obj)`
    reduces it to a Compact reading (or returns a Rejected with a clear reason)."""
    entry = (name, detect, to_compact)
    SHAPES.insert(0, entry) if first else SHAPES.append(entry)


def _to_compact(obj: dict[str, Any]) -> Compact | Rejected:
    for _name, detect, to_compact in SHAPES:
        if detect(obj):
            return to_compact(obj)
    return Rejected(
        reasons.INVALID_PAYLOAD,
        'expected {"ts": ..., "values": {...}} (missing `ts` and `values`) or a FIWARE entity with `type`',
    )


# --------------------------------------------------------------------------- raw text and rejections


def raw_text(payload: bytes, max_bytes: int) -> tuple[str, str]:
    """(text, encoding) of a payload for dead letters: UTF-8 text, or base64 when it is not UTF-8;
    truncated to max_bytes of payload."""
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(payload[:max_bytes]).decode("ascii"), "base64"
    # a cut may split a multi-byte character: drop the partial one
    return payload[:max_bytes].decode("utf-8", "ignore"), "utf-8"


def _reject(reason: str, message: str, payload: bytes, topic: str, max_bytes: int) -> Rejected:
    text, encoding = raw_text(payload, max_bytes)
    position: dict[str, Any] = {"topic": topic}
    if encoding != "utf-8":
        position["raw_encoding"] = encoding
    return Rejected(reason, message, text, position)


def _json_failure(payload: bytes, error: orjson.JSONDecodeError) -> tuple[str, str]:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return reasons.NOT_UTF8, f"payload is not valid UTF-8 (byte {exc.start}); send UTF-8 JSON"
    if not text.strip():
        return reasons.MALFORMED_JSON, "payload is empty; send a JSON object or array"
    constants: list[str] = []

    def _constant(name: str) -> float:
        constants.append(name)
        return math.nan

    if "NaN" in text or "Infinity" in text:
        try:  # the standard library accepts NaN/Infinity: if it parses, they were the cause
            json.loads(text, parse_constant=_constant)
        except (ValueError, RecursionError):
            pass
    if constants or "infinity" in error.msg:
        found = ", ".join(sorted(set(constants))) or "a number too large for a double"
        return reasons.MALFORMED_JSON, (
            f"NaN and Infinity are not valid JSON numbers (found {found}); omit the metric instead"
        )
    return reasons.MALFORMED_JSON, f"malformed JSON: {error}"


# --------------------------------------------------------------------------- telemetry


def _ts_ms(ts: Any, parsed: datetime) -> int:
    if type(ts) is int:
        return ts
    if isinstance(ts, float):
        return math.floor(ts)
    return (parsed - _EPOCH) // _MS  # exact integer arithmetic: the id must not wobble by a ms


def _envelope(device_id: str, reading: Compact, received_ms: int) -> Ok[dict[str, Any]] | Rejected:
    parsed = parse_event_time(reading.ts)
    if parsed is None:
        return Rejected(
            reasons.INVALID_TIMESTAMP,
            f"`ts` {str(reading.ts)[:60]!r} is neither RFC 3339 with an offset (e.g. "
            "2024-05-01T13:00:00+07:00) nor epoch milliseconds",
        )
    ms = _ts_ms(reading.ts, parsed)
    seq = reading.seq
    data: dict[str, Any] = {"ts": reading.ts, "seq": seq, "values": reading.values}
    if reading.extra:
        data.update(reading.extra)
    return Ok({
        "specversion": "1.0",
        "id": f"{device_id}/{ms}" if seq is None else f"{device_id}/{ms}/{seq}",
        "source": f"/jember/v1/{device_id}",
        "type": TELEMETRY_TYPE,
        "time": iso_utc_ms(ms),
        "subject": device_id,
        "datacontenttype": "application/json",
        "arusreceived": received_ms,
        "data": data,
    })


def _one(obj: Any, device_id: str, received_ms: int) -> Ok[dict[str, Any]] | Rejected:
    if not isinstance(obj, dict):
        return Rejected(reasons.INVALID_PAYLOAD, "a reading must be a JSON object")
    compact = _to_compact(obj)
    if isinstance(compact, Rejected):
        return compact
    return _envelope(device_id, compact, received_ms)


def _with_raw(rejected: Rejected, raw: str, topic: str, index: int | None = None) -> Rejected:
    position: dict[str, Any] = {"topic": topic}
    if index is not None:
        position["index"] = index
    return Rejected(rejected.reason, rejected.message, raw, position)


def decode_telemetry(
    topic: str, payload: bytes, received_ms: int, max_bytes: int
) -> list[Ok[dict[str, Any]] | Rejected]:
    """One envelope (or rejection) per reading of a payload published on jember/v1/{id}/telemetry."""
    device_id = device_id_from_topic(topic, "telemetry")
    if device_id is None:
        return [_reject(
            reasons.TOPIC_MISMATCH,
            "telemetry goes to jember/v1/{device_id}/telemetry, with a device id of letters, digits, "
            "'_', '.', '-' (at most 64, starting with a letter or digit)",
            payload, topic, max_bytes,
        )]
    if len(payload) > max_bytes:
        return [_reject(
            reasons.PAYLOAD_TOO_LARGE, f"payload is {len(payload)} bytes; the limit is {max_bytes}",
            payload, topic, max_bytes,
        )]
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        reason, message = _json_failure(payload, exc)
        return [_reject(reason, message, payload, topic, max_bytes)]

    if isinstance(doc, dict):
        result = _one(doc, device_id, received_ms)
        if isinstance(result, Rejected):
            return [_reject(result.reason, result.message, payload, topic, max_bytes)]
        return [result]
    if isinstance(doc, list):
        if not doc:
            return [_reject(reasons.INVALID_PAYLOAD, "the array holds no readings", payload, topic, max_bytes)]
        if len(doc) > MAX_READINGS:
            return [_reject(
                reasons.INVALID_PAYLOAD,
                f"{len(doc)} readings in one message; at most {MAX_READINGS}, split it",
                payload, topic, max_bytes,
            )]
        out: list[Ok[dict[str, Any]] | Rejected] = []
        for index, item in enumerate(doc):
            result = _one(item, device_id, received_ms)
            if isinstance(result, Rejected):
                # the dead letter keeps the one bad reading, so a replay re-sends only that
                item_raw = orjson.dumps(item).decode("utf-8")[:max_bytes]
                result = Rejected(
                    result.reason, f"reading {index}: {result.message}", item_raw,
                    {"topic": topic, "index": index},
                )
            out.append(result)
        return out
    return [_reject(
        reasons.INVALID_PAYLOAD, "payload must be a JSON object or an array of objects",
        payload, topic, max_bytes,
    )]


# --------------------------------------------------------------------------- status


def _status_value(text: str) -> str | None:
    text = text.strip()
    if text[:1] in ('"', "{"):
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError:
            return None
        if isinstance(doc, dict):
            doc = doc.get("status")
        text = doc if isinstance(doc, str) else ""
    value = text.strip().lower()
    return value if value in ("online", "offline") else None


def decode_status(topic: str, payload: bytes, received_ms: int) -> Ok[dict[str, Any]] | Rejected:
    """`online` / `offline` (plain text, a JSON string or {"status": ...}) on jember/v1/{id}/status."""
    device_id = device_id_from_topic(topic, "status")
    if device_id is None:
        return _reject(
            reasons.TOPIC_MISMATCH, "status goes to jember/v1/{device_id}/status",
            payload, topic, MAX_STATUS_BYTES,
        )
    if len(payload) > MAX_STATUS_BYTES:
        return _reject(
            reasons.PAYLOAD_TOO_LARGE, f"a status is `online` or `offline`, not {len(payload)} bytes",
            payload, topic, MAX_STATUS_BYTES,
        )
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return _reject(reasons.NOT_UTF8, "status is not valid UTF-8", payload, topic, MAX_STATUS_BYTES)
    status = _status_value(text)
    if status is None:
        return _reject(
            reasons.INVALID_PAYLOAD, "status must be `online` or `offline`", payload, topic, MAX_STATUS_BYTES
        )
    return Ok({
        "specversion": "1.0",
        "id": f"{device_id}/status/{received_ms}",
        "source": f"/jember/v1/{device_id}",
        "type": STATUS_TYPE,
        "time": iso_utc_ms(received_ms),
        "subject": device_id,
        "datacontenttype": "application/json",
        "arusreceived": received_ms,
        "data": {"status": status},
    })


# --------------------------------------------------------------------------- dead letters and replies


def _raw_of(rejected: Rejected) -> tuple[str, str]:
    raw = rejected.raw
    encoding = rejected.position.get("raw_encoding", "utf-8") if rejected.position else "utf-8"
    if isinstance(raw, str):
        return raw, encoding
    if isinstance(raw, bytes | bytearray):
        return raw_text(bytes(raw), len(raw))
    if raw is None:
        return "", "utf-8"
    return orjson.dumps(raw, default=str).decode("utf-8"), "utf-8"


def dead_letter_id(source: str, topic: str | None, raw: str) -> str:
    """Stable over repeats, so the same bad payload sent again is the same dead letter row."""
    digest = hashlib.sha256(f"{source}\x00{topic or ''}\x00{raw}".encode()).hexdigest()
    return f"dl-{digest[:32]}"


def dead_letter(rejected: Rejected, device_id: str | None, source: str, now_ms: int) -> DeadLetterMsg:
    raw, encoding = _raw_of(rejected)
    position = rejected.position or {}
    topic = position.get("topic")
    partition = position.get("partition")
    offset = position.get("offset")
    return {
        "id": dead_letter_id(source, topic, raw),
        "reason": rejected.reason,
        "message": rejected.message,
        "source": source,
        "device_id": device_id,
        "topic": topic,
        "partition": partition if isinstance(partition, int) else None,
        "offset": offset if isinstance(offset, int) else None,
        "raw": raw,
        "raw_encoding": encoding,
        "time": now_ms,
    }


def error_reply(rejected: Rejected, dead_letter_id: str) -> bytes:
    """The JSON published to jember/v1/{device_id}/errors for a refused payload."""
    reply: dict[str, Any] = {"reason": rejected.reason, "message": rejected.message, "id": dead_letter_id}
    index = (rejected.position or {}).get("index")
    if index is not None:
        reply["index"] = index
    return orjson.dumps(reply)
