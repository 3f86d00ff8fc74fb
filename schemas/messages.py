"""The JSON shapes on Arus's Kafka topics after ingest (all timestamps are epoch ms, UTC).

jember.telemetry   key = device_id
    {"id": str, "device_id": str, "kind": str, "region": str, "time": int,
     "values": {metric: float}, "received": int}
jember.aggregates  key = "{scope}|{key}|{metric}|{window_start}"
    {"scope": "device" | "kecamatan", "key": device_id or kecamatan code, "region": str,
     "metric": str, "window_start": int, "window_end": int, "count": int, "min": float,
     "max": float, "sum": float, "mean": float, "last": float, "last_time": int, "final": bool}
jember.dlq         key = the dead letter id
    {"id": str, "reason": str, "message": str, "source": str, "device_id": str | None,
     "topic": str | None, "partition": int | None, "offset": int | None,
     "raw": str (UTF-8 text, or base64 when raw_encoding == "base64"), "raw_encoding": "utf-8" | "base64",
     "time": int}
"""

from __future__ import annotations

from typing import TypedDict


class ReadingMsg(TypedDict):
    id: str
    device_id: str
    kind: str
    region: str
    time: int
    values: dict[str, float]
    received: int


class AggregateMsg(TypedDict):
    scope: str
    key: str
    region: str
    metric: str
    window_start: int
    window_end: int
    count: int
    min: float
    max: float
    sum: float
    mean: float
    last: float
    last_time: int
    final: bool


class DeadLetterMsg(TypedDict):
    id: str
    reason: str
    message: str
    source: str
    device_id: str | None
    topic: str | None
    partition: int | None
    offset: int | None
    raw: str
    raw_encoding: str
    time: int
