"""SIGKILL a worker mid-stream: readings and every 1-minute aggregate (device and kecamatan) end equal
to SQL over the input, nothing lost, nothing counted twice. Once with one worker restarted, once with
two workers sharing the partitions (scale-out) where the survivor takes over the dead one's state."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import orjson
import psycopg
from aiokafka import AIOKafkaProducer

from schemas.envelope import TELEMETRY_TYPE
from schemas.regions import kecamatan_codes
from tests.helpers import pg_fetch, pg_scalar, wait_until

DEVICES = 40
EVENTS = 20_000


def make_input(now_ms: int) -> tuple[list[tuple[str, bytes]], int]:
    rng = random.Random(7)
    start = now_ms - 20 * 60_000
    out, readings = [], set()
    for i in range(EVENTS):
        dev = f"crash-{i % DEVICES:02d}"
        t = start + i * 50 - rng.choice([0, 0, 0, 20_000])  # some readings arrive late
        env = {"specversion": "1.0", "id": f"{dev}/{t}", "source": f"/jember/v1/{dev}", "type": TELEMETRY_TYPE,
               "time": t, "subject": dev, "data": {"values": {"waterLevel": round(rng.uniform(0.5, 3.0), 3)}}}
        readings.add((dev, t))
        out.append((dev, orjson.dumps(env)))
        if rng.random() < 0.05:  # repeats, as MQTT QoS 1 produces
            out.append((dev, orjson.dumps(env)))
    return out, len(readings)


async def produce(bootstrap: str, topic: str, records: list[tuple[str, bytes]], per_second: int = 0) -> None:
    """Produce the records; with `per_second`, paced (a stream over time, not one burst)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        started = time.monotonic()
        for i, (key, value) in enumerate(records):
            await producer.send(topic, value, key=key.encode())
            if per_second and i % 200 == 199:
                await producer.flush()
                await asyncio.sleep(max(0.0, started + (i + 1) / per_second - time.monotonic()))  # pacing
        await producer.flush()
    finally:
        await producer.stop()


def _setup(arus_env, fresh_database_url, produce_now: bool = True) -> tuple[dict[str, str], str, int, list]:
    env = arus_env(database_url=fresh_database_url, ARUS_WORKER_SESSION_TIMEOUT_MS="2000",
                   ARUS_CHECKPOINT_INTERVAL_MS="200", ARUS_BATCH_MAX="500")
    dsn = env["ARUS_DATABASE_URL"]
    kecs = kecamatan_codes()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(DEVICES):
            conn.execute("INSERT INTO devices (device_id, kind, region_code) VALUES (%s, 'water_level', %s)",
                         (f"crash-{i:02d}", kecs[i % 5]))
    records, distinct = make_input(int(time.time() * 1000))
    if produce_now:
        asyncio.run(produce(env["ARUS_KAFKA_BOOTSTRAP"], env["ARUS_TOPIC_PREFIX"] + "ingest", records))
    return env, dsn, distinct, records


COUNT = "SELECT count(*) FROM readings WHERE device_id LIKE 'crash-%%'"


def _assert_exactly_once(dsn: str, distinct: int) -> None:
    wait_until(lambda: pg_scalar(dsn, COUNT) == distinct, 180, message="every reading lands")
    truth_devices = sorted(pg_fetch(dsn, """
        SELECT device_id, date_bin('1 minute', time, 'epoch'), count(*), min(value), max(value), round(sum(value)::numeric, 6)
        FROM readings WHERE device_id LIKE 'crash-%%' GROUP BY 1, 2"""))
    truth_kec = sorted(pg_fetch(dsn, """
        SELECT substr(region_code, 1, 8), date_bin('1 minute', time, 'epoch'), count(*), min(value), max(value), round(sum(value)::numeric, 6)
        FROM readings WHERE device_id LIKE 'crash-%%' GROUP BY 1, 2"""))

    def aggregates(scope: str) -> list[tuple]:
        return sorted(pg_fetch(dsn, """
            SELECT key, bucket, count, min, max, round(sum::numeric, 6) FROM aggregates
            WHERE scope = %s AND metric = 'waterLevel' AND (key LIKE 'crash-%%' OR %s = 'kecamatan')""",
            [scope, scope]))

    wait_until(lambda: aggregates("device") == truth_devices, 120, message="device aggregates equal SQL truth")
    wait_until(lambda: aggregates("kecamatan") == truth_kec, 120, message="kecamatan aggregates equal SQL truth")
    duplicates = pg_scalar(dsn, "SELECT count(*) FROM dead_letters WHERE reason = 'duplicate'")
    assert duplicates >= 1  # the repeats were recognised, not counted


def test_worker_sigkill_loses_nothing_and_doubles_nothing(arus_env, spawn_arus, fresh_database_url):
    env, dsn, distinct, _ = _setup(arus_env, fresh_database_url)
    spawn_arus("sink", env=env)
    worker = spawn_arus("worker", env=env, name="worker-1")
    wait_until(lambda: pg_scalar(dsn, COUNT) >= distinct // 4, 120, message="a quarter processed")
    worker.kill()
    assert pg_scalar(dsn, COUNT) < distinct, "the kill must land mid-stream"
    spawn_arus("worker", env=env, name="worker-2")
    _assert_exactly_once(dsn, distinct)


def test_rebalance_from_one_worker_to_two_then_a_kill(arus_env, spawn_arus, fresh_database_url):
    """One worker runs; a second joins mid-stream (a rebalance hands it partitions with their state);
    then the first is SIGKILLed (the second restores the rest). Exactly the input, aggregates exact."""
    env, dsn, distinct, records = _setup(arus_env, fresh_database_url, produce_now=False)
    first = spawn_arus("worker", env=env, name="worker-1")

    def owns_partitions(w) -> bool:  # restore logs "telemetry: partition N restored ..."
        return "telemetry: partition" in w.log()

    wait_until(lambda: owns_partitions(first), 120, message="the first worker owns the partitions")
    spawn_arus("sink", env=env)
    # the input arrives as a stream (~1,500 events/s, ~14 s) while the workers change
    producer = threading.Thread(target=lambda: asyncio.run(produce(
        env["ARUS_KAFKA_BOOTSTRAP"], env["ARUS_TOPIC_PREFIX"] + "ingest", records, per_second=1500)))
    producer.start()
    try:
        wait_until(lambda: pg_scalar(dsn, COUNT) >= 500, 120, message="the stream is flowing")
        second = spawn_arus("worker", env=env, name="worker-2")
        wait_until(lambda: owns_partitions(second), 120, message="the rebalance gave the second worker partitions")
        wait_until(lambda: pg_scalar(dsn, COUNT) >= 1000 + distinct // 10, 120, message="both work")
        first.kill()
        assert pg_scalar(dsn, COUNT) < distinct, "the kill must land mid-stream"
    finally:
        producer.join()
    _assert_exactly_once(dsn, distinct)
    assert second.alive()
