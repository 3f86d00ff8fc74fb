"""The sink: Kafka (telemetry, aggregates, dlq) -> PostgreSQL, idempotent, at-least-once in,
exactly-once in effect.

Loop: fetch a batch, convert it (consumers.rows), and flush when enough rows are buffered or the
oldest is old enough. A flush is one PostgreSQL transaction: binary COPY into TEMP staging tables,
then INSERT ... SELECT ... ON CONFLICT into the real tables. Only after that transaction commits
are the Kafka offsets of exactly the flushed messages committed, so a crash at any point replays
messages whose rows are either absent or identical: the conflict clauses make the replay a no-op.

Failures: a message that cannot be converted becomes a `processing_error` dead letter; a database
error is retried with backoff without committing offsets (nothing is skipped); a data error that
only some messages cause is isolated by bisection and those messages become dead letters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from prometheus_client import CollectorRegistry
from psycopg import sql

from infra.db import aconnect
from infra.fetch_wait import ConsumerFetchWait
from infra.health import serve_health
from infra.kafka_admin import ensure_topics
from infra.settings import Settings
from schemas import topics as topic_names
from schemas.errors import ConfigError
from schemas.reasons import PROCESSING_ERROR
from schemas.results import Rejected

from .metrics import SinkMetrics
from .rows import (
    AGGREGATES_COLUMNS,
    AGGREGATES_TYPES,
    DEAD_LETTERS_COLUMNS,
    DEAD_LETTERS_TYPES,
    READINGS_COLUMNS,
    READINGS_TYPES,
    AggregateRow,
    Batch,
    DeadLetterRow,
    Kind,
    ReadingRow,
    dedupe_aggregates,
    poison_row,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the flush core

_STAGE = {
    "readings": ("sink_stage_readings", READINGS_COLUMNS, READINGS_TYPES),
    "aggregates": ("sink_stage_aggregates", AGGREGATES_COLUMNS, AGGREGATES_TYPES),
    "dead_letters": ("sink_stage_dead_letters", DEAD_LETTERS_COLUMNS, DEAD_LETTERS_TYPES),
}


def _column_list(columns: Iterable[str]) -> sql.Composed:
    return sql.SQL(", ").join(sql.Identifier(c) for c in columns)


def _staging_ddl() -> list[sql.Composed]:
    # TEMP: no WAL, session-private (several sinks never see each other's rows). ON COMMIT DELETE
    # ROWS empties them in place at every commit, cheaper than TRUNCATE or DROP per flush.
    out = []
    for name, columns, types in _STAGE.values():
        cols = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in zip(columns, types, strict=True)
        )
        out.append(
            sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ({}) ON COMMIT DELETE ROWS").format(
                sql.Identifier(name), cols
            )
        )
    return out


def _copy_stmt(table: str) -> sql.Composed:
    name, columns, _ = _STAGE[table]
    return sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(sql.Identifier(name), _column_list(columns))


_R_COLS = _column_list(READINGS_COLUMNS)
INSERT_READINGS = sql.SQL(
    "INSERT INTO readings ({cols}) SELECT {cols} FROM sink_stage_readings"
    " ON CONFLICT (device_id, metric, time) DO NOTHING"
).format(cols=_R_COLS)

_A_STATE = [c for c in AGGREGATES_COLUMNS if c not in ("scope", "key", "metric", "bucket")]
_A_COLS = _column_list(AGGREGATES_COLUMNS)
# The message is the window's full state: the newest one replaces the row. The WHERE skips rows
# that would not change, so a replay leaves even updated_at untouched.
INSERT_AGGREGATES = sql.SQL(
    "INSERT INTO aggregates ({cols}, updated_at) SELECT {cols}, now() FROM sink_stage_aggregates"
    " ON CONFLICT (scope, key, metric, bucket) DO UPDATE SET {sets}, updated_at = now()"
    " WHERE ({old}) IS DISTINCT FROM ({new})"
).format(
    cols=_A_COLS,
    sets=sql.SQL(", ").join(sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in _A_STATE),
    old=sql.SQL(", ").join(sql.SQL("aggregates.{}").format(sql.Identifier(c)) for c in _A_STATE),
    new=sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(sql.Identifier(c)) for c in _A_STATE),
)

_D_COLS = _column_list(DEAD_LETTERS_COLUMNS)
INSERT_DEAD_LETTERS = sql.SQL(
    "INSERT INTO dead_letters ({cols}) SELECT {cols} FROM sink_stage_dead_letters ON CONFLICT (id) DO NOTHING"
).format(cols=_D_COLS)

# Connections whose staging tables exist (created in a committed transaction).
_staged: weakref.WeakSet[psycopg.AsyncConnection[Any]] = weakref.WeakSet()


async def _copy_rows(cur: psycopg.AsyncCursor[Any], table: str, rows: Sequence[tuple[Any, ...]]) -> None:
    _, _, types = _STAGE[table]
    async with cur.copy(_copy_stmt(table)) as copy:
        copy.set_types(list(types))
        write_row = copy.write_row
        for row in rows:
            await write_row(row)


# The fast path: readings COPYed straight into the table inside a savepoint. A replay (a crash
# between the database commit and the offset commit, or a worker re-emitting after its own crash)
# meets the primary key and falls back to the staged upsert, which skips what is already there.
# Measured (bench sink stage): COPY into the indexed table ~200k rows/s vs ~110k for the
# INSERT ... SELECT ... ON CONFLICT from staging.
COPY_READINGS = sql.SQL("COPY readings ({}) FROM STDIN (FORMAT BINARY)").format(_R_COLS)
# greatest(): replays and late data carry older times and must not move last_seen back.
# The device rows are locked first, in device_id order (an UPDATE ... FROM locks in its join's order):
# the record sink updates the same rows (status) in that order too, so the two never deadlock.
LOCK_DEVICES = sql.SQL("SELECT 1 FROM devices WHERE device_id = ANY(%s) ORDER BY device_id FOR NO KEY UPDATE")
UPDATE_LAST_SEEN_FROM_ARRAYS = sql.SQL(
    "UPDATE devices d SET last_seen = x.t"
    " FROM unnest(%s::text[], %s::timestamptz[]) AS x(device_id, t)"
    " WHERE d.device_id = x.device_id AND (d.last_seen IS NULL OR d.last_seen < x.t)"
)


def _last_seen(readings: Sequence[ReadingRow]) -> tuple[list[str], list[Any]]:
    """Every device of these readings with its newest observation time (no throttle)."""
    throttle = LastSeenThrottle(0.0)
    throttle.add(readings)
    return throttle.take(0.0, everything=True)


class LastSeenThrottle:
    """devices.last_seen written at most once per `interval_s` per device (wall clock), always with
    the highest observation time seen. Updating every device at every flush cost PostgreSQL as many
    row updates as the flushes times the devices (10 flushes/s x 2,000 devices at 10,000 events/s).
    A device's newest time is held at most `interval_s` (pending_due writes it even without new
    readings); a sink crash loses only what was held, and the device's next reading corrects it."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.pending: dict[str, Any] = {}  # device -> highest observation time not yet written
        self.written: dict[str, float] = {}  # device -> monotonic time of its last write

    def add(self, readings: Sequence[ReadingRow]) -> None:
        pending = self.pending
        get = pending.get
        for row in readings:
            t, device = row[0], row[1]
            seen = get(device)
            if seen is None or t > seen:
                pending[device] = t

    def take(self, now: float, everything: bool = False) -> tuple[list[str], list[Any]]:
        """The devices due (sorted: concurrent sinks lock device rows in one order) and their times."""
        written, interval = self.written, self.interval_s
        due = sorted(d for d in self.pending if everything or now - written.get(d, -1e18) >= interval)
        times = [self.pending.pop(d) for d in due]
        for d in due:
            written[d] = now
        if len(written) > 200_000:  # forget devices not written for long (bounded memory)
            self.written = {d: w for d, w in written.items() if now - w < interval}
        return due, times

    def has_due(self, now: float) -> bool:
        written, interval = self.written, self.interval_s
        return any(now - written.get(d, -1e18) >= interval for d in self.pending)

    def restore(self, devices: list[str], times: list[Any]) -> None:
        """Put back what a failed write took (the next attempt writes it)."""
        for d, t in zip(devices, times, strict=True):
            seen = self.pending.get(d)
            if seen is None or t > seen:
                self.pending[d] = t
            self.written.pop(d, None)


