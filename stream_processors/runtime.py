"""The Kafka adapter of the processors: batched consume, batched produce, checkpointed state.

Per input partition a processor folds messages into in-memory state. Every checkpoint interval the
runtime (1) lets each processor emit its changed windows, (2) waits until every output is acknowledged,
(3) writes the changed state plus the input offset it reflects to the state topic (same partition
number), (4) commits the input offset. After a crash or rebalance the new owner restores the state
from the state topic and skips input at or below the restored offset, so no event is counted twice
and none is lost, while the hot path stays free of per-event changelog writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2

from infra.fetch_wait import ConsumerFetchWait
from schemas import reasons, topics
from schemas.errors import ConfigError
from schemas.results import Rejected

from .metrics import WorkerMetrics
from .outputs import Outputs

log = logging.getLogger("arus.worker")

CHUNK_BYTES = 512 * 1024  # keep each state record well under the broker's message size limit


class PartitionProcessor(Protocol):
    offset: int

    def process(self, raw: bytes, offset: int, now_ms: int, out: Outputs) -> None: ...
    def flush(self, out: Outputs) -> None: ...
    def snapshot(self, full: bool) -> dict[str, Any]: ...
    def restore(self, payload: dict[str, Any]) -> None: ...
    def drop_closed(self) -> None: ...


class Partitioner:
    """Kafka's default (murmur2) partitioning, cached per key: keys (devices, windows) repeat a lot."""

    def __init__(self) -> None:
        self.cache: dict[tuple[bytes, int], int] = {}

    def __call__(self, key: bytes | None, n: int) -> int:
        if key is None:
            return 0
        hit = self.cache.get((key, n))
        if hit is None:
            if len(self.cache) > 500_000:
                self.cache.clear()
            hit = self.cache[(key, n)] = (murmur2(key) & 0x7FFFFFFF) % n
        return hit


# Aggregates are keyed per window (scope|key|metric|start): unique keys, so hashing them missed the
# partitioner's cache for nearly every record (~10% of the worker). Route them by scope|key instead:
# one window still always lands in one partition, so its states stay in order.
ROUTES: dict[str, Callable[[bytes], bytes]] = {topics.AGGREGATES: lambda key: key.rsplit(b"|", 2)[0]}


class BatchProducer:
    """Produces many records with one BatchBuilder per (topic, partition) instead of one send each."""

    def __init__(self, producer: AIOKafkaProducer, topic_name: Callable[[str], str]) -> None:
        self.producer = producer
        self.topic_name = topic_name
        self.partitions: dict[str, int] = {}
        self.partitioner = Partitioner()
        self.pending: list[asyncio.Future[Any]] = []

    async def _partition_count(self, topic: str) -> int:
        n = self.partitions.get(topic)
        if n is None:
            parts = await self.producer.partitions_for(topic)
            n = self.partitions[topic] = len(parts)
        return n

    async def send(self, records: Sequence[tuple[str, bytes | None, bytes]], partition: int | None = None,
                   topic: str | None = None) -> None:
        """Records are (topic suffix, key, value); `topic` overrides the suffix with a full name."""
        by_tp: dict[tuple[str, int], list[tuple[bytes | None, bytes]]] = {}
        counts = self.partitions
        partitioner = self.partitioner
        for suffix, key, value in records:
            topic_ = topic or self.topic_name(suffix)
            n = counts.get(topic_) or await self._partition_count(topic_)
            if partition is not None:
                p = partition
            else:
                route = ROUTES.get(suffix)
                p = partitioner(route(key) if route is not None and key is not None else key, n)
            by_tp.setdefault((topic_, p), []).append((key, value))
        for (topic, p), items in by_tp.items():
            batch = self.producer.create_batch()
            for key, value in items:
                if batch.append(key=key, value=value, timestamp=None) is None:
                    self.pending.append(await self.producer.send_batch(batch, topic, partition=p))
                    batch = self.producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
            if batch.record_count():
                self.pending.append(await self.producer.send_batch(batch, topic, partition=p))

    async def wait_delivered(self) -> None:
        pending, self.pending = self.pending, []
        if pending:
            await asyncio.gather(*pending)


