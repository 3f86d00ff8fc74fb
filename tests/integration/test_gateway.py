"""The MQTT → Kafka gateway against real mosquitto and Tansu: `arus gateway` in its own process,
devices played by an outside paho client (or `arus simulate`), Kafka read back with aiokafka."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.request import urlopen

import orjson
import paho.mqtt.client as mqtt
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import murmur2
from paho.mqtt.enums import CallbackAPIVersion

from infra import embedded
from infra.kafka_admin import ensure_topics
from producers.simulator import plan_devices
from schemas import reasons
from schemas.envelope import STATUS_TYPE, TELEMETRY_TYPE, CloudEvent
from tests.helpers import wait_until, wait_until_async

PARTITIONS = 4
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --------------------------------------------------------------------------- helpers


class Device:
    """An outside MQTT client playing devices (QoS 1 publishes, waits for the broker's PUBACK)."""

    def __init__(self, url: str, client_id: str | None = None) -> None:
        target = embedded.parse_endpoint(url, "mqtt")
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:10]}",
                                  clean_session=True, protocol=mqtt.MQTTv311)
        self.client.max_inflight_messages_set(0)
        self.received: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client.on_message = self._on_message
        self.client.connect(target.host, target.port, keepalive=30)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.received.append((msg.topic, msg.payload))

    def messages(self, topic: str) -> list[bytes]:
        with self._lock:
            return [p for t, p in self.received if t == topic]

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(10), "no SUBACK"

    def publish(self, topic: str, payload: bytes | str, retain: bool = False, wait: bool = True) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if wait:
            info.wait_for_publish(timeout=10)
            assert info.is_published(), f"broker did not acknowledge a publish to {topic}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class TopicReader:
    """Everything on one topic from the beginning, read with partitions assigned (no group)."""

    bootstrap: str
    topic: str
    records: list[Any] = field(default_factory=list)
    consumer: AIOKafkaConsumer | None = None

    async def start(self) -> TopicReader:
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                         group_id=None, auto_offset_reset="earliest")
        await self.consumer.start()
        tps = [TopicPartition(self.topic, p) for p in range(PARTITIONS)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_beginning(*tps)
        return self

    async def poll(self) -> list[Any]:
        assert self.consumer is not None
        batches = await self.consumer.getmany(timeout_ms=100, max_records=50_000)
        for records in batches.values():
            self.records.extend(records)
        return self.records

    async def wait_for(
        self, predicate: Callable[[list[Any]], Any], timeout: float = 30, message: str = "", interval: float = 0.01
    ) -> Any:
        async def check() -> Any:
            return predicate(await self.poll())
        return await wait_until_async(check, timeout, interval=interval, message=message or f"records on {self.topic}")

    def values(self) -> list[dict[str, Any]]:
        return [orjson.loads(r.value) for r in self.records]

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()


@dataclass
class GatewayRun:
    env: dict[str, str]
    client_id: str
    ingest: str
    dlq: str
    metrics_port: int
    mqtt_url: str
    bootstrap: str
    spawn: Callable[[], Any]
    process: Any = None

    def start(self) -> Any:
        self.process = self.spawn()
        return self.process

    def metric(self, name: str) -> float:
        with urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:  # noqa: S310
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0


async def wait_ready(gw: GatewayRun, ingest: TopicReader, device: Device, timeout: float = 60) -> None:
    """The gateway is ready when a probe published now comes out on Kafka (connected AND subscribed)."""
    probe = f"probe-{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert gw.process.alive(), f"gateway exited:\n{gw.process.log_tail(40)}"
        device.publish(f"jember/v1/{probe}/status", "online")
        try:
            await ingest.wait_for(lambda rs: any(r.key == probe.encode() for r in rs), timeout=1.0)
            return
        except AssertionError:
            continue
    raise AssertionError(f"gateway not ready after {timeout}s:\n{gw.process.log_tail(40)}")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (and its reaped children) from /proc."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def clear_session(mqtt_url: str, client_id: str) -> None:
    """Drop a persistent session (a clean connect replaces it), so it queues nothing for later tests."""
    target = embedded.parse_endpoint(mqtt_url, "mqtt")
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True, protocol=mqtt.MQTTv311)
    c.connect(target.host, target.port)
    c.loop_start()
    c.disconnect()
    c.loop_stop()