async def _copy_readings_direct(cur: psycopg.AsyncCursor[Any], readings: Sequence[ReadingRow]) -> bool:
    """COPY into readings in a savepoint; False (and nothing written) when a row already exists."""
    try:
        async with cur.connection.transaction():
            async with cur.copy(COPY_READINGS) as copy:
                copy.set_types(list(READINGS_TYPES))
                write_row = copy.write_row
                for row in readings:
                    await write_row(row)
    except psycopg.errors.UniqueViolation:
        return False
    return True


async def write_batch(
    conn: psycopg.AsyncConnection[Any],
    readings: Sequence[ReadingRow],
    aggregates: Sequence[AggregateRow],
    dead_letters: Sequence[DeadLetterRow],
    last_seen: tuple[list[str], list[Any]] | None = None,
) -> bool:
    """Write rows idempotently, in one transaction (the flush core). Returns False when the readings
    had to take the staged upsert (some already existed: a replay).

    `conn` must not be inside a transaction (autocommit, or idle). Aggregates are reduced to the
    last state per key first, so callers may pass several states of one window.
    """
    direct = True
    if last_seen is None:  # no throttle: every device of these readings
        last_seen = _last_seen(readings)
    if not (readings or aggregates or dead_letters or last_seen[0]):
        return direct
    aggregates = dedupe_aggregates(list(aggregates))
    created = False
    # Round trips matter more than statement count here (the sink interleaves them with its own
    # work): the statements after the COPYs go as one simple-protocol query.
    statements: list[sql.Composable] = []
    async with conn.transaction(), conn.cursor() as cur:
        if conn not in _staged:
            await cur.execute(sql.SQL("; ").join(_staging_ddl()))
            created = True
        if readings:
            if not await _copy_readings_direct(cur, readings):
                direct = False
                await _copy_rows(cur, "readings", readings)
                statements.append(INSERT_READINGS)
        if last_seen[0]:
            await cur.execute(LOCK_DEVICES, (last_seen[0],))
            await cur.execute(UPDATE_LAST_SEEN_FROM_ARRAYS, last_seen)
        if aggregates:
            await _copy_rows(cur, "aggregates", aggregates)
            statements.append(INSERT_AGGREGATES)
        if dead_letters:
            await _copy_rows(cur, "dead_letters", dead_letters)
            statements.append(INSERT_DEAD_LETTERS)
        if statements:
            await cur.execute(sql.SQL("; ").join(statements))
    if created:
        _staged.add(conn)
    return direct