def checkpoint_kind(count: int, full_every: int, partition: int) -> tuple[bool, int]:
    """(is this checkpoint a full snapshot, the count to keep) from checkpoints since the last full one.

    The first checkpoint after an assignment (count 0) is full. Partitions then start their cycle at
    different points (a quarter apart) so that their full snapshots, each a burst of memory and of
    state-topic bytes, do not all fall on the same checkpoint.
    """
    if count == 0:
        return True, 1 + (partition % 4) * full_every // 4
    if count >= full_every:
        return True, 1
    return False, count + 1


class StreamRunner(ConsumerRebalanceListener):
    """Runs one kind of PartitionProcessor over one source topic in a consumer group."""

    def __init__(
        self, *, name: str, bootstrap: str, group_id: str, source_topic: str, state_topic: str,
        topic_name: Callable[[str], str], factory: Callable[[int], PartitionProcessor],
        metrics: WorkerMetrics, batch_max: int = 5000, linger_ms: int = 20,
        checkpoint_interval_ms: int = 1000, full_snapshot_every: int = 300, session_timeout_ms: int = 6000,
        fetch_max_wait_ms: int = 20, fetch_max_wait_ceiling_ms: int = 1000,
    ) -> None:
        self.name = name
        # see Settings.kafka_fetch_max_wait_ms and infra/fetch_wait.py
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.fetch_max_wait_ceiling_ms = fetch_max_wait_ceiling_ms
        self.fetch_wait: ConsumerFetchWait | None = None
        self.bootstrap = bootstrap
        self.group_id = group_id
        self.source_topic = source_topic
        self.state_topic = state_topic
        self.topic_name = topic_name
        self.factory = factory
        self.metrics = metrics
        self.batch_max = batch_max
        self.linger_ms = linger_ms
        self.checkpoint_interval = checkpoint_interval_ms / 1000.0
        self.full_snapshot_every = full_snapshot_every
        self.session_timeout_ms = session_timeout_ms
        self.procs: dict[int, PartitionProcessor] = {}
        self.committed: dict[int, int] = {}
        self.checkpoints: dict[int, int] = {}  # partition -> checkpoints since the last full snapshot
        self.out = Outputs()
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.batch_producer: BatchProducer | None = None
        self._lock = asyncio.Lock()  # checkpoints and rebalances never interleave
        self.source_partitions = 0  # of the source topic, known once started

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, linger_ms=5, max_batch_size=1024 * 1024, acks="all",
            max_request_size=4 * 1024 * 1024, request_timeout_ms=30000,
        )
        await self.producer.start()
        self.batch_producer = BatchProducer(self.producer, self.topic_name)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=self.group_id, enable_auto_commit=False,
            auto_offset_reset="earliest", max_partition_fetch_bytes=8 * 1024 * 1024,
            fetch_max_bytes=32 * 1024 * 1024, fetch_max_wait_ms=self.fetch_max_wait_ms,
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=max(100, self.session_timeout_ms // 6),
            rebalance_timeout_ms=max(10000, self.session_timeout_ms),
            max_poll_interval_ms=60000,
        )
        await self.consumer.start()
        self.fetch_wait = ConsumerFetchWait(self.consumer, self.name, self.fetch_max_wait_ms,
                                            self.fetch_max_wait_ceiling_ms)
        sources = await self.producer.partitions_for(self.source_topic)
        states = await self.producer.partitions_for(self.state_topic)
        self.source_partitions = len(sources)
        if len(states) < len(sources):
            raise ConfigError(f"{self.state_topic} has {len(states)} partitions but {self.source_topic} has "
                              f"{len(sources)}: the state topic must have at least as many")
        self.consumer.subscribe([self.source_topic], listener=self)

    async def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        await self.start()
        assert self.consumer is not None and self.batch_producer is not None and self.fetch_wait is not None
        last_checkpoint = time.monotonic()
        try:
            while not self.stopping.is_set():
                data = await self.consumer.getmany(timeout_ms=self.linger_ms, max_records=self.batch_max)
                if data:
                    await self._process(data)
                await self.fetch_wait.after_poll(time.monotonic(), bool(data))
                if self.out.records:
                    await self._send_outputs()
                if time.monotonic() - last_checkpoint >= self.checkpoint_interval:
                    async with self._lock:
                        await self._checkpoint(list(self.procs))
                    last_checkpoint = time.monotonic()
            async with self._lock:  # graceful stop: flush, checkpoint and commit what was processed
                await self._checkpoint(list(self.procs))
        finally:
            with contextlib.suppress(Exception):
                await self.consumer.stop()
            if self.producer is not None:
                with contextlib.suppress(Exception):
                    await self.producer.stop()

    async def _process(self, data: dict[TopicPartition, list[Any]]) -> None:
        now_ms = int(time.time() * 1000)
        out = self.out
        n = 0
        started = time.perf_counter()
        for tp, messages in data.items():
            proc = self.procs.get(tp.partition)
            if proc is None:  # assignment raced with a fetch: restore before folding anything
                async with self._lock:
                    proc = self.procs.get(tp.partition) or await self._restore(tp.partition)
            skip_to = proc.offset
            for msg in messages:
                if msg.offset <= skip_to:
                    continue  # already folded into the restored state
                try:
                    proc.process(msg.value or b"", msg.offset, now_ms, out)
                except Exception as exc:  # a bug must not lose the message: dead-letter it
                    log.exception("processing failed at %s:%s", tp.partition, msg.offset)
                    out.dead_letter(Rejected(reasons.PROCESSING_ERROR, f"{type(exc).__name__}: {exc}"),
                                    msg.value or b"", self.source_topic, tp.partition, msg.offset, now_ms)
                proc.offset = msg.offset
                n += 1
            if messages:
                last = messages[-1]
                # broker time -> processed: how far behind the stream this stage runs (one sample per
                # partition and batch, not per event: the histogram must stay off the hot path)
                if last.timestamp and last.timestamp > 0:
                    self.metrics.event_age.labels(self.name).observe(max(0.0, now_ms - last.timestamp) / 1000)
                assert self.consumer is not None
                hw = self.consumer.highwater(tp)
                if hw is not None:
                    self.metrics.lag.labels(self.name, str(tp.partition)).set(max(0, hw - last.offset - 1))
        self.metrics.events_in.labels(self.name).inc(n)
        self.metrics.batch_seconds.labels(self.name).observe(time.perf_counter() - started)

    async def _send_outputs(self) -> None:
        assert self.batch_producer is not None
        for reason, count in self.out.rejected_by_reason.items():
            self.metrics.rejected.labels(self.name, reason).inc(count)
        self.metrics.events_out.labels(self.name).inc(len(self.out.records))
        await self.batch_producer.send(self.out.records)
        self.out.clear()

    async def _checkpoint(self, partitions: list[int]) -> None:
        """Emit changed windows, wait for every output, persist state, then commit offsets."""
        assert self.batch_producer is not None and self.consumer is not None
        started = time.perf_counter()
        for p in partitions:
            self.procs[p].flush(self.out)
        if self.out.records:
            await self._send_outputs()
        await self.batch_producer.wait_delivered()
        commits: dict[TopicPartition, int] = {}
        for p in partitions:
            proc = self.procs[p]
            if proc.offset < 0 or self.committed.get(p) == proc.offset + 1:
                continue
            full, self.checkpoints[p] = checkpoint_kind(self.checkpoints.get(p, 0), self.full_snapshot_every, p)
            await self._write_state(p, proc.snapshot(full))
            commits[TopicPartition(self.source_topic, p)] = proc.offset + 1
        await self.batch_producer.wait_delivered()
        for tp in commits:  # the state is in the state topic: a restart resumes from here
            written = getattr(self.procs[tp.partition], "checkpoint_written", None)
            if written is not None:
                written()
        if commits:
            try:
                await self.consumer.commit(commits)
            except KafkaError as exc:
                # harmless: the state topic holds the offset, a replay skips what it already reflects
                log.warning("%s: offset commit failed (%s); the state checkpoint stands", self.name, exc)
            else:
                for tp, off in commits.items():
                    self.committed[tp.partition] = off
        self.metrics.checkpoint_seconds.labels(self.name).observe(time.perf_counter() - started)

    async def _write_state(self, partition: int, payload: dict[str, Any]) -> None:
        """One checkpoint is one JSON document cut into chunks; the key says chunk i of n, and a
        restore only applies a checkpoint whose n chunks all arrived (a crash mid-write leaves none)."""
        assert self.batch_producer is not None
        body = orjson.dumps(payload)
        pieces = [body[i:i + CHUNK_BYTES] for i in range(0, len(body), CHUNK_BYTES)] or [b"{}"]
        n = len(pieces)
        records = [("", orjson.dumps({"i": i, "n": n}), piece) for i, piece in enumerate(pieces)]
        await self.batch_producer.send(records, partition=partition, topic=self.state_topic)

    async def _restore(self, partition: int) -> PartitionProcessor:
        await self._restore_many([partition])
        return self.procs[partition]

    async def _restore_many(self, partitions: list[int]) -> None:
        """Rebuild partitions' state from the state topic (the deltas after the last full snapshot)."""
        started = time.perf_counter()
        procs = {p: self.factory(p) for p in partitions}
        for proc in procs.values():
            if hasattr(proc, "source_partitions"):  # the kecamatan partials say how many sources there are
                proc.source_partitions = self.source_partitions
        tps = [TopicPartition(self.state_topic, p) for p in partitions]
        reader = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                  auto_offset_reset="earliest", group_id=None)
        await reader.start()
        applied = dict.fromkeys(partitions, 0)
        try:
            reader.assign(tps)
            ends = await reader.end_offsets(tps)
            await reader.seek_to_beginning(*tps)
            pending: dict[int, list[bytes]] = {p: [] for p in partitions}
            seen_full = dict.fromkeys(partitions, False)
            remaining = {tp for tp in tps if ends[tp] > 0}

            def apply(batch: dict[TopicPartition, list[Any]]) -> None:
                for tp, messages in batch.items():
                    p = tp.partition
                    for msg in messages:
                        head = orjson.loads(msg.key or b"{}")
                        i, n = int(head.get("i", 0)), int(head.get("n", 1))
                        if i == 0:
                            pending[p] = []
                        pending[p].append(msg.value or b"")
                        if i == n - 1 and len(pending[p]) == n:
                            payload = orjson.loads(b"".join(pending[p]))
                            seen_full[p] = seen_full[p] or bool(payload.get("full"))
                            if seen_full[p]:  # deltas before the first full snapshot are subsumed by it
                                procs[p].restore(payload)
                                applied[p] += 1
                            pending[p] = []

            while remaining:
                apply(await reader.getmany(*remaining, timeout_ms=500, max_records=5000))
                for tp in list(remaining):
                    if await reader.position(tp) >= ends[tp]:
                        remaining.discard(tp)
            # Tansu reports the end offset as the start of the last record batch + 1, so records of
            # that batch may lie past it: drain until a fetch comes back empty.
            if any(ends[tp] > 0 for tp in tps):
                while True:
                    tail = await reader.getmany(*tps, timeout_ms=300, max_records=5000)
                    if not any(tail.values()):
                        break
                    apply(tail)
        finally:
            await reader.stop()
        for p, proc in procs.items():
            proc.drop_closed()
            self.procs[p] = proc
            self.checkpoints[p] = 0  # the next checkpoint is a full snapshot
            log.info("%s: partition %s restored from %s checkpoints up to offset %s",
                     self.name, p, applied[p], proc.offset)
        self.metrics.restore_seconds.labels(self.name).observe(time.perf_counter() - started)

    # -- rebalance listener ---------------------------------------------------------------------
    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        mine = [tp.partition for tp in revoked if tp.partition in self.procs]
        if not mine:
            return
        async with self._lock:
            try:
                await self._checkpoint(mine)
            except Exception:  # the group moved on; the next owner restores the last good checkpoint
                log.exception("%s: checkpoint on revoke failed", self.name)
            for p in mine:
                self.procs.pop(p, None)
                self.committed.pop(p, None)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        async with self._lock:
            missing = [tp.partition for tp in assigned if tp.partition not in self.procs]
            if missing:
                await self._restore_many(missing)
        self.metrics.partitions.labels(self.name).set(len(self.procs))
        self.ready.set()
