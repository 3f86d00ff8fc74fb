"""The sink against a real Tansu broker and a real PostgreSQL, run as `arus sink` in a subprocess.

What must hold: the exact rows land; a replay changes nothing; the newest aggregate state replaces
older ones; poison messages become dead letters while the rest lands; SIGKILL mid-stream and a
restart leave exactly the input in the table (no gap, no duplicate); SIGTERM flushes and commits.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from kafka import KafkaProducer

from infra import embedded
from tests.helpers import pg_fetch, pg_scalar, wait_until

T0 = 1767225600000  # 2026-01-01T00:00:00Z, epoch ms
PARTITIONS = 4
LAND_TIMEOUT = 90.0  # generous: 2 shared cores, sink start includes a group join


def ms(t: int) -> datetime:
    return datetime.fromtimestamp(t / 1000, UTC)


def reading(i: int, device: str, values: dict[str, float], t: int | None = None) -> dict[str, Any]:
    return {"id": f"ev-{i}", "device_id": device, "kind": "water_level", "region": "35.09.01.2001",
            "time": T0 + i * 1000 if t is None else t, "values": values, "received": T0}


def aggregate(key: str, count: int, window_start: int = T0, last: float = 1.0) -> dict[str, Any]:
    return {"scope": "device", "key": key, "region": "35.09.01.2001", "metric": "waterLevel",
            "window_start": window_start, "window_end": window_start + 60_000, "count": count,
            "min": 0.5, "max": float(count), "sum": count * 1.5, "mean": 1.5, "last": last,
            "last_time": window_start + count, "final": False}


def dead_letter(i: int) -> dict[str, Any]:
    return {"id": f"dl-{i}", "reason": "malformed_json", "message": "expected a value", "source": "mqtt",
            "device_id": "wl-001", "topic": "jember/v1/wl-001/telemetry", "partition": None, "offset": None,
            "raw": "{oops", "raw_encoding": "utf-8", "time": T0 + i}


Message = tuple[str, bytes | None, bytes, int | None]  # topic, key, value, partition (None: by key)


class Producer:
    def __init__(self, bootstrap: str) -> None:
        self.p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, retries=10,
                               batch_size=256 * 1024, max_in_flight_requests_per_connection=1)

    def send(self, messages: list[Message]) -> None:
        futures = [self.p.send(t, key=k, value=v, partition=p) for t, k, v, p in messages]
        self.p.flush()
        for f in futures:
            f.get(timeout=30)  # raise if any send failed

    def close(self) -> None:
        self.p.close()


@pytest.fixture
def producer(kafka_bootstrap: str) -> Iterator[Producer]:
    p = Producer(kafka_bootstrap)
    yield p
    p.close()


def j(obj: Any) -> bytes:
    return orjson.dumps(obj)


def snapshot(db: str) -> dict[str, list[tuple[Any, ...]]]:
    return {
        "readings": pg_fetch(db, "SELECT time, device_id, region_code, metric, value, event_id, ingested_at"
                                 " FROM readings WHERE device_id NOT LIKE 'sentinel%' ORDER BY 1, 2, 4"),
        # updated_at is left out: a replay split across two flushes may briefly write an older state
        "aggregates": pg_fetch(db, "SELECT scope, key, metric, bucket, region_code, bucket_end, count, min, max,"
                                   " sum, mean, last, last_time, final FROM aggregates"
                                   " WHERE key NOT LIKE 'sentinel%' ORDER BY 1, 2, 3, 4"),
        "dead_letters": pg_fetch(db, "SELECT * FROM dead_letters WHERE id NOT LIKE 'sentinel%' ORDER BY id"),
        "devices": pg_fetch(db, "SELECT device_id, last_seen FROM devices ORDER BY 1"),
    }


def sentinels(prefix: str, tag: str) -> list[Message]:
    """One marker per partition of each topic: once all are stored, everything sent before them is."""
    out: list[Message] = []
    for p in range(PARTITIONS):
        dev = f"sentinel-{tag}-{p}"
        out.append((prefix + "telemetry", None, j(reading(0, dev, {"m": 1.0})), p))
        out.append((prefix + "aggregates", None, j(aggregate(dev, 1)), p))
        out.append((prefix + "dlq", None, j({**dead_letter(0), "id": f"sentinel-{tag}-{p}"}), p))
    return out


def wait_sentinels(db: str, tag: str) -> None:
    pattern = f"sentinel-{tag}-%"
    wait_until(
        lambda: pg_scalar(db, "SELECT (SELECT count(*) FROM readings WHERE device_id LIKE %(p)s)"
                              " + (SELECT count(*) FROM aggregates WHERE key LIKE %(p)s)"
                              " + (SELECT count(*) FROM dead_letters WHERE id LIKE %(p)s)", {"p": pattern})
        == 3 * PARTITIONS,
        LAND_TIMEOUT, message=f"sentinels {tag} stored",
    )


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:  # noqa: S310
        return r.read().decode()


def metric(text: str, name: str, labels: str) -> float:
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


SinkEnv = Callable[..., dict[str, str]]


@pytest.fixture
def sink_env(arus_env: SinkEnv, fresh_database_url: str) -> Callable[..., dict[str, str]]:
    group = "g" + uuid.uuid4().hex[:10]  # a consumer group of this test alone (default: shared `arus-sink`)

    def make(**extra: str) -> dict[str, str]:
        return arus_env(fresh_database_url, partitions=PARTITIONS, ARUS_CONSUMER_GROUP_PREFIX=group, **extra)

    return make


def test_rows_land_replay_changes_nothing_poison_is_dead_lettered(
    sink_env: SinkEnv, fresh_database_url: str, topic_prefix: str, producer: Producer, spawn_arus: Any
) -> None:
    db = fresh_database_url
    tel, agg, dlq = topic_prefix + "telemetry", topic_prefix + "aggregates", topic_prefix + "dlq"
    devices = [f"wl-{n:03d}" for n in range(20)]
    for d in devices[:10]:  # half of them registered: their last_seen must move
        pg_fetch(db, "INSERT INTO devices (device_id, kind, region_code) VALUES (%s, 'water_level', '35.09.01')",
                 (d,))
    metrics_port = embedded.free_port()
    # every flush over three connections: the replay below meets rows committed by all of them
    env = sink_env(ARUS_SINK_METRICS_PORT=str(metrics_port), ARUS_SINK_COPY_CONNECTIONS="3",
                   ARUS_SINK_COPY_PARALLEL_MIN_ROWS="100")

    n_readings = 2000
    first: list[Message] = []
    for i in range(n_readings):
        d = devices[i % len(devices)]
        first.append((tel, d.encode(), j(reading(i, d, {"waterLevel": i / 100, "batteryLevel": 3.5})), None))
    # three states of one window in a row (one flush must keep only the last), another key's window
    for c in (1, 2, 3):
        first.append((agg, b"device|wl-000|waterLevel|w0", j(aggregate("wl-000", c)), None))
    first.append((agg, b"device|wl-001|waterLevel|w0", j(aggregate("wl-001", 7)), None))
    first += [(dlq, f"dl-{i}".encode(), j(dead_letter(i)), None) for i in range(2)]
    poison: list[Message] = [
        (tel, b"wl-000", b"{not json", None),
        (tel, b"wl-000", j({k: v for k, v in reading(99_999, "wl-000", {"x": 1.0}).items() if k != "values"}), None),
        (agg, b"device|x|y|z", j({**aggregate("wl-002", 1), "scope": "province"}), None),
        (dlq, b"x", b"[]", None),
    ]
    first += poison
    producer.send(first)

    sink = spawn_arus("sink", env=env)
    expected_dead = 2 + len(poison)
    wait_until(
        lambda: pg_scalar(db, "SELECT count(*) FROM readings") == 2 * n_readings
        and pg_scalar(db, "SELECT count(*) FROM dead_letters") == expected_dead
        and pg_scalar(db, "SELECT count(*) FROM aggregates") == 2,
        LAND_TIMEOUT, message="first batch stored",
    )
    assert sink.alive()

    # exactly the input
    rows = pg_fetch(db, "SELECT event_id, device_id, metric, value, time FROM readings ORDER BY time, metric")
    want = sorted(
        (f"ev-{i}", devices[i % len(devices)], m, v, ms(T0 + i * 1000))
        for i in range(n_readings) for m, v in (("batteryLevel", 3.5), ("waterLevel", i / 100))
    )
    assert sorted(rows) == want
    assert all(r[0].tzinfo is not None for r in pg_fetch(db, "SELECT time FROM readings LIMIT 5"))

    # last state of the window won
    assert pg_fetch(db, "SELECT key, count FROM aggregates ORDER BY key") == [("wl-000", 3), ("wl-001", 7)]

    # poison messages are dead letters with a clear reason; the real dead letters are stored as sent
    dead = pg_fetch(db, "SELECT id, reason, message, topic FROM dead_letters ORDER BY id")
    assert [d[0] for d in dead if d[0].startswith("dl-")] == ["dl-0", "dl-1"]
    sink_dead = [d for d in dead if d[0].startswith("sink:")]
    assert len(sink_dead) == len(poison)
    assert all(d[1] == "processing_error" for d in sink_dead)
    assert {d[3] for d in sink_dead} == {tel, agg, dlq}
    assert any("not valid UTF-8 JSON" in d[2] for d in sink_dead)
    assert any("missing field 'values'" in d[2] for d in sink_dead)
    assert any("'scope' must be one of" in d[2] for d in sink_dead)

    # last_seen of registered devices is their newest reading
    last_seen = dict(pg_fetch(db, "SELECT device_id, last_seen FROM devices"))
    for n, d in enumerate(devices[:10]):
        newest = max(i for i in range(n_readings) if i % len(devices) == n)
        assert last_seen[d] == ms(T0 + newest * 1000)

    # a later state of the window (late data) replaces the stored one
    late = [(agg, b"device|wl-000|waterLevel|w0", j(aggregate("wl-000", 4, last=9.0)), None)]
    producer.send(late)
    wait_until(lambda: pg_scalar(db, "SELECT count FROM aggregates WHERE key = 'wl-000'") == 4,
               LAND_TIMEOUT, message="late aggregate state stored")
    assert pg_fetch(db, "SELECT last, max FROM aggregates WHERE key = 'wl-000'") == [(9.0, 4.0)]

    # replay everything, in the original order: nothing changes
    before = snapshot(db)
    producer.send(first + late + sentinels(topic_prefix, "a"))
    wait_sentinels(db, "a")
    assert snapshot(db) == before

    text = scrape(metrics_port)
    assert metric(text, "arus_sink_rows_written_total", 'table="readings"') >= 2 * n_readings
    assert metric(text, "arus_sink_poison_messages_total", f'topic="{tel}"') >= 2
    assert "arus_sink_flush_seconds_bucket" in text
    assert sink.alive()


def test_sigkill_mid_stream_then_restart_stores_exactly_the_input(
    sink_env: SinkEnv, fresh_database_url: str, topic_prefix: str, kafka_bootstrap: str, spawn_arus: Any
) -> None:
    db = fresh_database_url
    tel = topic_prefix + "telemetry"
    env = sink_env()
    total = 60_000
    rate = 12_000  # messages/s: the stream lasts ~5 s, so the kills land mid-stream
    devices = [f"dev-{n:04d}" for n in range(300)]
    sent = threading.Event()
    errors: list[BaseException] = []

    def produce() -> None:  # the load generator: a separate client, paced, never waiting on the sink
        try:
            p = Producer(kafka_bootstrap)
            start = time.monotonic()
            chunk = 1000
            for base in range(0, total, chunk):
                p.send([(tel, devices[i % len(devices)].encode(),
                         j(reading(i, devices[i % len(devices)], {"waterLevel": i * 0.5})), None)
                        for i in range(base, base + chunk)])
                ahead = (base + chunk) / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)  # pacing the generator, not synchronising the test
            p.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            sent.set()

    def count() -> int:
        return int(pg_scalar(db, "SELECT count(*) FROM readings"))

    producer_thread = threading.Thread(target=produce, daemon=True)
    producer_thread.start()
    sink = spawn_arus("sink", env=env, name="sink-1")
    first_kill = wait_until(lambda: (c := count()) > 0 and c, LAND_TIMEOUT, message="some rows stored")
    sink.kill()
    assert not sink.alive()
    after_kill = count()
    sink = spawn_arus("sink", env=env, name="sink-2")
    wait_until(lambda: count() > after_kill, LAND_TIMEOUT, message="restarted sink stores rows")
    killed_mid_stream = [first_kill < total]
    sink.kill()
    killed_mid_stream.append(count() < total or not sent.is_set())
    sink = spawn_arus("sink", env=env, name="sink-3")
    assert sent.wait(LAND_TIMEOUT) and not errors, errors
    wait_until(lambda: count() == total, LAND_TIMEOUT, message="all rows stored after the restarts")
    assert any(killed_mid_stream), "the kills happened after the stream had fully landed"

    # exactly the input: same ids, values and times, nothing else, nothing twice
    stats = pg_fetch(db, "SELECT count(*), count(DISTINCT event_id), sum(value), min(time), max(time)"
                         " FROM readings")[0]
    assert stats == (total, total, sum(i * 0.5 for i in range(total)), ms(T0), ms(T0 + (total - 1) * 1000))
    bad = pg_scalar(db, "SELECT count(*) FROM readings WHERE event_id <> 'ev-' ||"
                        " ((extract(epoch FROM time) * 1000)::bigint - %s) / 1000", (T0,))
    assert bad == 0
    assert pg_scalar(db, "SELECT count(*) FROM dead_letters") == 0
    assert sink.alive()


def test_sigterm_flushes_and_commits_so_a_restart_reads_nothing_again(
    sink_env: SinkEnv, fresh_database_url: str, topic_prefix: str, producer: Producer, spawn_arus: Any
) -> None:
    db = fresh_database_url
    tel = topic_prefix + "telemetry"
    producer.send([(tel, b"d1", j(reading(i, "d1", {"waterLevel": 1.0})), None) for i in range(500)])
    sink = spawn_arus("sink", env=sink_env())
    wait_until(lambda: pg_scalar(db, "SELECT count(*) FROM readings") == 500, LAND_TIMEOUT,
               message="rows stored")
    assert sink.stop(timeout=30) == 0, sink.log_tail()

    port = embedded.free_port()
    sink = spawn_arus("sink", env=sink_env(ARUS_SINK_METRICS_PORT=str(port)))
    producer.send(sentinels(topic_prefix, "b"))
    wait_sentinels(db, "b")
    # the restarted sink read only the sentinels: the first run committed what it had stored
    consumed = metric(wait_until(lambda: scrape(port), 30), "arus_sink_messages_total", f'topic="{tel}"')
    assert consumed == PARTITIONS
    assert pg_scalar(db, "SELECT count(*) FROM readings") == 500 + PARTITIONS


def test_database_errors_are_retried_and_nothing_is_lost(
    sink_env: SinkEnv, fresh_database_url: str, topic_prefix: str, producer: Producer, spawn_arus: Any
) -> None:
    db = fresh_database_url
    tel = topic_prefix + "telemetry"
    sink = spawn_arus("sink", env=sink_env())
    producer.send([(tel, b"d1", j(reading(i, "d1", {"waterLevel": 1.0})), None) for i in range(100)])
    wait_until(lambda: pg_scalar(db, "SELECT count(*) FROM readings") == 100, LAND_TIMEOUT, message="stored")

    # the table disappears (an operator mistake, a failover): every write fails until it is back
    pg_fetch(db, "ALTER TABLE readings RENAME TO readings_away")
    producer.send([(tel, b"d1", j(reading(i, "d1", {"waterLevel": 2.0})), None) for i in range(100, 300)])
    wait_until(lambda: "retrying" in sink.log(), LAND_TIMEOUT, message="the sink reports failing writes")
    pg_fetch(db, "ALTER TABLE readings_away RENAME TO readings")
    wait_until(lambda: pg_scalar(db, "SELECT count(*) FROM readings") == 300, LAND_TIMEOUT,
               message="the held-back rows are stored once the table is back")
    assert pg_scalar(db, "SELECT sum(value) FROM readings") == 100 * 1.0 + 200 * 2.0
    assert pg_scalar(db, "SELECT count(*) FROM dead_letters") == 0  # an outage is not a poison message
    assert sink.alive()


def test_rows_the_database_refuses_are_isolated_into_dead_letters(
    sink_env: SinkEnv, fresh_database_url: str, topic_prefix: str, producer: Producer, spawn_arus: Any
) -> None:
    db = fresh_database_url
    tel = topic_prefix + "telemetry"
    # a rule the sink does not know about: PostgreSQL refuses the whole batch that contains the row
    pg_fetch(db, "ALTER TABLE readings ADD CONSTRAINT test_non_negative CHECK (value >= 0)")
    msgs: list[Message] = [
        (tel, b"d1", j(reading(i, "d1", {"waterLevel": -1.0 if i == 137 else float(i)})), None)
        for i in range(400)
    ]
    producer.send(msgs)
    sink = spawn_arus("sink", env=sink_env())
    wait_until(lambda: pg_scalar(db, "SELECT count(*) FROM readings") == 399
               and pg_scalar(db, "SELECT count(*) FROM dead_letters") == 1, LAND_TIMEOUT,
               message="the good rows stored, the refused one dead-lettered")
    assert pg_scalar(db, "SELECT count(*) FROM readings WHERE event_id = 'ev-137'") == 0
    reason, message, raw = pg_fetch(db, "SELECT reason, message, raw FROM dead_letters")[0]
    assert reason == "processing_error"
    assert "refused by PostgreSQL" in message and "test_non_negative" in message
    assert orjson.loads(raw)["id"] == "ev-137"
    assert sink.alive()


def test_rebalances_between_two_sinks_keep_rows_exact_and_last_states_last(
    sink_env: SinkEnv, fresh_database_url: str, topic_prefix: str, kafka_bootstrap: str, spawn_arus: Any
) -> None:
    db = fresh_database_url
    tel, agg = topic_prefix + "telemetry", topic_prefix + "aggregates"
    env = sink_env()
    total, rate, keys = 30_000, 6_000, 40
    sent = threading.Event()
    errors: list[BaseException] = []

    def produce() -> None:  # paced load generator: each aggregate key gets ever larger states
        try:
            p = Producer(kafka_bootstrap)
            start = time.monotonic()
            chunk = 500
            for base in range(0, total, chunk):
                batch: list[Message] = []
                for i in range(base, base + chunk):
                    dev = f"dev-{i % 100:03d}"
                    batch.append((tel, dev.encode(), j(reading(i, dev, {"waterLevel": float(i)})), None))
                    key = f"agg-{i % keys:02d}"
                    batch.append((agg, key.encode(), j(aggregate(key, i // keys + 1)), None))
                p.send(batch)
                ahead = (base + chunk) / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)  # pacing the generator, not synchronising the test
            p.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            sent.set()

    def count() -> int:
        return int(pg_scalar(db, "SELECT count(*) FROM readings"))

    threading.Thread(target=produce, daemon=True).start()
    a = spawn_arus("sink", env=env, name="sink-a")
    wait_until(lambda: count() > 0, LAND_TIMEOUT, message="sink a stores rows")
    b = spawn_arus("sink", env=env, name="sink-b")  # joins: a's partitions are revoked and split
    wait_until(lambda: a.log().count("assigned ") >= 2 and "assigned " in b.log(), LAND_TIMEOUT,
               message="a rebalance split the partitions between the two sinks")
    at_split = count()
    assert at_split < total or not sent.is_set(), "the stream ended before the rebalance"
    wait_until(lambda: count() > at_split, LAND_TIMEOUT, message="rows keep landing after the split")
    assert a.stop(timeout=30) == 0, a.log_tail()  # leaves: b takes everything over
    assert sent.wait(LAND_TIMEOUT) and not errors, errors
    wait_until(lambda: count() == total, LAND_TIMEOUT, message="all rows stored")
    stats = pg_fetch(db, "SELECT count(*), count(DISTINCT event_id), sum(value) FROM readings")[0]
    assert stats == (total, total, float(sum(range(total))))
    wait_until(
        lambda: pg_fetch(db, "SELECT key, count FROM aggregates ORDER BY key")
        == [(f"agg-{k:02d}", total // keys) for k in range(keys)],
        LAND_TIMEOUT, message="each window holds its last state",
    )
    assert b.alive()