@pytest.fixture
def gateway(
    kafka_bootstrap: str, mqtt_url: str, topic_prefix: str, spawn_arus: Any
) -> Iterator[GatewayRun]:
    client_id = f"gw-{uuid.uuid4().hex[:10]}"
    metrics_port = embedded.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARUS_")}
    env.update({
        "ARUS_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "ARUS_MQTT_URL": mqtt_url,
        "ARUS_TOPIC_PREFIX": topic_prefix,
        "ARUS_PARTITIONS": str(PARTITIONS),
        "ARUS_GATEWAY_CLIENT_ID": client_id,
        "ARUS_GATEWAY_METRICS_PORT": str(metrics_port),
        "PYTHONUNBUFFERED": "1",
    })
    ensure_topics(kafka_bootstrap, [f"{topic_prefix}ingest", f"{topic_prefix}dlq"], PARTITIONS)
    run = GatewayRun(env, client_id, f"{topic_prefix}ingest", f"{topic_prefix}dlq", metrics_port, mqtt_url,
                     kafka_bootstrap, lambda: spawn_arus("gateway", env=env))
    run.start()
    yield run
    if run.process is not None and run.process.alive():
        run.process.stop(timeout=10)
    clear_session(mqtt_url, client_id)


@pytest.fixture
async def readers(gateway: GatewayRun) -> AsyncIterator[tuple[TopicReader, TopicReader]]:
    ingest = await TopicReader(gateway.bootstrap, gateway.ingest).start()
    dlq = await TopicReader(gateway.bootstrap, gateway.dlq).start()
    yield ingest, dlq
    await ingest.stop()
    await dlq.stop()


@pytest.fixture
def device(mqtt_url: str) -> Iterator[Device]:
    d = Device(mqtt_url)
    yield d
    d.close()


def unique_device(kind: str = "wl") -> str:
    return f"{kind}-{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------------- tests


async def test_telemetry_becomes_cloudevents_on_ingest(
    gateway: GatewayRun, readers: tuple[TopicReader, TopicReader], device: Device
) -> None:
    ingest, _dlq = readers
    await wait_ready(gateway, ingest, device)
    dev = unique_device()
    topic = f"jember/v1/{dev}/telemetry"
    before = int(time.time() * 1000)
    device.publish(topic, orjson.dumps({"ts": "2024-05-01T13:00:00.250+07:00", "seq": 1,
                                        "values": {"waterLevel": 1.25, "flow": 12.5}}))
    device.publish(topic, orjson.dumps({"ts": 1714543260000, "seq": 2, "values": {"waterLevel": 1.3}}))
    device.publish(topic, orjson.dumps([{"ts": 1714543320000, "seq": s, "values": {"waterLevel": 1.4}}
                                        for s in (3, 4, 5)]))
    device.publish(topic, orjson.dumps({"id": "urn:ngsi-ld:FloodMonitoring:x", "type": "FloodMonitoring",
                                        "dateObserved": "2024-05-01T06:10:00Z", "currentLevel": 2.2}))
    mine = await ingest.wait_for(lambda rs: (m := [r for r in rs if r.key == dev.encode()]) and len(m) >= 6 and m,
                                 message="6 envelopes of the device")
    envs = {orjson.loads(r.value)["id"]: (r, orjson.loads(r.value)) for r in mine}
    assert set(envs) == {
        f"{dev}/1714543200250/1", f"{dev}/1714543260000/2", f"{dev}/1714543320000/3",
        f"{dev}/1714543320000/4", f"{dev}/1714543320000/5", f"{dev}/1714543800000",
    }
    first = envs[f"{dev}/1714543200250/1"][1]
    CloudEvent.model_validate(first)
    assert first["type"] == TELEMETRY_TYPE
    assert first["source"] == f"/jember/v1/{dev}"
    assert first["subject"] == dev
    assert first["time"] == "2024-05-01T06:00:00.250+00:00"
    assert first["data"] == {"ts": "2024-05-01T13:00:00.250+07:00", "seq": 1,
                             "values": {"waterLevel": 1.25, "flow": 12.5}}
    assert before <= first["arusreceived"] <= int(time.time() * 1000)
    assert envs[f"{dev}/1714543800000"][1]["data"]["values"] == {"waterLevel": 2.2}
    # keyed by device: all on the partition Kafka's default partitioner picks for that key
    expected_partition = (murmur2(dev.encode()) & 0x7FFFFFFF) % PARTITIONS
    assert {r.partition for r, _ in envs.values()} == {expected_partition}
    assert gateway.metric("arus_gateway_mqtt_connected") == 1.0
    assert gateway.metric("arus_gateway_inflight_unacked") == 0.0