def split_by_device(readings: Sequence[ReadingRow], n: int) -> list[list[ReadingRow]]:
    """n parts, every device's rows in one part (the parts' transactions touch disjoint keys)."""
    parts: list[list[ReadingRow]] = [[] for _ in range(n)]
    slot: dict[str, list[ReadingRow]] = {}
    for row in readings:
        device = row[1]
        part = slot.get(device)
        if part is None:
            part = slot[device] = parts[len(slot) % n]
        part.append(row)
    return parts


RAW_SCRATCH = "sink_raw_scratch"


async def copy_raw(conn: psycopg.AsyncConnection[Any], rows: Sequence[ReadingRow]) -> None:
    """Plain binary COPY of readings rows into an UNLOGGED scratch table: the benchmark's baseline
    (no staging, no conflict handling, no indexes). The caller may TRUNCATE sink_raw_scratch."""
    async with conn.transaction(), conn.cursor() as cur:
        cols = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t))
            for c, t in zip(READINGS_COLUMNS, READINGS_TYPES, strict=True)
        )
        await cur.execute(
            sql.SQL("CREATE UNLOGGED TABLE IF NOT EXISTS {} ({})").format(sql.Identifier(RAW_SCRATCH), cols)
        )
        stmt = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
            sql.Identifier(RAW_SCRATCH), _R_COLS
        )
        async with cur.copy(stmt) as copy:
            copy.set_types(list(READINGS_TYPES))
            for row in rows:
                await copy.write_row(row)


