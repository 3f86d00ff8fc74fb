"""`arus dlq list` and `arus dlq replay`: inspect dead letters and re-inject them after a fix.

Replay re-sends a dead letter's raw payload to the ingest topic, keyed by device id like the gateway
does, so it reaches the same worker partition. That makes replay idempotent: the worker de-duplicates
readings by (device, metric, observation time) and the sink's `readings` key is the same triple, so
replaying one dead letter twice lands once.

Only dead letters whose raw payload is ingest input can be replayed: those of the gateway (the
device's MQTT payload, decoded again here exactly as the gateway does) and those the worker refused
while reading the ingest topic (the raw is already an envelope).
"""

from __future__ import annotations

import base64
import binascii
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import psycopg

from infra.db import connect
from infra.settings import Settings
from producers.decoding import decode_status, decode_telemetry, device_id_from_topic
from schemas.errors import ArusError
from schemas.results import Rejected

WIB = ZoneInfo("Asia/Jakarta")
GATEWAY_SOURCE = "gateway"

COLUMNS = ('id', 'time', 'reason', 'message', 'source', 'device_id', 'topic', '"partition"', '"offset"',
           'raw', 'raw_encoding', 'replayed_at')


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    time: datetime
    reason: str
    message: str
    source: str
    device_id: str | None
    topic: str | None
    partition: int | None
    offset: int | None
    raw: str
    raw_encoding: str
    replayed_at: datetime | None


@dataclass(frozen=True, slots=True)
class Filter:
    ids: Sequence[str] = ()
    reason: str | None = None
    device: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    pending: bool = False  # only those never replayed
    limit: int | None = None

    def empty(self) -> bool:
        return not (self.ids or self.reason or self.device or self.since or self.until or self.pending)