async def test_status_online_offline(
    gateway: GatewayRun, readers: tuple[TopicReader, TopicReader], device: Device
) -> None:
    ingest, _ = readers
    await wait_ready(gateway, ingest, device)
    dev = unique_device()
    device.publish(f"jember/v1/{dev}/status", "online")
    device.publish(f"jember/v1/{dev}/status", "offline")
    device.publish(f"jember/v1/{dev}/status", "")  # clearing a retained status records nothing
    mine = await ingest.wait_for(lambda rs: (m := [orjson.loads(r.value) for r in rs if r.key == dev.encode()])
                                 and len(m) >= 2 and m)
    assert [e["data"]["status"] for e in mine] == ["online", "offline"]
    assert all(e["type"] == STATUS_TYPE and e["id"].startswith(f"{dev}/status/") for e in mine)


async def test_rejects_go_to_dlq_and_the_device_hears_why(
    gateway: GatewayRun, readers: tuple[TopicReader, TopicReader], device: Device
) -> None:
    ingest, dlq = readers
    await wait_ready(gateway, ingest, device)
    dev = unique_device()
    device.subscribe(f"jember/v1/{dev}/errors")
    telemetry = f"jember/v1/{dev}/telemetry"
    device.publish(telemetry, b'{"ts": 1714543200000, "values": {"waterLevel": NaN}}')
    device.publish(telemetry, b"\xff\xfe not text")
    device.publish(telemetry, orjson.dumps([{"ts": 1714543200000, "seq": 1, "values": {"waterLevel": 1.0}},
                                            {"ts": "noon", "seq": 2, "values": {"waterLevel": 1.1}}]))
    device.publish(telemetry, b"x" * (64 * 1024 + 1))
    # the gateway keeps running: a good reading after the bad ones still lands
    device.publish(telemetry, orjson.dumps({"ts": 1714543300000, "seq": 9, "values": {"waterLevel": 1.2}}))

    letters = await dlq.wait_for(lambda rs: (m := [orjson.loads(r.value) for r in rs
                                                   if orjson.loads(r.value)["device_id"] == dev]) and len(m) >= 4 and m,
                                 message="4 dead letters")
    by_reason = {letter["reason"]: letter for letter in letters}
    assert set(by_reason) == {reasons.MALFORMED_JSON, reasons.NOT_UTF8, reasons.INVALID_TIMESTAMP,
                              reasons.PAYLOAD_TOO_LARGE}
    for letter in letters:
        assert letter["source"] == "gateway" and letter["topic"] == telemetry
    assert "NaN" in by_reason[reasons.MALFORMED_JSON]["message"]
    assert by_reason[reasons.NOT_UTF8]["raw_encoding"] == "base64"
    assert base64.b64decode(by_reason[reasons.NOT_UTF8]["raw"]) == b"\xff\xfe not text"
    assert orjson.loads(by_reason[reasons.INVALID_TIMESTAMP]["raw"])["ts"] == "noon"
    assert len(by_reason[reasons.PAYLOAD_TOO_LARGE]["raw"]) == 64 * 1024
    keys = {r.key.decode() for r in dlq.records}
    assert {letter["id"] for letter in letters} <= keys  # keyed by dead letter id

    good = await ingest.wait_for(lambda rs: {orjson.loads(r.value)["id"] for r in rs if r.key == dev.encode()})
    assert good == {f"{dev}/1714543200000/1", f"{dev}/1714543300000/9"}

    replies = wait_until(lambda: (m := device.messages(f"jember/v1/{dev}/errors")) and len(m) >= 4 and m, 20,
                         message="4 error replies")
    decoded = [orjson.loads(p) for p in replies]
    assert {r["reason"] for r in decoded} == set(by_reason)
    assert {r["id"] for r in decoded} == {letter["id"] for letter in letters}
    assert next(r for r in decoded if r["reason"] == reasons.INVALID_TIMESTAMP)["index"] == 1
    assert gateway.process.alive()
    assert gateway.metric('arus_gateway_rejected_total{reason="not_utf8"}') >= 1


async def test_repeated_bad_payload_is_one_dead_letter_id(
    gateway: GatewayRun, readers: tuple[TopicReader, TopicReader], device: Device
) -> None:
    ingest, dlq = readers
    await wait_ready(gateway, ingest, device)
    dev = unique_device()
    for _ in range(3):
        device.publish(f"jember/v1/{dev}/telemetry", b'{"values": {}}')
    letters = await dlq.wait_for(lambda rs: (m := [orjson.loads(r.value) for r in rs
                                                   if orjson.loads(r.value)["device_id"] == dev]) and len(m) >= 3 and m)
    assert len({letter["id"] for letter in letters}) == 1
    assert letters[0]["reason"] == reasons.INVALID_PAYLOAD


