"""The MQTT → Kafka gateway: devices' telemetry and status, as CloudEvents, onto jember.ingest.

Threads: paho's network loop receives (persistent session, manual acks) and appends to a list under a
lock, waking the asyncio loop once per batch rather than once per message. The loop decodes
(producers.decoding), builds one Kafka record batch per partition, and acknowledges the MQTT
messages, in arrival order, only once Kafka confirmed every record they caused: a crash at any point
means redelivery by the broker, never loss (at-least-once; envelope ids de-duplicate downstream).

Broker requirement for throughput: messages stay unacknowledged for a Kafka round trip, so the
broker's per-client in-flight window bounds the rate (mosquitto `max_inflight_messages` defaults to
20; set it to 0 or some thousands) and its queue must hold an outage's backlog
(`max_queued_messages` 0 or large).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from prometheus_client import CollectorRegistry, ProcessCollector

from infra.health import serve_health
from infra.kafka_admin import ensure_topics
from infra.settings import Settings
from schemas import topics as topic_names
from schemas.results import Rejected

from .decoding import (
    dead_letter,
    decode_status,
    decode_telemetry,
    device_id_from_topic,
    error_reply,
    errors_topic,
)
from .error_feedback import WorkerErrorFeedback
from .metrics import GatewayMetrics

log = logging.getLogger("arus.gateway")

TELEMETRY_FILTER = "jember/v1/+/telemetry"
STATUS_FILTER = "jember/v1/+/status"
SHARE_GROUP = "arus"
DLQ_SOURCE = "gateway"
STOP_GRACE_S = 15.0


@dataclass(frozen=True, slots=True)
class MqttTarget:
    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool


def parse_mqtt_url(url: str | None) -> MqttTarget:
    """mqtt://user:pass@host:port (mqtts:// for TLS); unset means the local default broker."""
    parts = urlsplit(url or "mqtt://127.0.0.1:1883")
    tls = parts.scheme in ("mqtts", "ssl")
    if parts.scheme not in ("mqtt", "tcp", "mqtts", "ssl"):
        raise ValueError(f"ARUS_MQTT_URL must be mqtt://user:pass@host:port, not {parts.scheme}://")
    return MqttTarget(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or (8883 if tls else 1883),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=tls,
    )