# --------------------------------------------------------------------------- error handling

# SQLSTATE classes caused by the rows themselves (not by the database being unavailable):
# 21 cardinality, 22 data exception, 23 integrity constraint, 54 program limit (e.g. index row size).
_DATA_ERROR_CLASSES = frozenset({"21", "22", "23", "54"})


def is_data_error(exc: BaseException) -> bool:
    state = getattr(exc, "sqlstate", None)
    return isinstance(exc, psycopg.Error) and state is not None and state[:2] in _DATA_ERROR_CLASSES


class _Stopped(Exception):
    """The sink is stopping while the database is unavailable: give up without committing."""


# --------------------------------------------------------------------------- the consumer

Record = tuple[Kind, bytes | None, str, int, int, int]  # kind, value, topic, partition, offset, timestamp
Fetched = tuple[Kind, str, int, Sequence[Any]]  # kind, topic, partition, consecutive ConsumerRecords
_CHUNK = 2000  # messages per fetch: converted between two chances for the flush in flight to progress


class _Revocations(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def on_partitions_revoked(self, revoked: Any) -> None:
        # Still the owner of these partitions: write what was fetched and commit its offsets now,
        # so the next owner starts exactly after it.
        await self.sink.flush(reason="rebalance")

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("assigned %d partitions: %s", len(assigned), sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))