async def test_nothing_lost_across_a_crash_and_a_graceful_stop(
    gateway: GatewayRun, readers: tuple[TopicReader, TopicReader], device: Device
) -> None:
    """Acks follow Kafka's confirmation: whatever the gateway had not delivered, the broker redelivers."""
    ingest, _ = readers
    await wait_ready(gateway, ingest, device)
    dev = unique_device()
    topic = f"jember/v1/{dev}/telemetry"
    n = 3000
    base = 1714543200000

    def publish(lo: int, hi: int) -> None:
        for seq in range(lo, hi):
            device.publish(topic, orjson.dumps({"ts": base + seq, "seq": seq, "values": {"waterLevel": 1.0}}),
                           wait=False)

    publish(0, 1000)
    gateway.process.kill()  # SIGKILL mid-stream: unacked messages stay with the broker's session
    publish(1000, 2000)  # queued by the broker for the gateway's persistent session
    gateway.start()
    publish(2000, 2500)
    await wait_ready(gateway, ingest, device)
    assert gateway.process.stop(timeout=20) == 0  # SIGTERM: flush, ack what was delivered, exit 0
    publish(2500, n)
    gateway.start()
    await wait_ready(gateway, ingest, device)

    expected = {f"{dev}/{base + s}/{s}" for s in range(n)}

    def all_there(rs: list[Any]) -> bool:
        return expected <= {orjson.loads(r.value)["id"] for r in rs if r.key == dev.encode()}

    await ingest.wait_for(all_there, timeout=60, message=f"all {n} readings on ingest")
    ids = [orjson.loads(r.value)["id"] for r in ingest.records if r.key == dev.encode()]
    print(f"\n[gateway] {n} readings delivered as {len(ids)} records ({len(ids) - n} redelivered duplicates)")


def test_gateway_waits_for_kafka_and_survives_its_restart(
    mqtt_url: str, topic_prefix: str, spawn_arus: Any, tmp_path: Any
) -> None:
    """Started before Kafka exists, the gateway retries instead of dying; when the (memory-only)
    broker restarts under it, it re-creates the topics and delivers what came in meanwhile."""
    port = embedded.free_port()
    bootstrap = f"127.0.0.1:{port}"
    client_id = f"gw-{uuid.uuid4().hex[:10]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARUS_")}
    env.update({"ARUS_KAFKA_BOOTSTRAP": bootstrap, "ARUS_MQTT_URL": mqtt_url,
                "ARUS_TOPIC_PREFIX": topic_prefix, "ARUS_PARTITIONS": str(PARTITIONS),
                "ARUS_GATEWAY_CLIENT_ID": client_id})
    proc = spawn_arus("gateway", env=env)
    gw = GatewayRun(env, client_id, f"{topic_prefix}ingest", "", 0, mqtt_url, bootstrap, lambda: proc, proc)
    tansu = None
    d = Device(mqtt_url)
    dev = unique_device()
    try:
        wait_until(lambda: "not ready" in proc.log(), 30, message="the gateway reports Kafka is not ready")
        assert proc.alive()
        tansu = embedded.start_tansu(port, tmp_path / "tansu")
        wait_until(lambda: "MQTT connected" in proc.log(), 60, message="gateway connected after Kafka came up")

        async def deliver(seqs: range) -> None:
            reader = await TopicReader(bootstrap, gw.ingest).start()
            try:
                await wait_ready(gw, reader, d, timeout=90)
                want = {f"{dev}/{1714543200000 + s}/{s}" for s in seqs}
                await reader.wait_for(
                    lambda rs: want <= {orjson.loads(r.value)["id"] for r in rs if r.key == dev.encode()},
                    timeout=90, message=f"readings {seqs} on ingest")
            finally:
                await reader.stop()

        def publish(seqs: range) -> None:
            for s in seqs:
                d.publish(f"jember/v1/{dev}/telemetry",
                          orjson.dumps({"ts": 1714543200000 + s, "seq": s, "values": {"waterLevel": 1.0}}))

        publish(range(0, 10))
        asyncio.run(deliver(range(0, 10)))

        tansu.stop(timeout=5)  # every topic and record is gone with it
        publish(range(10, 20))  # the gateway holds these unacknowledged while Kafka is away
        wait_until(lambda: "Kafka delivery failed" in proc.log() or "not ready" in proc.log().split(
            "MQTT connected")[-1], 60, message="the gateway notices Kafka is gone")
        tansu = embedded.start_tansu(port, tmp_path / "tansu")
        asyncio.run(deliver(range(10, 20)))
        assert proc.alive()
    finally:
        d.close()
        proc.stop(timeout=10)
        clear_session(mqtt_url, client_id)
        if tansu is not None:
            tansu.stop()