def parse_time(text: str) -> datetime:
    """ISO 8601; a time without an offset is read as WIB, the local time of Jember."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not an ISO 8601 time (e.g. 2024-05-01T13:00:00+07:00)") from exc
    return value if value.tzinfo is not None else value.replace(tzinfo=WIB)


def select(conn: psycopg.Connection[Any], flt: Filter) -> list[DeadLetter]:
    """Dead letters matching `flt`, newest first. Values are bound parameters, never SQL text."""
    where: list[str] = []
    params: list[Any] = []
    if flt.ids:
        where.append("id = ANY(%s)")
        params.append(list(flt.ids))
    if flt.reason:
        where.append("reason = %s")
        params.append(flt.reason)
    if flt.device:
        where.append("device_id = %s")
        params.append(flt.device)
    if flt.since:
        where.append("time >= %s")
        params.append(flt.since)
    if flt.until:
        where.append("time < %s")
        params.append(flt.until)
    if flt.pending:
        where.append("replayed_at IS NULL")
    sql = f"SELECT {', '.join(COLUMNS)} FROM dead_letters"  # noqa: S608 - only fixed fragments
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY time DESC, id"
    if flt.limit is not None:
        sql += " LIMIT %s"
        params.append(flt.limit)
    return [DeadLetter(*row) for row in conn.execute(sql, params).fetchall()]


def _wib(value: datetime | None) -> str:
    return value.astimezone(WIB).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def as_json(d: DeadLetter) -> dict[str, Any]:
    return {"id": d.id, "time": d.time.astimezone(WIB).isoformat(), "reason": d.reason, "message": d.message,
            "source": d.source, "device_id": d.device_id, "topic": d.topic, "partition": d.partition,
            "offset": d.offset, "raw": d.raw, "raw_encoding": d.raw_encoding,
            "replayed_at": d.replayed_at.astimezone(WIB).isoformat() if d.replayed_at else None}


def format_table(rows: Sequence[DeadLetter], raw_width: int = 60) -> str:
    lines = [f"{'time (WIB)':<19}  {'reason':<18} {'device':<24} {'source':<8} {'replayed (WIB)':<19}  id"]
    for d in rows:
        lines.append(f"{_wib(d.time):<19}  {d.reason:<18} {(d.device_id or '-'):<24} {d.source:<8} "
                     f"{_wib(d.replayed_at):<19}  {d.id}")
        lines.append(f"    {d.message}")
        raw = d.raw if d.raw_encoding == "utf-8" else f"[{d.raw_encoding}] {d.raw}"
        lines.append(f"    raw: {raw[:raw_width]}{'…' if len(raw) > raw_width else ''}")
    lines.append(f"{len(rows)} dead letter(s)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- replay


@dataclass
class ReplayPlan:
    """What replay would send: records per dead letter, and the dead letters skipped with why."""

    records: dict[str, list[tuple[bytes, bytes]]] = field(default_factory=dict)  # id -> (key, value)
    skipped: dict[str, str] = field(default_factory=dict)  # id -> why


def _raw_bytes(d: DeadLetter) -> bytes | str:
    """The payload bytes, or why they cannot be recovered."""
    if d.raw_encoding == "base64":
        try:
            return base64.b64decode(d.raw, validate=True)
        except (binascii.Error, ValueError):
            return "raw is not valid base64"
    if d.raw_encoding in ("utf-8", "utf8"):
        return d.raw.encode("utf-8")
    return f"unknown raw_encoding {d.raw_encoding!r}"


def _from_gateway(d: DeadLetter, payload: bytes, received_ms: int, max_bytes: int) -> list[tuple[bytes, bytes]] | str:
    topic = d.topic or ""
    if device_id_from_topic(topic, "telemetry") is not None:
        results = decode_telemetry(topic, payload, received_ms, max_bytes)
    elif device_id_from_topic(topic, "status") is not None:
        results = [decode_status(topic, payload, received_ms)]
    else:
        return f"MQTT topic {topic!r} is not jember/v1/{{id}}/telemetry or /status"
    out: list[tuple[bytes, bytes]] = []
    still: list[str] = []
    for result in results:
        if isinstance(result, Rejected):
            still.append(result.reason)
        else:
            env = result.value
            out.append((str(env["subject"]).encode(), orjson.dumps(env)))
    if not out:
        return "still rejected by the gateway: " + ", ".join(sorted(set(still)))
    return out


def _from_ingest(d: DeadLetter, payload: bytes) -> list[tuple[bytes, bytes]] | str:
    try:
        env = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return "raw is not a JSON envelope"
    subject = env.get("subject") if isinstance(env, dict) else None
    if not isinstance(subject, str) or not subject:
        return "envelope has no `subject` (device id)"
    return [(subject.encode(), payload)]  # sent as it was, byte for byte


def _from_sealed(payload: bytes, settings: Settings) -> list[tuple[bytes, bytes]] | str | None:
    """A service event the worker refused keeps its raw sealed (it may hold NIK/names in clear):
    `{"sealed": <token>, "type", "id", "source", "key"}`. The original bytes, keyed by entity id like
    agencies produce them; None when `payload` is not such a wrapper."""
    try:
        wrapper = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(wrapper, dict) or not isinstance(wrapper.get("sealed"), str):
        return None
    from infra.privacy import pii_key_bytes, unseal

    try:
        clear = unseal(wrapper["sealed"], pii_key_bytes(settings.pii_key))
    except ValueError as exc:
        return f"sealed raw cannot be opened ({exc})"
    return [(str(wrapper.get("key") or wrapper.get("id") or "").encode(), clear)]


def plan_replay(rows: Sequence[DeadLetter], settings: Settings, now_ms: int | None = None) -> ReplayPlan:
    ingest = settings.topic("ingest")
    received_ms = int(time.time() * 1000) if now_ms is None else now_ms
    plan = ReplayPlan()
    for d in rows:
        payload = _raw_bytes(d)
        if isinstance(payload, str):
            plan.skipped[d.id] = payload
            continue
        if d.source == GATEWAY_SOURCE:
            result = _from_gateway(d, payload, received_ms, settings.max_payload_bytes)
        elif d.topic == ingest:
            sealed = _from_sealed(payload, settings)
            result = sealed if sealed is not None else _from_ingest(d, payload)
        else:
            result = f"not ingest input (source {d.source}, topic {d.topic or '-'})"
        if isinstance(result, str):
            plan.skipped[d.id] = result
        else:
            plan.records[d.id] = result
    return plan


def _produce(bootstrap: str, topic: str, records: Sequence[tuple[bytes, bytes]]) -> None:
    from kafka import KafkaProducer  # kafka-python: a short-lived synchronous producer is all replay needs
    from kafka.errors import KafkaError

    try:
        producer = KafkaProducer(bootstrap_servers=[b.strip() for b in bootstrap.split(",") if b.strip()],
                                 client_id="arus-dlq-replay", acks="all", retries=10, linger_ms=5,
                                 max_in_flight_requests_per_connection=1)
    except KafkaError as exc:
        raise ArusError(f"cannot connect to Kafka at {bootstrap}: {exc}") from exc
    try:
        # same key -> same partition (murmur2, like the gateway): the worker that de-duplicates sees it
        futures = [producer.send(topic, key=key, value=value) for key, value in records]
        producer.flush(timeout=30)
        for f in futures:
            f.get(timeout=30)
    except KafkaError as exc:
        raise ArusError(f"replay to {topic} failed: {exc}") from exc
    finally:
        producer.close(timeout=10)


@dataclass
class ReplayResult:
    replayed: list[str]
    records: int
    skipped: dict[str, str]
    dry_run: bool

    def summary(self) -> str:
        verb = "would replay" if self.dry_run else "replayed"
        lines = [f"{verb} {len(self.replayed)} dead letter(s) ({self.records} record(s)), "
                 f"skipped {len(self.skipped)}"]
        for why, n in Counter(self.skipped.values()).most_common():
            lines.append(f"  skipped {n}: {why}")
        return "\n".join(lines)


def replay(settings: Settings, flt: Filter, *, dry_run: bool = False) -> ReplayResult:
    if flt.empty():
        raise ArusError("select what to replay: --id, --reason, --device, --since/--until, --pending or --all")
    with connect(settings.database_dsn(), autocommit=True) as conn:
        rows = select(conn, flt)
        plan = plan_replay(rows, settings)
        records = [r for recs in plan.records.values() for r in recs]
        ids = list(plan.records)
        if records and not dry_run:
            if not settings.kafka_bootstrap:
                raise ArusError("ARUS_KAFKA_BOOTSTRAP is not set")
            _produce(settings.kafka_bootstrap, settings.topic("ingest"), records)
            # only after Kafka acknowledged them: a failed send leaves replayed_at unset
            conn.execute("UPDATE dead_letters SET replayed_at = now() WHERE id = ANY(%s)", [ids])
    return ReplayResult(ids, len(records), plan.skipped, dry_run)


# --------------------------------------------------------------------------- CLI entry points


def _filter(args: Any, *, limit: int | None = None) -> Filter:
    return Filter(ids=tuple(getattr(args, "ids", None) or ()), reason=args.reason, device=args.device,
                  since=args.since, until=args.until, pending=bool(args.pending), limit=limit)


def cmd_list(settings: Settings, args: Any) -> int:
    with connect(settings.database_dsn(), autocommit=True) as conn:
        rows = select(conn, _filter(args, limit=args.limit))
    if args.json:
        print(orjson.dumps([as_json(d) for d in rows]).decode())
    else:
        print(format_table(rows))
    return 0


def cmd_replay(settings: Settings, args: Any) -> int:
    flt = _filter(args)
    if args.all and flt.empty():
        flt = Filter(since=datetime.fromtimestamp(0, WIB))  # everything, explicitly asked for
    result = replay(settings, flt, dry_run=args.dry_run)
    print(result.summary())
    return 0


def add_arguments(parser: Any) -> None:
    """The `arus dlq` subcommands, on the argparse parser of `dlq`."""
    import argparse

    def iso(text: str) -> datetime:
        try:
            return parse_time(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    sub = parser.add_subparsers(dest="action", required=True)
    lst = sub.add_parser("list", help="dead letters, newest first (times in WIB)")
    rep = sub.add_parser("replay", help="re-inject selected dead letters into the ingest topic")
    for p in (lst, rep):
        p.add_argument("--reason", help="a reason code, e.g. unknown_device")
        p.add_argument("--device", help="a device id")
        p.add_argument("--since", type=iso, help="ISO time, inclusive (no offset: WIB)")
        p.add_argument("--until", type=iso, help="ISO time, exclusive (no offset: WIB)")
        p.add_argument("--pending", action="store_true", help="only those never replayed")
    lst.add_argument("--limit", type=int, default=100)
    lst.add_argument("--json", action="store_true", help="JSON array instead of a table")
    rep.add_argument("--id", dest="ids", action="extend", nargs="+", default=[], metavar="ID",
                     help="dead letter ids (repeatable)")
    rep.add_argument("--all", action="store_true", help="every replayable dead letter when nothing else is given")
    rep.add_argument("--dry-run", action="store_true", help="show what would be replayed, send nothing")


def main(settings: Settings, args: Any) -> int:
    return cmd_list(settings, args) if args.action == "list" else cmd_replay(settings, args)