class Sink:
    def __init__(self, settings: Settings, metrics: SinkMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.dsn = settings.database_dsn()
        self.kinds = {
            settings.topic(topic_names.TELEMETRY): Kind.TELEMETRY,
            settings.topic(topic_names.AGGREGATES): Kind.AGGREGATES,
            settings.topic(topic_names.DLQ): Kind.DLQ,
        }
        self.flush_rows = settings.sink_flush_rows
        self.last_seen = LastSeenThrottle(settings.sink_last_seen_interval_s)
        self.flush_s = settings.sink_flush_ms / 1000
        self.stopping = asyncio.Event()
        self._lock = asyncio.Lock()
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._copy_conns: list[psycopg.AsyncConnection[Any] | None] = [None] * (settings.sink_copy_connections - 1)
        self._consumer: AIOKafkaConsumer | None = None
        self._fetch_wait: ConsumerFetchWait | None = None
        self._inflight: asyncio.Task[None] | None = None
        self._reset()

    def _reset(self) -> None:
        self._batch = Batch()
        self._records: list[Fetched] = []  # kept to re-convert in halves when a data error hits
        self._offsets: dict[TopicPartition, int] = {}  # next offset to commit, per partition
        self._since: float | None = None  # monotonic time of the oldest buffered message

    # ---- lifecycle

    def request_stop(self) -> None:
        self.stopping.set()

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Ready while consuming and the last flush (if any) did not leave the database unreachable."""
        consumer, conn = self._consumer, self._conn
        consuming = consumer is not None and not self.stopping.is_set()
        db_ok = conn is None or not (conn.closed or conn.broken)
        assigned = sorted(f"{tp.topic}[{tp.partition}]" for tp in consumer.assignment()) if consumer else []
        return consuming and db_ok, {"consuming": consuming, "database": db_ok, "assigned": assigned}

    async def run(self) -> None:
        s = self.settings
        assert s.kafka_bootstrap is not None
        # Subscribing to a missing topic would let the broker auto-create it with its own default
        # partition count; create ours first, as the other components do (idempotent).
        await asyncio.to_thread(ensure_topics, s.kafka_bootstrap, list(self.kinds), s.partitions)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap,
            group_id=f"{s.consumer_group_prefix}-sink",
            client_id="arus-sink",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=s.sink_session_timeout_ms,
            heartbeat_interval_ms=s.sink_heartbeat_interval_ms,
            # Time to flush on revocation before the broker gives up on this member.
            rebalance_timeout_ms=max(10_000, s.sink_session_timeout_ms),
            # Topics created after start (fresh broker) are noticed within seconds.
            metadata_max_age_ms=5_000,
            max_partition_fetch_bytes=4 * 1024 * 1024,
            fetch_max_wait_ms=s.kafka_fetch_max_wait_ms,  # the floor; adapted by ConsumerFetchWait
        )
        consumer.subscribe(list(self.kinds), listener=_Revocations(self))
        self._consumer = consumer
        await consumer.start()
        self._fetch_wait = ConsumerFetchWait(consumer, "sink", s.kafka_fetch_max_wait_ms,
                                             s.kafka_fetch_max_wait_ceiling_ms)
        log.info("sink consuming %s as group %s-sink", ", ".join(self.kinds), s.consumer_group_prefix)
        try:
            await self._loop(consumer)
            await self.flush(reason="stop")
            if self.last_seen.pending:  # what the throttle still holds
                async with self._lock:
                    await self._attempt(Batch())
        except _Stopped:
            log.warning("stopped with unflushed messages; their offsets are not committed (they will be replayed)")
        finally:
            if self._inflight is not None and not self._inflight.done():
                # Only on an unexpected error: its offsets are not committed, so it is replayed.
                self._inflight.cancel()
                with contextlib.suppress(BaseException):
                    await self._inflight
            with contextlib.suppress(Exception):
                await consumer.stop()
            for conn in [self._conn, *self._copy_conns]:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()

    async def _loop(self, consumer: AIOKafkaConsumer) -> None:
        # Fetches are small (_CHUNK messages) so that the flush in flight, which only waits on
        # PostgreSQL, gets the event loop between two of them and PostgreSQL works in parallel with
        # the conversion here. The only awaits are between whole fetches: the rebalance listener
        # never sees a fetch half-buffered.
        fetch_max = min(self.flush_rows, _CHUNK)
        while not self.stopping.is_set():
            if self._since is None:
                timeout_ms = int(self.flush_s * 1000)
            else:
                timeout_ms = max(0, int((self._since + self.flush_s - time.monotonic()) * 1000))
            if self._inflight is not None:
                await asyncio.sleep(0)  # getmany may return buffered records without yielding
            data = await consumer.getmany(timeout_ms=timeout_ms, max_records=fetch_max)
            for tp, msgs in data.items():
                self._buffer(consumer, tp, msgs)
            if self._fetch_wait is not None:
                await self._fetch_wait.after_poll(time.monotonic(), bool(data))
            if self._since is not None and (
                len(self._batch) >= self.flush_rows or time.monotonic() - self._since >= self.flush_s
            ):
                await self._flush_in_background()
            elif self._since is None and self._inflight is None and self.last_seen.has_due(time.monotonic()):
                async with self._lock:  # quiet: write the last_seen times held back by the throttle
                    await self._attempt(Batch())

    def _buffer(self, consumer: AIOKafkaConsumer, tp: TopicPartition, msgs: Sequence[Any]) -> None:
        """Convert and buffer consecutive messages of one partition (no await: atomic for the listener)."""
        topic, partition = tp.topic, tp.partition
        kind = self.kinds[topic]
        if self._since is None:
            self._since = time.monotonic()
        self._records.append((kind, topic, partition, msgs))
        poison = self._batch.add_records(kind, msgs, topic=topic, partition=partition)
        next_offset = self._offsets[tp] = msgs[-1].offset + 1
        self.metrics.messages.labels(topic).inc(len(msgs))
        if poison:
            self.metrics.poison.labels(topic).inc(poison)
        hw = consumer.highwater(tp)
        if hw is not None:
            self.metrics.lag.labels(topic, str(partition)).set(max(0, hw - next_offset))

    # ---- flushing

    # One flush at a time, in order (so the newest aggregate state is written last), but
    # pipelined: while PostgreSQL works on flush N in its own process, this loop fetches and
    # converts batch N+1. Flush N+1 starts only after flush N has committed its offsets.

    def _take(self) -> tuple[Batch, list[Fetched], dict[TopicPartition, int]]:
        job = (self._batch, self._records, self._offsets)
        self._reset()
        return job

    async def _wait_inflight(self) -> None:
        task, self._inflight = self._inflight, None
        if task is not None:
            await task  # re-raises _Stopped (or a bug) from the flush

    async def flush(self, reason: str) -> None:
        """Write and commit everything fetched so far; returns when it is committed."""
        async with self._lock:
            await self._wait_inflight()
            if self._offsets:
                await self._flush_job(self._take(), reason)

    async def _flush_in_background(self) -> None:
        async with self._lock:
            await self._wait_inflight()
            if self._offsets:
                self._inflight = asyncio.create_task(self._flush_job(self._take(), "batch"))

    async def _flush_job(self, job: tuple[Batch, list[Fetched], dict[TopicPartition, int]], reason: str) -> None:
        batch, records, offsets = job
        t0 = time.monotonic()
        await self._write(batch, records)  # raises _Stopped only when stopping
        await self._commit(offsets)  # strictly after the rows are committed in PostgreSQL
        n = len(batch)
        self.metrics.batch_rows.observe(n)
        self.metrics.flush_seconds.observe(time.monotonic() - t0)
        self.metrics.last_flush.set(time.time())
        log.debug("flushed %d rows from %d messages (%s)", n, sum(len(f[3]) for f in records), reason)

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    await self._conn.close()
                self._conn = None
            self._conn = await aconnect(self.dsn, autocommit=True)
        return self._conn

    async def _copy_connection(self, i: int) -> psycopg.AsyncConnection[Any]:
        conn = self._copy_conns[i]
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
            conn = self._copy_conns[i] = await aconnect(self.dsn, autocommit=True)
        return conn

    async def _write_parallel(self, batch: Batch, seen: tuple[list[str], list[Any]]) -> bool:
        """One flush's rows; a large flush's readings split by device over the extra connections, COPYed
        at once. Each part is its own transaction and all are committed before the offsets are: when
        one fails after another committed, the retry of the whole batch meets the committed rows and
        takes the idempotent staged upsert for them."""
        readings = batch.readings
        # a small flush on one connection: a second one's round trips would cost more than they save
        parallel = self._copy_conns and len(readings) >= self.settings.sink_copy_parallel_min_rows
        parts = split_by_device(readings, len(self._copy_conns) + 1) if parallel else [readings]
        conn = await self._connection()
        jobs = [write_batch(conn, parts[0], batch.aggregate_rows(), batch.dead_letters, seen)]
        for i, part in enumerate(parts[1:]):
            jobs.append(write_batch(await self._copy_connection(i), part, (), (), ([], [])))
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return all(results)

    async def _backoff(self, attempt: int) -> None:
        delay = min(5.0, 0.1 * 2**attempt) * (0.5 + random.random() / 2)  # noqa: S311 - jitter only
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), delay)

    async def _attempt(self, batch: Batch) -> Exception | None:
        """Write one batch, retrying until it succeeds; returns the error when it is a data error."""
        attempt = 0
        self.last_seen.add(batch.readings)
        seen = self.last_seen.take(time.monotonic(), everything=self.stopping.is_set())
        while True:
            try:
                if not await self._write_parallel(batch, seen):
                    self.metrics.errors.labels("replay_upsert").inc()
            except Exception as exc:  # noqa: BLE001 - classify every failure; never crash the loop
                if is_data_error(exc):
                    self.last_seen.restore(*seen)
                    return exc
                self.metrics.errors.labels("db").inc()
                if self.stopping.is_set():
                    raise _Stopped() from exc
                log.warning("database write failed (attempt %d), retrying: %s", attempt + 1, exc)
                await self._backoff(attempt)
                attempt += 1
                continue
            self.metrics.rows_written.labels("readings").inc(len(batch.readings))
            self.metrics.rows_written.labels("aggregates").inc(len(batch.aggregates))
            self.metrics.rows_written.labels("dead_letters").inc(len(batch.dead_letters))
            return None

    async def _write(self, batch: Batch, fetched: list[Fetched]) -> None:
        error = await self._attempt(batch)
        if error is None:
            return
        records: list[Record] = [
            (kind, m.value, topic, partition, m.offset, m.timestamp)
            for kind, topic, partition, msgs in fetched
            for m in msgs
        ]
        # Some message(s) make PostgreSQL refuse the batch: bisect, in order (so the last
        # aggregate state still wins), until each refused message is alone; store it as a dead letter.
        self.metrics.errors.labels("isolate").inc()
        log.warning("batch refused by PostgreSQL (%s); isolating the messages that cause it", error)
        stack: list[list[Record]] = [records[len(records) // 2:], records[: len(records) // 2]]
        while stack:
            part = stack.pop()
            if not part:
                continue
            sub = Batch()
            for kind, value, topic, partition, offset, ts in part:
                sub.add(kind, value, topic=topic, partition=partition, offset=offset, timestamp_ms=ts)
            error = await self._attempt(sub)
            if error is None:
                continue
            if len(part) > 1:
                stack.append(part[len(part) // 2:])
                stack.append(part[: len(part) // 2])
                continue
            kind, value, topic, partition, offset, ts = part[0]
            rejected = Rejected(PROCESSING_ERROR, f"{kind} message refused by PostgreSQL: {error}")
            dead = Batch(dead_letters=[
                poison_row(rejected, value, topic=topic, partition=partition, offset=offset, timestamp_ms=ts)
            ])
            log.error("dead-lettered %s[%d]@%d: %s", topic, partition, offset, error)
            self.metrics.poison.labels(topic).inc()
            while (error := await self._attempt(dead)) is not None:
                # Cannot happen with sanitised rows; never skip it silently either.
                log.error("cannot store the dead letter of %s[%d]@%d: %s", topic, partition, offset, error)
                self.metrics.errors.labels("db").inc()
                if self.stopping.is_set():
                    raise _Stopped() from error
                await self._backoff(5)

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        owned = consumer.assignment()
        mine = {tp: off for tp, off in offsets.items() if tp in owned}
        if not mine:
            return
        try:
            await consumer.commit(mine)
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            # The rows are in PostgreSQL; the worst outcome is a replay, which changes nothing.
            self.metrics.errors.labels("commit").inc()
            log.warning("offset commit failed (messages will be replayed, harmlessly): %s", exc)


async def _main(settings: Settings, registry: CollectorRegistry) -> None:
    from .records import RecordSink
    from .rollups import RollupJob

    metrics = SinkMetrics(registry)
    sink = Sink(settings, metrics)
    records = RecordSink(settings, metrics)  # the low-volume tables, same process and metrics
    rollups = RollupJob(settings, registry)  # hourly/daily rollups and retention (consumers/rollups.py)
    if settings.sink_metrics_port is not None:
        serve_health(settings.sink_metrics_port, registry, "sink", sink.readiness)

    def stop() -> None:
        sink.request_stop()
        records.request_stop()
        rollups.request_stop()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    tasks = [asyncio.create_task(sink.run()), asyncio.create_task(records.run()), asyncio.create_task(rollups.run())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                stop()
                raise t.exception()  # type: ignore[misc]
        await asyncio.gather(*tasks)
    finally:
        stop()
        await asyncio.gather(*tasks, return_exceptions=True)


def run_sink(settings: Settings, registry: CollectorRegistry | None = None) -> None:
    """Run the sink until SIGTERM/SIGINT (then flush, commit and return). Blocking."""
    if settings.kafka_bootstrap is None:
        raise ConfigError("ARUS_KAFKA_BOOTSTRAP is not set")
    if settings.database_url is None:
        raise ConfigError("ARUS_DATABASE_URL is not set")
    registry = registry if registry is not None else CollectorRegistry()
    asyncio.run(_main(settings, registry))


def main() -> None:
    """`python -m consumers.sink`: the sink with settings from the environment (the CLI's `arus sink`
    calls run_sink the same way)."""
    from infra.logs import setup_logging
    from infra.settings import get_settings

    settings = get_settings()
    setup_logging("sink", settings.log_json)
    run_sink(settings)


if __name__ == "__main__":
    main()