def test_gateway_reconnects_when_mqtt_restarts(
    gateway: GatewayRun, embedded_stack: Any, mqtt_url: str
) -> None:
    async def run() -> None:
        ingest = await TopicReader(gateway.bootstrap, gateway.ingest).start()
        try:
            d = Device(mqtt_url)
            await wait_ready(gateway, ingest, d)
            d.close()
            embedded_stack.get("mqtt").process.kill()  # the broker crashes
            wait_until(lambda: gateway.metric("arus_gateway_mqtt_connected") == 0.0, 30)
            embedded_stack.get("mqtt")  # restarted on the same port (its sessions persist on disk)
            wait_until(lambda: gateway.metric("arus_gateway_mqtt_connected") == 1.0, 60,
                       message="gateway reconnected")
            assert gateway.metric("arus_gateway_mqtt_disconnects_total") >= 1
            d = Device(mqtt_url)
            try:
                await wait_ready(gateway, ingest, d)
            finally:
                d.close()
        finally:
            await ingest.stop()

    asyncio.run(run())


def test_simulator_through_the_gateway(
    gateway: GatewayRun, mqtt_url: str, kafka_bootstrap: str
) -> None:
    """`arus simulate` (its own process) → mosquitto → gateway → Kafka: every message lands, and the
    rate the pipeline sustained is reported."""
    rate, duration = 10_000, 3

    async def run() -> None:
        ingest = await TopicReader(kafka_bootstrap, gateway.ingest).start()
        d = Device(mqtt_url)
        try:
            await wait_ready(gateway, ingest, d)
            sim_env = {k: v for k, v in gateway.env.items() if k != "ARUS_GATEWAY_METRICS_PORT"}
            cpu0 = process_cpu_s(gateway.process.pid)
            out = subprocess.run(
                [sys.executable, "-m", "arus.cli", "simulate", "--rate", str(rate), "--duration", str(duration)],
                env=sim_env, cwd=ROOT, capture_output=True, text=True, timeout=120,
            )
            assert out.returncode == 0, out.stderr[-3000:]
            result = eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - the CLI prints the result dict
            published = result["published"]
            assert published == rate * duration
            assert result["acknowledged"] == published
            sim_ids = {dev.device_id.encode() for dev in plan_devices()}

            seen = [0, 0]  # records looked at, simulated readings among them (counted once each)

            def all_landed(rs: list[Any]) -> bool:
                for r in rs[seen[0]:]:
                    seen[1] += r.key in sim_ids and b'"jember.sensor.telemetry.v1"' in r.value
                seen[0] = len(rs)
                return seen[1] >= published

            await ingest.wait_for(all_landed, timeout=120, interval=0.2,
                                  message=f"{published} simulated readings on ingest")
            landed_ms = time.time() * 1000
            cpu_us = (process_cpu_s(gateway.process.pid) - cpu0) / published * 1e6
            telemetry = [orjson.loads(r.value) for r in ingest.records
                         if r.key in sim_ids and b'"jember.sensor.telemetry.v1"' in r.value]
            assert len({e["id"] for e in telemetry}) == published  # distinct readings, nothing lost
            statuses = {(orjson.loads(r.value)["subject"], orjson.loads(r.value)["data"]["status"])
                        for r in ingest.records if r.key in sim_ids and b"sensor.status" in r.value}
            assert {s for _, s in statuses} == {"online", "offline"}
            assert len({dev for dev, s in statuses if s == "online"}) == len(sim_ids)
            first_ms = min(e["arusreceived"] for e in telemetry)
            print(f"\n[gateway] simulator published {published} at {result['rate']}/s; the gateway took "
                  f"them in {(landed_ms - first_ms) / 1000:.2f}s from the first receipt to the last on Kafka "
                  f"({published / (landed_ms - first_ms) * 1000:.0f} msg/s); gateway CPU {cpu_us:.0f} us/msg, "
                  f"i.e. {1e6 / cpu_us:.0f} msg/s per core")
        finally:
            # leave no retained statuses behind for later tests
            for dev in plan_devices():
                d.publish(f"jember/v1/{dev.device_id}/status", b"", retain=True, wait=False)
            d.publish("jember/v1/x/status", b"", retain=True)
            d.close()
            await ingest.stop()

    asyncio.run(run())


