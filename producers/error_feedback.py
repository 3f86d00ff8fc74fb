"""Error feedback for rejections made after the gateway: jember.dlq -> jember/v1/{device}/errors.

The gateway answers its own rejections (malformed JSON, size, topic...) directly. What the worker
refuses later (unknown device or metric, out of range, too old/late, duplicate...) lands on the
dead-letter topic with the device id; this task of the gateway consumes that topic and publishes each
such rejection to the device's errors topic, so a device gets every reason on one topic:

    {"reason": "unknown_metric", "message": "...", "id": "<dead letter id>", "source": "worker",
     "event_id": "<envelope id of the refused reading>", "partition": 0, "offset": 123}

- It starts at the end of the topic (no committed position): a restarted gateway does not re-answer
  old rejections; what is rejected while no gateway runs is still in `dead_letters`.
- One gateway: no consumer group, every partition. Several gateways (`gateway_shared`): one shared
  group, so each rejection is answered once.
- Dead letters with source "gateway" (already answered) or without a device are skipped.
- Cheap under a flood: a token bucket per device (`gateway_error_replies_per_min`, burst of the same
  size); replies over it are dropped and counted, the dead letters themselves are all kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer

from infra.settings import Settings
from schemas import topics as topic_names

from .decoding import DEVICE_ID_RE, errors_topic

log = logging.getLogger("arus.gateway.errors")

GATEWAY_SOURCE = "gateway"
MAX_RAW_PARSE = 64 * 1024  # the refused envelope's id is looked up in raw payloads up to this size
MAX_BUCKETS = 100_000

Publish = Callable[[str, bytes], Any]


class RateLimiter:
    """Token bucket per key: `per_minute` tokens a minute, bursts up to the same number."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.clock = clock
        self.buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str) -> bool:
        if self.capacity <= 0:
            return False
        now = self.clock()
        tokens, last = self.buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if len(self.buckets) >= MAX_BUCKETS and key not in self.buckets:
            self.buckets.clear()  # bounded: device ids come from the outside
        if tokens < 1.0:
            self.buckets[key] = (tokens, now)
            return False
        self.buckets[key] = (tokens - 1.0, now)
        return True


def reply_for(letter: Any) -> tuple[str, bytes] | None:
    """(errors topic, JSON reply) for a dead letter the device should hear about, else None."""
    if not isinstance(letter, dict) or letter.get("source") == GATEWAY_SOURCE:
        return None
    device_id = letter.get("device_id")
    reason = letter.get("reason")
    if not isinstance(device_id, str) or not DEVICE_ID_RE.match(device_id) or not isinstance(reason, str):
        return None
    reply: dict[str, Any] = {
        "reason": reason, "message": letter.get("message"), "id": letter.get("id"),
        "source": letter.get("source") or "worker",
    }
    raw = letter.get("raw")
    if letter.get("raw_encoding", "utf-8") == "utf-8" and isinstance(raw, str) and len(raw) <= MAX_RAW_PARSE:
        with contextlib.suppress(orjson.JSONDecodeError):
            env = orjson.loads(raw)
            if isinstance(env, dict) and isinstance(env.get("id"), str):
                reply["event_id"] = env["id"]
                if isinstance(env.get("time"), str | int):
                    reply["time"] = env["time"]
    for name in ("partition", "offset"):
        if isinstance(letter.get(name), int):
            reply[name] = letter[name]
    return errors_topic(device_id), orjson.dumps(reply)


class WorkerErrorFeedback:
    def __init__(self, settings: Settings, publish: Publish) -> None:
        self.settings = settings
        self.publish = publish
        self.topic = settings.topic(topic_names.DLQ)
        self.limiter = RateLimiter(settings.gateway_error_replies_per_min)
        self.sent = 0
        self.dropped = 0
        self.ready = asyncio.Event()  # set once positioned at the end of the topic

    def handle(self, value: bytes | None) -> None:
        try:
            letter = orjson.loads(value or b"")
        except orjson.JSONDecodeError:
            return
        if not isinstance(letter, dict) or letter.get("source") == GATEWAY_SOURCE:
            return
        device_id = letter.get("device_id")
        if not isinstance(device_id, str):
            return
        if not self.limiter.allow(device_id):
            self.dropped += 1
            if self.dropped % 1000 == 1:
                log.warning("error replies over the per-device rate limit dropped so far: %d", self.dropped)
            return
        reply = reply_for(letter)
        if reply is not None:
            self.publish(*reply)
            self.sent += 1

    async def run(self) -> None:
        """Consume until cancelled; reconnects with backoff when Kafka is away."""
        s = self.settings
        delay = 0.5
        while True:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=s.kafka_bootstrap or "127.0.0.1:9092",
                group_id=f"{s.consumer_group_prefix}-gateway-errors" if s.gateway_shared else None,
                client_id=f"{s.gateway_client_id}-errors", enable_auto_commit=s.gateway_shared,
                auto_offset_reset="latest", fetch_max_wait_ms=100, metadata_max_age_ms=10_000,
            )
            try:
                await consumer.start()
                consumer.subscribe([self.topic])
                delay = 0.5
                while True:
                    batch = await consumer.getmany(timeout_ms=500, max_records=1000)
                    if not self.ready.is_set() and consumer.assignment():
                        for tp in consumer.assignment():
                            await consumer.position(tp)  # resolves "latest" now: answers start here
                        self.ready.set()
                    for messages in batch.values():
                        for msg in messages:
                            self.handle(msg.value)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Kafka away: retry, the gateway keeps running
                log.warning("dead-letter feedback consumer failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(consumer.stop(), 5)