class _BufferedSocket:
    """Serves paho's small reads from one large recv().

    paho reads each packet with three recv() calls (type byte, length, body) and select()s before
    each packet; at 10k messages/s those syscalls dominate. `pending()` is what paho checks on TLS
    sockets to keep reading without select(), so buffered bytes are never stranded.
    """

    __slots__ = ("_sock", "_buf", "_pos")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def recv(self, n: int) -> bytes:
        pos = self._pos
        if pos >= len(self._buf):
            data = self._sock.recv(max(n, 65536))  # BlockingIOError etc. propagate to paho as usual
            if len(data) <= n:
                return bytes(data)
            self._buf, self._pos = data, n
            return bytes(data[:n])
        end = pos + n
        self._pos = min(end, len(self._buf))
        return self._buf[pos:end]

    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)
        return self.buffered() + (inner() if inner is not None else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class FastClient(mqtt.Client):
    """paho's Client with buffered reads and one write for a whole batch of PUBACKs.

    Relies on two paho 2.x internals (`_create_socket`, `_packet_queue`); when they are missing it
    behaves exactly like mqtt.Client.
    """

    _can_batch_acks = hasattr(mqtt.Client, "_packet_queue")

    def _create_socket(self) -> Any:
        sock = super()._create_socket()
        if self._transport == "websockets":
            return sock
        return _BufferedSocket(sock)

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = super().loop_read(max_packets)
        sock = self._sock
        # keep going while whole packets sit in our buffer (each pass consumes bytes or stops)
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and isinstance(sock, _BufferedSocket) and sock.buffered():
            rc = super().loop_read(max_packets)
            if self._sock is not sock:
                break
        return rc

    def ack_many(self, mids: list[int]) -> None:
        """PUBACK (QoS 1) many messages with one queued write, in the given order."""
        if not mids:
            return
        if not (self._manual_ack and self._can_batch_acks):
            for mid in mids:
                self.ack(mid, 1)
            return
        packet = b"".join(_PUBACK_HEAD + mid.to_bytes(2, "big") for mid in mids)
        self._packet_queue(mqtt.PUBACK, packet, 0, 0)


_PUBACK_HEAD = bytes((mqtt.PUBACK, 2))


def make_mqtt_client(
    target: MqttTarget, client_id: str, *, clean_session: bool, manual_ack: bool = False
) -> FastClient:
    client = FastClient(
        CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
        protocol=mqtt.MQTTv311, manual_ack=manual_ack,
    )
    if target.username is not None:
        client.username_pw_set(target.username, target.password)
    if target.tls:
        client.tls_set_context(ssl.create_default_context())
    client.suppress_exceptions = True  # a bug in a callback must not kill the network thread
    client.reconnect_delay_set(1, 30)
    return client


# (mid, topic, payload, received_ms, qos, connection generation, retained: sent because we subscribed)
Item = tuple[int, str, bytes, int, int, int, bool]
TP = tuple[str, int]
Records = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class _Entry:
    """One batch of MQTT messages, acknowledged together once all its records are delivered."""

    gen: int
    acks: list[int]
    count: int
    oldest_ms: int
    replies: list[tuple[str, bytes]] = field(default_factory=list)
    produced: dict[str, int] = field(default_factory=dict)
    done: bool = False


class Gateway:
    def __init__(self, settings: Settings, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.ingest_topic = settings.topic(topic_names.INGEST)
        self.dlq_topic = settings.topic(topic_names.DLQ)
        self.target = parse_mqtt_url(settings.mqtt_url)
        self.max_bytes = settings.max_payload_bytes

        # shared with the paho thread
        self._lock = threading.Lock()
        self._incoming: list[Item] = []
        self._wake_pending = False
        self._gen = 0
        self._stopping = False

        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopped: asyncio.Event | None = None
        self._producer: AIOKafkaProducer | None = None
        self.mqtt_up = False  # for /readyz (paho's thread sets it)
        self._producer_ready: asyncio.Event | None = None
        self._restart_lock: asyncio.Lock | None = None
        self._last_restart = 0.0
        self._partitions: dict[str, list[int]] = {}
        self._key_hash: dict[bytes, int] = {}
        self._pending: deque[_Entry] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight = 0
        self.client: FastClient | None = None

    # ------------------------------------------------------------------ paho thread

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("MQTT broker refused the connection: %s", reason)
            return
        with self._lock:
            self._gen += 1
        prefix = f"$share/{SHARE_GROUP}/" if self.settings.gateway_shared else ""
        client.subscribe([(prefix + TELEMETRY_FILTER, 1), (prefix + STATUS_FILTER, 1)])
        self.metrics.mqtt_connected.set(1)
        self.mqtt_up = True
        log.info("MQTT connected to %s:%d (session present: %s)",
                 self.target.host, self.target.port, getattr(flags, "session_present", "?"))

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        # Messages of the old connection can no longer be acknowledged (their ids may be reused):
        # the broker redelivers them on the next connection.
        with self._lock:
            self._gen += 1
        self.metrics.mqtt_connected.set(0)
        self.mqtt_up = False
        if not self._stopping:
            self.metrics.mqtt_disconnects.inc()
            log.warning("MQTT connection lost (%s); paho reconnects with backoff", reason)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if self._stopping:
            return  # not acknowledged: the broker keeps it for the next session
        try:
            item = (msg.mid, msg.topic, bytes(msg.payload), time.time_ns() // 1_000_000, msg.qos, self._gen,
                    bool(msg.retain))
        except UnicodeDecodeError:  # a broker would not deliver a non-UTF-8 topic; be safe anyway
            return
        with self._lock:
            self._incoming.append(item)
            if self._wake_pending:
                return
            self._wake_pending = True
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            loop.call_soon_threadsafe(wake.set)

    # ------------------------------------------------------------------ Kafka

    async def _ensure_topics(self) -> None:
        # idempotent; the replication factor follows the cluster size (1 on the embedded broker)
        await asyncio.to_thread(
            ensure_topics, self._bootstrap(), [self.ingest_topic, self.dlq_topic], self.settings.partitions,
            timeout=15.0,
        )

    def _bootstrap(self) -> str:
        return self.settings.kafka_bootstrap or "127.0.0.1:9092"

    async def _start_producer(self) -> None:
        """Connect to Kafka, retrying with backoff until it answers."""
        assert self._producer_ready is not None and self._stopped is not None
        self._producer_ready.clear()
        delay = 0.5
        while not self._stopped.is_set():
            producer = AIOKafkaProducer(
                bootstrap_servers=self._bootstrap(),
                client_id=f"{self.settings.gateway_client_id}-producer",
                acks="all",
                linger_ms=5,
                max_batch_size=1 << 20,
                max_request_size=max(1 << 22, 4 * self.max_bytes),
                request_timeout_ms=15000,
                retry_backoff_ms=200,
            )
            try:
                await producer.start()
                await self._ensure_topics()
                partitions = {t: sorted(await producer.partitions_for(t)) for t in (self.ingest_topic, self.dlq_topic)}
            except Exception as exc:  # noqa: BLE001 - any failure here means "Kafka not ready yet"
                log.warning("Kafka at %s not ready (%s); retrying in %.1fs", self._bootstrap(), exc, delay)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producer.stop(), 5)
                with contextlib.suppress(TimeoutError):  # sleep, unless asked to stop
                    await asyncio.wait_for(self._stopped.wait(), delay)
                delay = min(delay * 2, 10.0)
                continue
            if partitions != self._partitions:
                self._key_hash.clear()
            self._partitions = partitions
            self._producer = producer
            self._producer_ready.set()
            log.info("Kafka producer connected to %s", self._bootstrap())
            return

    async def _restart_producer(self) -> None:
        assert self._restart_lock is not None
        async with self._restart_lock:
            if time.monotonic() - self._last_restart < 10:
                return
            self._last_restart = time.monotonic()
            old = self._producer
            log.warning("restarting the Kafka producer")
            await self._start_producer()
            if old is not None:
                self._spawn(self._stop_quietly(old))

    @staticmethod
    async def _stop_quietly(producer: AIOKafkaProducer) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.stop(), 10)

    def _partition(self, topic: str, key: bytes) -> int:
        h = self._key_hash.get(key)
        if h is None:
            if len(self._key_hash) > 200_000:  # bounded: device ids come from the outside
                self._key_hash.clear()
            h = self._key_hash[key] = murmur2(key) & 0x7FFFFFFF
        parts = self._partitions[topic]
        return parts[h % len(parts)]  # Kafka's default partitioner: same key, same partition

    async def _send(self, tp: TP, records: Records) -> list[asyncio.Future[Any]]:
        """Queue records of one partition as few batches as possible; futures resolve on delivery."""
        producer = self._producer
        assert producer is not None
        futures: list[asyncio.Future[Any]] = []
        batch = producer.create_batch()
        for key, value in records:
            if batch.append(key=key, value=value, timestamp=None) is None:
                futures.append(await producer.send_batch(batch, tp[0], partition=tp[1]))
                batch = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
        futures.append(await producer.send_batch(batch, tp[0], partition=tp[1]))
        return futures

    async def _send_safe(self, tp: TP, records: Records) -> list[asyncio.Future[Any]]:
        try:
            return await self._send(tp, records)
        except Exception as exc:  # noqa: BLE001 - turned into a failed delivery, retried by the caller
            failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            return [failed]

    # ------------------------------------------------------------------ the loop side

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _build(self, items: list[Item], now_ms: int) -> tuple[_Entry, dict[TP, Records]]:
        """Decode one batch of MQTT messages into Kafka records grouped by partition."""
        entry = _Entry(gen=items[0][5], acks=[], count=len(items), oldest_ms=items[0][3])
        by_tp: dict[TP, Records] = {}
        ingest, dlq = self.ingest_topic, self.dlq_topic
        dumps = orjson.dumps
        received = telemetry = status = 0
        for mid, topic, payload, received_ms, qos, _gen, retained in items:
            if qos:
                entry.acks.append(mid)
            received += 1
            if topic.endswith("/telemetry"):
                telemetry += 1
                results: Iterable[Any] = decode_telemetry(topic, payload, received_ms, self.max_bytes)
            elif topic.endswith("/status"):
                status += 1
                if not payload:
                    continue  # an empty retained message clears the status: nothing to record
                # a retained status replayed because we (re)subscribed is of unknown age: stamped at
                # epoch 0 it sets the status of a device Arus knows nothing newer about, and no other
                results = (decode_status(topic, payload, 0 if retained else received_ms),)
            else:  # not something we subscribed to; refuse it the same way
                results = decode_telemetry(topic, payload, received_ms, self.max_bytes)
            for result in results:
                if type(result) is Rejected:
                    device_id = device_id_from_topic(topic)
                    letter = dead_letter(result, device_id, DLQ_SOURCE, now_ms)
                    key = letter["id"].encode()
                    by_tp.setdefault((dlq, self._partition(dlq, key)), []).append((key, dumps(letter)))
                    self.metrics.rejected.labels(result.reason).inc()
                    if device_id is not None:
                        entry.replies.append((errors_topic(device_id), error_reply(result, letter["id"])))
                else:
                    env = result.value
                    key = env["subject"].encode()
                    by_tp.setdefault((ingest, self._partition(ingest, key)), []).append((key, dumps(env)))
        if telemetry:
            self.metrics.received.labels("telemetry").inc(telemetry)
        if status:
            self.metrics.received.labels("status").inc(status)
        if received - telemetry - status:
            self.metrics.received.labels("other").inc(received - telemetry - status)
        for (topic, _p), recs in by_tp.items():
            entry.produced[topic] = entry.produced.get(topic, 0) + len(recs)
        return entry, by_tp

    async def _sender(self) -> None:
        """Takes whatever the paho thread collected, in arrival order, and queues it to Kafka."""
        assert self._wake is not None and self._producer_ready is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            with self._lock:
                items, self._incoming = self._incoming, []
                self._wake_pending = False
            if not items:
                continue
            await self._producer_ready.wait()
            start = 0
            # one entry per connection generation, so an entry is acked on one connection or none
            for i in range(1, len(items) + 1):
                if i == len(items) or items[i][5] != items[start][5]:
                    await self._submit(items[start:i])
                    start = i

    async def _submit(self, items: list[Item]) -> None:
        try:
            entry, by_tp = self._build(items, time.time_ns() // 1_000_000)
        except Exception:  # a decoder bug: leave the messages unacked for redelivery, keep running
            log.exception("could not decode a batch of %d messages", len(items))
            return
        self._pending.append(entry)
        self._inflight += entry.count
        self.metrics.inflight.set(self._inflight)
        self.metrics.batch_size.observe(entry.count)
        futures = {tp: await self._send_safe(tp, recs) for tp, recs in by_tp.items()}
        self._spawn(self._complete(entry, by_tp, futures))

    async def _complete(
        self, entry: _Entry, by_tp: dict[TP, Records], futures: dict[TP, list[asyncio.Future[Any]]]
    ) -> None:
        """Wait for delivery of an entry's records, re-sending failed partitions until they land."""
        attempt = 0
        while True:
            failed: dict[TP, Records] = {}
            error: BaseException | None = None
            for tp, futs in futures.items():
                for fut in futs:
                    try:
                        await fut
                    except Exception as exc:  # noqa: BLE001
                        failed[tp], error = by_tp[tp], exc
                        break
            if not failed:
                break
            attempt += 1
            self.metrics.kafka_errors.inc()
            log.warning("Kafka delivery failed (%s: %s); retry %d of %d records",
                        type(error).__name__, error, attempt, sum(len(r) for r in failed.values()))
            await asyncio.sleep(min(0.2 * 2 ** attempt, 10.0) * (0.5 + random.random()))  # noqa: S311
            if attempt % 3 == 0:
                await self._restart_producer()
            assert self._producer_ready is not None
            await self._producer_ready.wait()
            futures = {tp: await self._send_safe(tp, recs) for tp, recs in failed.items()}
        entry.done = True
        for topic, n in entry.produced.items():
            self.metrics.produced.labels(topic).inc(n)
        self.metrics.produce_latency.observe(max(0.0, time.time() - entry.oldest_ms / 1000.0))
        self._ack_prefix()

    def _ack_prefix(self) -> None:
        """Acknowledge delivered entries in arrival order, stopping at the first undelivered one."""
        client = self.client
        while self._pending and self._pending[0].done:
            entry = self._pending.popleft()
            self._inflight -= entry.count
            if client is None or entry.gen != self._gen:
                continue  # its connection is gone: the broker redelivers, envelope ids de-duplicate
            for topic, body in entry.replies:
                client.publish(topic, body, qos=1, retain=False)
            client.ack_many(entry.acks)
        self.metrics.inflight.set(self._inflight)

    # ------------------------------------------------------------------ lifecycle

    def request_stop(self) -> None:
        if self._stopped is not None and not self._stopped.is_set():
            log.info("stopping: no new messages; flushing what was received")
            self._stopping = True
            self._stopped.set()

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Ready while connected to the MQTT broker with a Kafka producer to hand messages to."""
        mqtt_ok = self.mqtt_up
        kafka_ok = self._producer is not None
        return mqtt_ok and kafka_ok, {"mqtt": mqtt_ok, "kafka": kafka_ok}

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._stopped = asyncio.Event()
        self._producer_ready = asyncio.Event()
        self._restart_lock = asyncio.Lock()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self._loop.add_signal_handler(sig, self.request_stop)

        await self._start_producer()
        if self._stopped.is_set():
            return

        client = make_mqtt_client(
            self.target, self.settings.gateway_client_id, clean_session=False, manual_ack=True
        )
        client.max_inflight_messages_set(1000)  # our own publishes: error replies
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self.client = client
        client.connect_async(self.target.host, self.target.port, keepalive=30)
        client.loop_start()
        sender = asyncio.create_task(self._sender())
        self._spawn(WorkerErrorFeedback(self.settings, lambda t, b: client.publish(t, b, qos=1)).run())
        try:
            await self._stopped.wait()
            # process what arrived before the stop, then wait (bounded) for its delivery
            self._wake.set()
            deadline = time.monotonic() + STOP_GRACE_S
            while time.monotonic() < deadline and (self._incoming or self._pending):
                await asyncio.sleep(0.02)
            if self._pending:
                log.warning("%d messages not delivered in time: the broker will redeliver them",
                            sum(e.count for e in self._pending))
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            if self._producer is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._producer.flush(), 5)
            self._ack_prefix()
            client.disconnect()  # queued after the acks, so they reach the broker first
            client.loop_stop()
            self.metrics.mqtt_connected.set(0)
            self.mqtt_up = False
            for task in list(self._tasks):
                task.cancel()
            if self._producer is not None:
                await self._stop_quietly(self._producer)
            log.info("gateway stopped")


def run_gateway(settings: Settings) -> None:
    """Run the gateway until SIGTERM/SIGINT (blocking)."""
    # paho's thread parses whole socket buffers without releasing the GIL; with the default 5 ms
    # switch interval every hand-over to the asyncio thread costs milliseconds of latency.
    sys.setswitchinterval(settings.gateway_switch_interval_s)
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    metrics = GatewayMetrics(registry)
    gateway = Gateway(settings, metrics)
    if settings.gateway_metrics_port is not None:
        serve_health(settings.gateway_metrics_port, registry, "gateway", gateway.readiness)
        log.info("metrics and health on :%d (/metrics, /healthz, /readyz)", settings.gateway_metrics_port)
    asyncio.run(gateway.run())