@pytest.mark.skipif(embedded.mqtt_backend() != "mosquitto", reason="shared subscriptions need mosquitto")
def test_two_gateways_share_the_load(
    kafka_bootstrap: str, mqtt_url: str, topic_prefix: str, spawn_arus: Any
) -> None:
    """With ARUS_GATEWAY_SHARED=true each message goes to one of the gateways ($share/arus/...)."""
    ensure_topics(kafka_bootstrap, [f"{topic_prefix}ingest", f"{topic_prefix}dlq"], PARTITIONS)
    ids = [f"gw-{uuid.uuid4().hex[:10]}" for _ in range(2)]
    procs = []
    for client_id in ids:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ARUS_")}
        env.update({"ARUS_KAFKA_BOOTSTRAP": kafka_bootstrap, "ARUS_MQTT_URL": mqtt_url,
                    "ARUS_TOPIC_PREFIX": topic_prefix, "ARUS_PARTITIONS": str(PARTITIONS),
                    "ARUS_GATEWAY_CLIENT_ID": client_id, "ARUS_GATEWAY_SHARED": "true",
                    "ARUS_GATEWAY_METRICS_PORT": str(embedded.free_port())})
        procs.append((spawn_arus("gateway", env=env, name=client_id), env))
    n = 400
    dev = unique_device()

    async def run() -> None:
        reader = await TopicReader(kafka_bootstrap, f"{topic_prefix}ingest").start()
        d = Device(mqtt_url)
        try:
            for proc, env in procs:
                wait_until(lambda p=proc: "MQTT connected" in p.log(), 60, message="gateway connected")
                gw = GatewayRun(env, env["ARUS_GATEWAY_CLIENT_ID"], reader.topic, "", 0, mqtt_url,
                                kafka_bootstrap, lambda p=proc: p, proc)
                await wait_ready(gw, reader, d)
            for s in range(n):
                d.publish(f"jember/v1/{dev}/telemetry",
                          orjson.dumps({"ts": 1714543200000 + s, "seq": s, "values": {"waterLevel": 1.0}}), wait=False)
            await reader.wait_for(lambda rs: len({r.value for r in rs if r.key == dev.encode()}) >= n, timeout=60)
            mine = [r for r in reader.records if r.key == dev.encode()]
            assert len(mine) == n  # each message handled once, by one gateway
        finally:
            d.close()
            await reader.stop()

    try:
        asyncio.run(run())
        counts = []
        for _proc, env in procs:
            gw = GatewayRun(env, "", "", "", int(env["ARUS_GATEWAY_METRICS_PORT"]), "", "", lambda: None)
            counts.append(gw.metric('arus_gateway_messages_received_total{kind="telemetry"}'))
        assert sum(counts) == n and all(c > 0 for c in counts), counts
    finally:
        for proc, _env in procs:
            proc.stop(timeout=10)
        for client_id in ids:
            clear_session(mqtt_url, client_id)


def test_simulator_registers_devices_once(fresh_database_url: str, mqtt_url: str) -> None:
    from infra.settings import Settings
    from producers.simulator import run_simulator
    from tests.helpers import pg_fetch

    settings = Settings(database_url=fresh_database_url, mqtt_url=mqtt_url)
    first = run_simulator(settings, rate=200, duration=0.1, presence=False)
    assert first["registered"] == 93 and first["published"] == 20 == first["acknowledged"]
    rows = pg_fetch(fresh_database_url, "SELECT device_id, kind, region_code, secret_hash FROM devices")
    planned = {d.device_id: d for d in plan_devices()}
    assert {r[0] for r in rows} == set(planned)
    for device_id, kind, region, _hash in rows:
        assert (kind, region) == (planned[device_id].kind, planned[device_id].region_code)
    again = run_simulator(settings, rate=200, duration=0.1, presence=False)
    assert again["registered"] == 0
    # existing devices keep their secrets (a re-run must not lock real devices out)
    assert sorted(rows) == sorted(pg_fetch(fresh_database_url,
                                           "SELECT device_id, kind, region_code, secret_hash FROM devices"))
