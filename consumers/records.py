"""The record sink: low-volume topics (device status, service events, alerts, indicators) -> their tables.

The hot topics (telemetry, aggregates, dlq) go through consumers.sink with COPY. The topics here carry
tens of messages per second, each of which may touch several tables with its own upsert rules, so a
table is described by a `TableSpec`: which topic feeds it and how one JSON message becomes the
parameters of one or more idempotent statements (INSERT ... ON CONFLICT keyed by event id, alert id,
window key). A feature adds its spec to SPECS (in its own module under consumers/) and nothing else.

Same guarantees as the hot sink: one transaction per flush, Kafka offsets committed only after it;
a message the database refuses is isolated (savepoint per message) and kept as a processing_error
dead letter; a message that is not what it claims to be becomes a dead letter, never a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from infra.db import aconnect
from infra.fetch_wait import ConsumerFetchWait
from infra.kafka_admin import ensure_topics
from infra.settings import Settings
from schemas.reasons import PROCESSING_ERROR
from schemas.results import Rejected

from .metrics import SinkMetrics
from .rows import poison_row

log = logging.getLogger("arus.records")

# (SQL with %s placeholders, parameter tuple): one statement of one message
Write = tuple[str, tuple[Any, ...]]


class BadRecord(Exception):
    """Raised by a TableSpec converter when a message is not what its topic promises."""


@dataclass(frozen=True)
class TableSpec:
    topic: str  # topic suffix, e.g. "device-status"
    convert: Callable[[dict[str, Any]], Sequence[Write]]  # may raise BadRecord
    name: str = ""
    # For writes that lock rows the hot sink also updates (devices): the row's key. Such writes go
    # last in a flush, sorted by it (stable), as the hot sink locks its device rows in key order: two
    # transactions taking the same rows in one order wait for each other but never deadlock.
    lock_key: Callable[[dict[str, Any]], str] | None = None


def _specs() -> list[TableSpec]:
    """Every record table. Imported lazily so each module stays independent."""
    from . import record_specs

    return record_specs.all_specs()


T = TypeVar("T")


def in_lock_order(keyed: Sequence[tuple[str | None, T]]) -> list[T]:
    """Entries without a lock key first, in arrival order; then the keyed ones sorted by key (stable:
    the writes of one row keep their order)."""
    plain = [entry for key, entry in keyed if key is None]
    locking = sorted(((key, entry) for key, entry in keyed if key is not None), key=lambda item: item[0])
    return plain + [entry for _, entry in locking]


async def write_records(conn: psycopg.AsyncConnection[Any], writes: Sequence[Write]) -> None:
    """Apply writes in one transaction (conn in autocommit mode, idle)."""
    async with conn.transaction(), conn.cursor() as cur:
        for stmt, params in writes:
            await cur.execute(stmt, params)


class RecordSink:
    def __init__(self, settings: Settings, metrics: SinkMetrics, specs: Sequence[TableSpec] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.dsn = settings.database_dsn()
        self.by_topic: dict[str, list[TableSpec]] = {}
        for spec in specs if specs is not None else _specs():
            self.by_topic.setdefault(settings.topic(spec.topic), []).append(spec)
        self.stopping = asyncio.Event()
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.flush_s = min(0.1, settings.sink_flush_ms / 1000)

    def request_stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        s = self.settings
        if not self.by_topic:
            return
        assert s.kafka_bootstrap is not None
        await asyncio.to_thread(ensure_topics, s.kafka_bootstrap, list(self.by_topic), s.partitions)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap, group_id=f"{s.consumer_group_prefix}-records",
            client_id="arus-records", enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=s.sink_session_timeout_ms, heartbeat_interval_ms=s.sink_heartbeat_interval_ms,
            rebalance_timeout_ms=max(10_000, s.sink_session_timeout_ms), metadata_max_age_ms=5_000,
            fetch_max_wait_ms=s.kafka_fetch_max_wait_ms,  # the floor; adapted by ConsumerFetchWait
        )
        consumer.subscribe(list(self.by_topic))
        await consumer.start()
        fetch_wait = ConsumerFetchWait(consumer, "record sink", s.kafka_fetch_max_wait_ms,
                                       s.kafka_fetch_max_wait_ceiling_ms)
        log.info("record sink consuming %s", ", ".join(self.by_topic))
        try:
            while not self.stopping.is_set():
                data = await consumer.getmany(timeout_ms=int(self.flush_s * 1000), max_records=2000)
                await fetch_wait.after_poll(time.monotonic(), bool(data))
                if not data:
                    continue
                await self._flush(data)
                offsets = {tp: msgs[-1].offset + 1 for tp, msgs in data.items()}
                owned = consumer.assignment()
                with contextlib.suppress(KafkaError):  # a replay of upserts changes nothing
                    await consumer.commit({tp: o for tp, o in offsets.items() if tp in owned})
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    await self._conn.close()

    def _convert(self, topic: str, partition: int, msg: Any) -> tuple[list[Write], str | None] | Rejected:
        """The message's writes, and its lock key when a spec of the topic has one."""
        try:
            obj = orjson.loads(msg.value) if msg.value is not None else None
            if not isinstance(obj, dict):
                raise BadRecord("not a JSON object")
            writes: list[Write] = []
            key: str | None = None
            for spec in self.by_topic[topic]:
                writes.extend(spec.convert(obj))
                if spec.lock_key is not None:
                    key = spec.lock_key(obj)
            return writes, key
        except (orjson.JSONDecodeError, BadRecord, KeyError, TypeError, ValueError) as exc:
            return Rejected(PROCESSING_ERROR, f"{topic} message not storable: {exc}")

    def _dead(self, rejected: Rejected, topic: str, partition: int, msg: Any) -> Write:
        row = poison_row(rejected, msg.value, topic=topic, partition=partition, offset=msg.offset,
                         timestamp_ms=msg.timestamp)
        return (
            "INSERT INTO dead_letters (id, time, reason, message, source, device_id, topic, \"partition\","
            " \"offset\", raw, raw_encoding) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (id) DO NOTHING", tuple(row),
        )

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = await aconnect(self.dsn, autocommit=True)
        return self._conn

    async def _flush(self, data: dict[TopicPartition, list[Any]]) -> None:
        keyed: list[tuple[str | None, tuple[list[Write], str, int, Any]]] = []
        for tp, msgs in data.items():
            for msg in msgs:
                converted = self._convert(tp.topic, tp.partition, msg)
                if isinstance(converted, Rejected):
                    self.metrics.poison.labels(tp.topic).inc()
                    keyed.append((None, ([self._dead(converted, tp.topic, tp.partition, msg)], tp.topic,
                                         tp.partition, msg)))
                else:
                    keyed.append((converted[1], (converted[0], tp.topic, tp.partition, msg)))
                self.metrics.messages.labels(tp.topic).inc()
        per_msg = in_lock_order(keyed)
        attempt = 0
        while True:
            try:
                conn = await self._connection()
                try:
                    await write_records(conn, [w for writes, *_ in per_msg for w in writes])
                except (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError) as exc:
                    log.warning("record batch refused (%s); isolating", exc)
                    await self._isolate(conn, per_msg)
                self.metrics.last_flush.set(time.time())
                return
            except psycopg.OperationalError as exc:
                self.metrics.errors.labels("db").inc()
                if self.stopping.is_set():
                    raise
                log.warning("record write failed (attempt %d), retrying: %s", attempt + 1, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), min(5.0, 0.1 * 2**attempt))
                attempt += 1

    async def _isolate(self, conn: psycopg.AsyncConnection[Any], per_msg: list[tuple[list[Write], str, int, Any]]) -> None:
        async with conn.transaction(), conn.cursor() as cur:
            for writes, topic, partition, msg in per_msg:
                try:
                    async with conn.transaction():  # a savepoint per message
                        for stmt, params in writes:
                            await cur.execute(stmt, params)
                except (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError) as exc:
                    self.metrics.poison.labels(topic).inc()
                    log.error("dead-lettered %s[%d]@%d: %s", topic, partition, msg.offset, exc)
                    stmt, params = self._dead(Rejected(PROCESSING_ERROR, f"refused by PostgreSQL: {exc}"),
                                              topic, partition, msg)
                    await cur.execute(stmt, params)
