"""Pure conversion of the sink's Kafka messages (schemas/messages.py) into rows for COPY.

Nothing here touches the network or the clock. Parsing returns Ok | Rejected; a rejected (poison)
message becomes a `dead_letters` row with reason `processing_error`, so one bad message never stops
the sink and is kept for inspection. Every value that reaches PostgreSQL is checked here first
(types, NUL characters, lengths that would overflow an index entry, timestamp range), because a row
PostgreSQL refuses would fail the whole batch.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import orjson

from schemas.reasons import PROCESSING_ERROR
from schemas.results import Ok, Rejected

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

# Lengths in characters; at 4 bytes per character the widest index entry stays far below
# PostgreSQL's ~2.7 kB btree limit.
MAX_KEY_LEN = 128  # device_id, metric, aggregate key
MAX_REGION_LEN = 64
MAX_ID_LEN = 512  # event ids and dead letter ids
MAX_TEXT_LEN = 1_000_000  # human-readable messages (raw payloads are kept whole)

READINGS_COLUMNS = ("time", "device_id", "region_code", "metric", "value", "event_id")
READINGS_TYPES = ("timestamptz", "text", "text", "text", "float8", "text")
AGGREGATES_COLUMNS = (
    "bucket", "scope", "key", "region_code", "metric", "bucket_end",
    "count", "min", "max", "sum", "mean", "last", "last_time", "final",
)  # fmt: skip
AGGREGATES_TYPES = (
    "timestamptz", "text", "text", "text", "text", "timestamptz",
    "int8", "float8", "float8", "float8", "float8", "float8", "timestamptz", "bool",
)  # fmt: skip
DEAD_LETTERS_COLUMNS = (
    "id", "time", "reason", "message", "source", "device_id",
    "topic", "partition", "offset", "raw", "raw_encoding",
)  # fmt: skip
DEAD_LETTERS_TYPES = (
    "text", "timestamptz", "text", "text", "text", "text",
    "text", "int4", "int8", "text", "text",
)  # fmt: skip

ReadingRow = tuple[datetime, str, str, str, float, str]
AggregateRow = tuple[
    datetime, str, str, str, str, datetime, int, float, float, float, float, float, datetime, bool
]
AggregateKey = tuple[str, str, str, datetime]  # scope, key, metric, bucket: the table's primary key
DeadLetterRow = tuple[str, datetime, str, str, str, str | None, str | None, int | None, int | None, str, str]

SCOPES = frozenset({"device", "kecamatan"})
RAW_ENCODINGS = frozenset({"utf-8", "base64"})


class Kind(StrEnum):
    """Which topic a message came from, hence its shape (the topic suffixes of schemas.topics)."""

    TELEMETRY = "telemetry"
    AGGREGATES = "aggregates"
    DLQ = "dlq"


class _Bad(Exception):
    """Internal: carries a rejection message out of nested checks (never escapes this module)."""


def _rejected(message: str, obj: Any = None) -> Rejected:
    return Rejected(PROCESSING_ERROR, message, raw=obj)


def ms_to_datetime(ms: int) -> datetime:
    """Epoch milliseconds to an aware UTC datetime, exactly (no float rounding)."""
    return EPOCH + timedelta(milliseconds=ms)


def _loads(raw: bytes | bytearray | memoryview | str | None) -> Any:
    if raw is None:
        raise _Bad("empty (null) message value")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _Bad(f"not valid UTF-8 JSON: {exc}") from None


def _str(msg: dict[str, Any], name: str, max_len: int) -> str:
    v = msg.get(name)
    if type(v) is not str:
        if name not in msg:
            raise _Bad(f"missing field {name!r}")
        raise _Bad(f"field {name!r} must be a string, got {type(v).__name__}")
    if not v or len(v) > max_len:
        raise _Bad(f"field {name!r} must be 1..{max_len} characters long")
    if "\x00" in v:
        raise _Bad(f"field {name!r} contains a NUL character")
    return v


def _opt_str(msg: dict[str, Any], name: str, max_len: int) -> str | None:
    if msg.get(name) is None:
        return None
    return _str(msg, name, max_len)


def _int(msg: dict[str, Any], name: str, lo: int, hi: int) -> int:
    v = msg.get(name)
    if type(v) is float and v.is_integer():
        v = int(v)
    if type(v) is not int:
        if name not in msg:
            raise _Bad(f"missing field {name!r}")
        raise _Bad(f"field {name!r} must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise _Bad(f"field {name!r} out of range: {v}")
    return v


def _opt_int(msg: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    if msg.get(name) is None:
        return None
    return _int(msg, name, lo, hi)


def _num(msg: dict[str, Any], name: str) -> float:
    v = msg.get(name)
    t = type(v)
    if t is not float and t is not int:  # bool is excluded on purpose (type(True) is bool)
        if name not in msg:
            raise _Bad(f"missing field {name!r}")
        raise _Bad(f"field {name!r} must be a number, got {t.__name__}")
    f = float(v)  # type: ignore[arg-type]
    if not math.isfinite(f):
        raise _Bad(f"field {name!r} must be finite")
    return f


def _time(msg: dict[str, Any], name: str) -> datetime:
    ms = _int(msg, name, -INT64_MAX, INT64_MAX)
    try:
        return ms_to_datetime(ms)
    except OverflowError:
        raise _Bad(f"field {name!r} is not a representable epoch-ms timestamp: {ms}") from None


def _object(obj: Any, what: str) -> dict[str, Any]:
    if type(obj) is not dict:
        raise _Bad(f"{what} message must be a JSON object, got {type(obj).__name__}")
    return obj


def parse_reading(raw: bytes | str | None) -> Ok[list[ReadingRow]] | Rejected:
    """A telemetry message (ReadingMsg) -> one readings row per metric in `values`."""
    rows = _reading_rows(raw)
    return rows if isinstance(rows, Rejected) else Ok(rows)


# Epoch-ms range a datetime can hold (years 1..9999).
_MIN_MS = -62_135_596_800_000
_MAX_MS = 253_402_300_799_999


def _reading_rows_fast(raw: Any) -> list[ReadingRow] | None:
    """The sink's hot path: the same checks as _reading_rows, inline and without messages. None
    means "not plainly valid": the careful path then decides, and explains a rejection."""
    try:
        msg = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError):
        return None
    if type(msg) is not dict:
        return None
    event_id = msg.get("id")
    device_id = msg.get("device_id")
    region = msg.get("region")
    t = msg.get("time")
    values = msg.get("values")
    if not (
        type(event_id) is str and type(device_id) is str and type(region) is str
        and type(t) is int and type(values) is dict
        and 0 < len(event_id) <= MAX_ID_LEN and 0 < len(device_id) <= MAX_KEY_LEN
        and 0 < len(region) <= MAX_REGION_LEN and _MIN_MS <= t <= _MAX_MS
        and "\x00" not in event_id and "\x00" not in device_id and "\x00" not in region
    ):  # fmt: skip
        return None
    ts = EPOCH + timedelta(milliseconds=t)
    rows: list[ReadingRow] = []
    for metric, v in values.items():
        tv = type(v)
        if tv is float:
            if not math.isfinite(v):
                return None
        elif tv is int:
            v = float(v)
        else:
            return None
        if not 0 < len(metric) <= MAX_KEY_LEN or "\x00" in metric:
            return None
        rows.append((ts, device_id, region, metric, v, event_id))
    return rows


def _reading_rows(raw: bytes | str | None) -> list[ReadingRow] | Rejected:
    # No result wrapper on this path: a frozen dataclass costs ~1 us to build.
    fast = _reading_rows_fast(raw)
    return fast if fast is not None else _reading_rows_careful(raw)


def _reading_rows_careful(raw: bytes | str | None) -> list[ReadingRow] | Rejected:
    obj: Any = None
    try:
        obj = _loads(raw)
        msg = _object(obj, "telemetry")
        event_id = _str(msg, "id", MAX_ID_LEN)
        device_id = _str(msg, "device_id", MAX_KEY_LEN)
        region = _str(msg, "region", MAX_REGION_LEN)
        t = _time(msg, "time")
        values = msg.get("values")
        if type(values) is not dict:
            raise _Bad("missing field 'values'" if values is None else "field 'values' must be an object")
        rows: list[ReadingRow] = []
        for metric, v in values.items():
            tv = type(v)
            if tv is float:
                if not math.isfinite(v):
                    raise _Bad(f"value of {metric!r} must be finite")
            elif tv is int:
                v = float(v)
            else:
                raise _Bad(f"value of {metric!r} must be a number, got {tv.__name__}")
            if not metric or len(metric) > MAX_KEY_LEN or "\x00" in metric:
                raise _Bad(f"metric name must be 1..{MAX_KEY_LEN} characters without NUL")
            rows.append((t, device_id, region, metric, v, event_id))
        return rows
    except _Bad as exc:
        return _rejected(f"telemetry message: {exc}", obj)


def parse_aggregate(raw: bytes | str | None) -> Ok[AggregateRow] | Rejected:
    """An aggregates message (AggregateMsg: the window's full state) -> one aggregates row."""
    obj: Any = None
    try:
        obj = _loads(raw)
        msg = _object(obj, "aggregates")
        scope = _str(msg, "scope", MAX_KEY_LEN)
        if scope not in SCOPES:
            raise _Bad(f"field 'scope' must be one of {sorted(SCOPES)}, got {scope!r}")
        final = msg.get("final", False)
        if type(final) is not bool:
            raise _Bad("field 'final' must be a boolean")
        row: AggregateRow = (
            _time(msg, "window_start"),
            scope,
            _str(msg, "key", MAX_KEY_LEN),
            _str(msg, "region", MAX_REGION_LEN),
            _str(msg, "metric", MAX_KEY_LEN),
            _time(msg, "window_end"),
            _int(msg, "count", 0, INT64_MAX),
            _num(msg, "min"),
            _num(msg, "max"),
            _num(msg, "sum"),
            _num(msg, "mean"),
            _num(msg, "last"),
            _time(msg, "last_time"),
            final,
        )
        return Ok(row)
    except _Bad as exc:
        return _rejected(f"aggregates message: {exc}", obj)


def _clean_text(s: str) -> str:
    # PostgreSQL text cannot hold NUL; free text is for humans, so a visible replacement is enough.
    return s.replace("\x00", "\ufffd") if "\x00" in s else s


def _raw_text(raw: bytes | str) -> tuple[str, str]:
    """(raw, raw_encoding) for storage: UTF-8 text when it is storable as is, else base64 (lossless)."""
    if isinstance(raw, str):
        if "\x00" not in raw:
            return raw, "utf-8"
        data = raw.encode("utf-8", "surrogatepass")
    else:
        data = bytes(raw)
        try:
            text = data.decode("utf-8")
            if "\x00" not in text:
                return text, "utf-8"
        except UnicodeDecodeError:
            pass
    return base64.b64encode(data).decode("ascii"), "base64"


def parse_dead_letter(raw: bytes | str | None) -> Ok[DeadLetterRow] | Rejected:
    """A DLQ message (DeadLetterMsg) -> one dead_letters row."""
    obj: Any = None
    try:
        obj = _loads(raw)
        msg = _object(obj, "dlq")
        for name in ("reason", "message", "source", "raw"):
            if type(msg.get(name)) is not str:
                raise _Bad(f"missing field {name!r}" if name not in msg else f"field {name!r} must be a string")
        encoding = msg.get("raw_encoding") or "utf-8"
        if encoding not in RAW_ENCODINGS:
            raise _Bad(f"field 'raw_encoding' must be one of {sorted(RAW_ENCODINGS)}")
        payload: str = msg["raw"]
        if encoding == "utf-8" and "\x00" in payload:
            payload, encoding = _raw_text(payload)  # keep it exact: store as base64 instead
        device_id = msg.get("device_id")
        if device_id is not None and type(device_id) is not str:
            raise _Bad("field 'device_id' must be a string or null")
        topic = msg.get("topic")
        if topic is not None and type(topic) is not str:
            raise _Bad("field 'topic' must be a string or null")
        row: DeadLetterRow = (
            _str(msg, "id", MAX_ID_LEN),
            _time(msg, "time"),
            _clean_text(msg["reason"])[:MAX_KEY_LEN],
            _clean_text(msg["message"])[:MAX_TEXT_LEN],
            _clean_text(msg["source"])[:MAX_ID_LEN],
            _clean_text(device_id)[:MAX_ID_LEN] if device_id is not None else None,
            _clean_text(topic)[:MAX_ID_LEN] if topic is not None else None,
            _opt_int(msg, "partition", 0, INT32_MAX),
            _opt_int(msg, "offset", -1, INT64_MAX),
            payload,
            encoding,
        )
        return Ok(row)
    except _Bad as exc:
        return _rejected(f"dlq message: {exc}", obj)


def poison_id(topic: str, raw: bytes | str | None) -> str:
    """Derived from the content, so a redelivered or re-produced (at-least-once producers duplicate)
    poison message maps to the same dead letter: idempotent like every other table."""
    h = hashlib.sha256(topic.encode())
    h.update(b"\0")
    if raw is not None:
        h.update(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw))
    return f"sink:{h.hexdigest()[:40]}"


