"""The adaptive fetch wait against a real Tansu whose partition is large enough to starve short waits.

Tansu answers a fetch with nothing when it cannot collect the records within the fetch wait, and a
partition of many small batches is slow to scan: a consumer with a fixed 1 ms wait reads nothing
there. ConsumerFetchWait (infra/fetch_wait.py) starts at the same floor and must read everything.
Its own Tansu: a partition this large would slow the shared broker's other tests.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from infra import embedded
from infra.fetch_wait import ConsumerFetchWait
from infra.kafka_admin import ensure_topics

BATCHES, PER_BATCH = 20_000, 5
START = BATCHES * PER_BATCH // 2


async def _produce(bootstrap: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0, acks="all")
    await producer.start()
    try:
        pending = []
        for b in range(BATCHES):  # many small batches, as a gateway at a modest rate writes them
            batch = producer.create_batch()
            for i in range(PER_BATCH):
                batch.append(key=None, value=b"%d" % (b * PER_BATCH + i), timestamp=None)
            batch.close()
            pending.append(await producer.send_batch(batch, "big", partition=0))
            if len(pending) >= 200:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def _read(bootstrap: str, adaptive: bool, deadline_s: float) -> tuple[list[int], int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=1)
    await consumer.start()
    tp = TopicPartition("big", 0)
    consumer.assign([tp])
    consumer.seek(tp, START)
    wait = ConsumerFetchWait(consumer, "test", 1, 1000) if adaptive else None
    values: list[int] = []
    try:
        end = time.monotonic() + deadline_s
        while len(values) < BATCHES * PER_BATCH - START and time.monotonic() < end:
            data = await consumer.getmany(timeout_ms=20, max_records=5000)
            for msgs in data.values():
                values.extend(int(m.value) for m in msgs)
            if wait is not None:
                await wait.after_poll(time.monotonic(), bool(data))
        return values, (wait.policy.wait_ms if wait is not None else 1)
    finally:
        await consumer.stop()


@pytest.mark.timeout(180)
def test_a_starved_consumer_raises_its_wait_and_reads_everything(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    tansu = embedded.start_tansu(embedded.free_port(), tmp_path)
    try:
        ensure_topics(tansu.url, ["big"], 1)
        asyncio.run(_produce(tansu.url))
        fixed, _ = asyncio.run(_read(tansu.url, adaptive=False, deadline_s=3))
        adaptive, final_wait = asyncio.run(_read(tansu.url, adaptive=True, deadline_s=60))
    finally:
        tansu.stop()
    expected = list(range(START, BATCHES * PER_BATCH))
    assert adaptive == expected, f"read {len(adaptive)} of {len(expected)}, in order and once"
    if len(fixed) < len(expected):  # the broker starved the fixed 1 ms wait, so adaptation had to act
        assert final_wait > 1
