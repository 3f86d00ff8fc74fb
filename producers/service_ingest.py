"""The ingest step of agency service events, shared by HTTP (`POST /v1/events`) and CSV import.

For each CloudEvent: validate (schemas.service_events, NIK included), pseudonymise every personal
field with the keyed hash (infra.privacy) and produce it to `jember.ingest` keyed by entity id.
A refused event goes to `jember.dlq` with its reason; its raw input is sealed (AES-GCM), never in
clear, so `arus dlq replay` can restore it after a fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from infra.kafka_admin import ensure_topics
from infra.privacy import protect_identifier, pseudonymise, seal
from infra.settings import Settings
from schemas import topics
from schemas.messages import DeadLetterMsg
from schemas.regions import Region, load_regions
from schemas.results import Ok, Rejected
from schemas.service_events import (
    LIFECYCLES,
    SERVICE_MAX_AGE_MS,
    SERVICE_MAX_FUTURE_MS,
    ServiceEvent,
    validate_service_event,
)

log = logging.getLogger(__name__)

Record = tuple[bytes, bytes]  # (key, value)


@dataclass(frozen=True, slots=True)
class Prepared:
    event: ServiceEvent
    key: bytes
    value: bytes  # the pseudonymised CloudEvent, JSON


def prepare(
    env: Any,
    pii_key: bytes,
    now_ms: int,
    *,
    agency: str | None = None,
    channel: str | None = None,
    regions: dict[str, Region] | None = None,
    max_age_ms: int = SERVICE_MAX_AGE_MS,
    max_future_ms: int = SERVICE_MAX_FUTURE_MS,
) -> Ok[Prepared] | Rejected:
    """Validate one event and build the pseudonymised record for jember.ingest. Never raises."""
    result = validate_service_event(env, regions or load_regions(), now_ms, max_age_ms, max_future_ms)
    if isinstance(result, Rejected):
        return result
    out = pseudonymise(dict(env), pii_key)
    out["arusreceived"] = now_ms
    if agency is not None:
        out["arusagency"] = agency  # CloudEvents extension: the authenticated agency that sent it
    if channel is not None:
        out["aruschannel"] = channel  # http | csv
    ev = result.value
    ev.data = out["data"]  # never keep the clear values around
    ev.entity_id = protect_identifier(ev.entity_id, pii_key)  # a NIK used as the case number
    ev.id = protect_identifier(ev.id, pii_key)
    return Ok(Prepared(ev, ev.entity_id.encode("utf-8"), orjson.dumps(out)))


def _entity_key(env: Any) -> str | None:
    if not isinstance(env, dict) or not isinstance(env.get("data"), dict):
        return None
    etype = env.get("type")
    life = LIFECYCLES.get(etype) if isinstance(etype, str) else None
    value = env["data"].get(life.entity_field) if life else None
    return value if isinstance(value, str) else None


def dead_letter(
    rejected: Rejected, raw: Any, pii_key: bytes, source: str, now_ms: int, topic: str | None = None, **position: Any
) -> DeadLetterMsg:
    """A dead letter whose raw input is sealed (AES-GCM, it may hold NIK/names in clear), in the same
    wrapper the worker uses, `{"sealed", "type", "id", "source", "key"}`, so `arus dlq replay` restores
    and re-produces it to `topic` (jember.ingest). The id is a keyed hash of the clear input: the same
    bad event sent again is the same dead-letter row, and the id reveals nothing."""
    if isinstance(raw, bytes | bytearray):
        clear = bytes(raw)
    elif isinstance(raw, str):
        clear = raw.encode("utf-8", "surrogatepass")
    else:
        clear = orjson.dumps(raw, default=str)
    digest = hmac.new(pii_key, source.encode() + b"\x00" + clear, hashlib.sha256).hexdigest()
    env = raw if isinstance(raw, dict) else None
    wrapper = {
        "sealed": seal(clear, pii_key),
        "type": env.get("type") if env and isinstance(env.get("type"), str) else None,
        "id": env.get("id") if env and isinstance(env.get("id"), str) else None,
        "source": env.get("source") if env and isinstance(env.get("source"), str) else None,
        "key": _entity_key(env),
    }
    line = position.get("line")
    index = position.get("index")
    where = f"line {line}: " if line is not None else (f"item {index}: " if index is not None else "")
    return {
        "id": f"dl-{digest[:32]}",
        "reason": rejected.reason,
        "message": where + rejected.message,
        "source": source,
        "device_id": None,
        "topic": topic,
        "partition": None,
        "offset": None,
        "raw": orjson.dumps(wrapper).decode("utf-8"),
        "raw_encoding": "utf-8",
        "time": now_ms,
    }


class IngestPublisher:
    """An aiokafka producer for jember.ingest and jember.dlq; `publish` returns after delivery."""

    def __init__(self, settings: Settings, client_id: str = "arus-agency-ingest") -> None:
        self.settings = settings
        self.client_id = client_id
        self.ingest_topic = settings.topic(topics.INGEST)
        self.dlq_topic = settings.topic(topics.DLQ)
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

    def _bootstrap(self) -> str:
        return self.settings.kafka_bootstrap or "127.0.0.1:9092"

    async def start(self) -> None:
        async with self._lock:
            if self._producer is not None:
                return
            await asyncio.to_thread(
                ensure_topics, self._bootstrap(), [self.ingest_topic, self.dlq_topic], self.settings.partitions,
                timeout=30.0,
            )
            producer = AIOKafkaProducer(
                bootstrap_servers=self._bootstrap(),
                client_id=self.client_id,
                acks="all",
                linger_ms=5,
                max_batch_size=1 << 20,
                max_request_size=1 << 23,
                request_timeout_ms=15000,
                retry_backoff_ms=200,
            )
            try:
                await producer.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producer.stop(), 5)
                raise
            self._producer = producer

    async def stop(self) -> None:
        async with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 10)

    async def publish(self, ingest: list[Record], dead: list[DeadLetterMsg]) -> None:
        """Produce all records and wait for every delivery (raises when one fails)."""
        if self._producer is None:
            await self.start()
        producer = self._producer
        assert producer is not None
        futures = [await producer.send(self.ingest_topic, value=v, key=k) for k, v in ingest]
        futures += [
            await producer.send(self.dlq_topic, value=orjson.dumps(d), key=d["id"].encode()) for d in dead
        ]
        if futures:
            await asyncio.gather(*futures)