def poison_row(
    rejected: Rejected,
    raw: bytes | str | None,
    *,
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int,
) -> DeadLetterRow:
    """The dead_letters row of a message the sink could not store as what it claims to be; topic,
    partition and offset record where it was (first seen: a duplicate keeps the first row)."""
    device_id = None
    if type(rejected.raw) is dict:
        d = rejected.raw.get("device_id")
        if type(d) is str and 0 < len(d) <= MAX_KEY_LEN and "\x00" not in d:
            device_id = d
    try:
        t = ms_to_datetime(timestamp_ms)
    except OverflowError:
        t = EPOCH
    text, encoding = _raw_text(raw if raw is not None else b"")
    return (
        poison_id(topic, raw),
        t,
        PROCESSING_ERROR,
        _clean_text(f"{rejected.message} (at {topic}[{partition}]@{offset})"),
        "sink",
        device_id,
        topic,
        partition,
        offset,
        text,
        encoding,
    )


@dataclass(slots=True)
class Batch:
    """Rows accumulated for one flush. Aggregates keep only the last state per primary key, since
    INSERT ... ON CONFLICT DO UPDATE cannot touch the same row twice in one statement."""

    readings: list[ReadingRow] = field(default_factory=list)
    aggregates: dict[AggregateKey, AggregateRow] = field(default_factory=dict)
    dead_letters: list[DeadLetterRow] = field(default_factory=list)
    poison: int = 0  # messages that became processing_error dead letters

    def __len__(self) -> int:
        return len(self.readings) + len(self.aggregates) + len(self.dead_letters)

    def add(
        self, kind: Kind, raw: bytes | str | None, *, topic: str, partition: int, offset: int, timestamp_ms: int
    ) -> bool:
        """Convert and add one message; False when it was poison (stored as a dead letter)."""
        result: Ok[Any] | Rejected
        if kind is Kind.TELEMETRY:
            rows = _reading_rows(raw)
            if type(rows) is list:
                self.readings.extend(rows)
                return True
            result = rows  # type: ignore[assignment]
        elif kind is Kind.AGGREGATES:
            result = parse_aggregate(raw)
            if type(result) is Ok:
                row = result.value
                # dict assignment keeps the first insertion position but the last value: last state wins
                self.aggregates[(row[1], row[2], row[4], row[0])] = row
                return True
        else:
            result = parse_dead_letter(raw)
            if type(result) is Ok:
                self.dead_letters.append(result.value)
                return True
        assert isinstance(result, Rejected)
        self.poison += 1
        self.dead_letters.append(
            poison_row(result, raw, topic=topic, partition=partition, offset=offset, timestamp_ms=timestamp_ms)
        )
        return False

    def add_records(self, kind: Kind, records: Iterable[Any], *, topic: str, partition: int) -> int:
        """Add consecutive Kafka records of one partition (objects with .value, .offset and
        .timestamp, like aiokafka's ConsumerRecord); returns how many were poison."""
        poison = 0
        if kind is Kind.TELEMETRY:
            extend = self.readings.extend
            for r in records:
                rows = _reading_rows_fast(r.value)
                if rows is not None:
                    extend(rows)
                elif not self.add(kind, r.value, topic=topic, partition=partition, offset=r.offset,
                                  timestamp_ms=r.timestamp):
                    poison += 1
            return poison
        for r in records:
            if not self.add(kind, r.value, topic=topic, partition=partition, offset=r.offset, timestamp_ms=r.timestamp):
                poison += 1
        return poison

    def aggregate_rows(self) -> list[AggregateRow]:
        return list(self.aggregates.values())


def dedupe_aggregates(rows: list[AggregateRow]) -> list[AggregateRow]:
    """Last state per (scope, key, metric, bucket), in first-seen order."""
    last: dict[AggregateKey, AggregateRow] = {}
    for row in rows:
        last[(row[1], row[2], row[4], row[0])] = row
    return list(last.values())
