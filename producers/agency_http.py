"""`POST /v1/events`: agency systems push service events over HTTP.

- Auth: `Authorization: Bearer <agency key>` (from `arus agencies add NAME`); missing/unknown/revoked
  key -> 401.
- Body: one CloudEvent (JSON object), a JSON array of them, or NDJSON (Content-Type
  application/x-ndjson, one event per line; blank lines are skipped). At most MAX_BODY_BYTES (5 MiB)
  and MAX_ITEMS (10,000) events per request -> 413 beyond; a body that is not JSON -> 400.
- Each event is validated (CloudEvents attributes, known type, region, the type's data model, NIK),
  its personal fields are replaced by keyed hashes, and it is produced to `jember.ingest` keyed by
  its entity id; the answer comes after Kafka acknowledged every record (503 when Kafka fails: the
  whole request may be retried, duplicates are harmless).
- Answer 202: {"accepted": n, "rejected": m, "results": [{index, id, status, reason, message}]}.
  Rejected events also go to `jember.dlq` with their reason, the raw input sealed (AES-GCM;
  `arus dlq replay` restores it).
- `source` is kept as the agency sent it; the authenticated agency is recorded in the extension
  attribute `arusagency` (and `aruschannel` = "http").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter

from infra.agencies import KeyCache
from infra.privacy import pii_key_bytes
from infra.settings import Settings
from producers.service_ingest import IngestPublisher, Record, dead_letter, prepare
from schemas import reasons, topics
from schemas.messages import DeadLetterMsg
from schemas.regions import load_regions
from schemas.results import Rejected

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 5 * 1024 * 1024
MAX_ITEMS = 10_000
NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl", "application/json-seq")


def _problem(status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"reason": reason, "message": message}, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes | None:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def parse_body(body: bytes, content_type: str) -> list[tuple[Any, bytes | None, Rejected | None]] | Rejected:
    """Items of a request body: (parsed event, raw line for NDJSON, per-item parse failure)."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype in NDJSON_TYPES:
        items: list[tuple[Any, bytes | None, Rejected | None]] = []
        for line in body.split(b"\n"):
            if not line.strip():
                continue
            try:
                items.append((orjson.loads(line), line, None))
            except orjson.JSONDecodeError as exc:
                items.append((None, line, Rejected(reasons.MALFORMED_JSON, f"not JSON: {exc.msg}")))
        return items
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if body[:1] == b"{" and b"\n{" in body:
            return Rejected(reasons.MALFORMED_JSON, f"not JSON ({exc.msg}); send NDJSON as Content-Type: application/x-ndjson")
        return Rejected(reasons.MALFORMED_JSON, f"body is not JSON: {exc.msg}")
    if isinstance(doc, list):
        return [(item, None, None) for item in doc]
    if isinstance(doc, dict):
        return [(doc, None, None)]
    return Rejected(reasons.INVALID_ENVELOPE, "body must be a CloudEvent object, an array of them, or NDJSON")


def router(
    settings: Settings,
    registry: CollectorRegistry | None = None,
    publisher: IngestPublisher | None = None,
    lookup: Callable[[str], str | None] | None = None,
) -> APIRouter:
    """The agency ingest routes. The Kafka producer starts with the app and stops with it.

    `publisher` and `lookup` (agency key -> agency name) replace Kafka and the database in tests."""
    pub = publisher or IngestPublisher(settings)
    if lookup is None and settings.database_url is not None:
        lookup = KeyCache(settings.database_dsn()).lookup
    pii_key = pii_key_bytes(settings.pii_key)
    if pii_key == b"change-me-in-production":
        log.warning("ARUS_PII_KEY is the shipped default: set a secret key before real personal data arrives")
    regions = load_regions()
    ingest_topic = settings.topic(topics.INGEST)
    prom = registry or CollectorRegistry()
    events = Counter("arus_agency_events_total", "service events received over HTTP", ["agency", "status"],
                     registry=prom)

    async def _warm_up() -> None:
        try:
            await pub.start()
        except Exception as exc:  # noqa: BLE001 - the API serves other routes; ingest retries per request
            log.warning("agency ingest: Kafka not ready at startup (%s); will retry on first request", exc)

    def _process(
        parsed: list[tuple[Any, bytes | None, Rejected | None]], agency: str, now_ms: int
    ) -> tuple[list[dict[str, Any]], list[Record], list[DeadLetterMsg]]:
        source = f"agency:{agency}"
        results: list[dict[str, Any]] = []
        ingest: list[Record] = []
        dead: list[DeadLetterMsg] = []
        for index, (item, raw_line, failure) in enumerate(parsed):
            eid = item.get("id") if isinstance(item, dict) and isinstance(item.get("id"), str) else None
            outcome = failure if failure is not None else prepare(
                item, pii_key, now_ms, agency=agency, channel="http", regions=regions)
            if isinstance(outcome, Rejected):
                results.append({"index": index, "id": eid, "status": "rejected",
                                "reason": outcome.reason, "message": outcome.message})
                dead.append(dead_letter(outcome, raw_line if raw_line is not None else item, pii_key, source,
                                        now_ms, topic=ingest_topic, index=index))
            else:
                ingest.append((outcome.value.key, outcome.value.value))
                results.append({"index": index, "id": eid, "status": "accepted", "reason": None, "message": None})
        return results, ingest, dead

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        # connect in the background: the API's other routes must not wait for Kafka
        warm = asyncio.create_task(_warm_up()) if settings.kafka_bootstrap else None
        try:
            yield
        finally:
            if warm is not None:
                warm.cancel()
                with contextlib.suppress(BaseException):
                    await warm
            await pub.stop()

    r = APIRouter(tags=["ingest"], lifespan=lifespan)

    @r.post(
        "/v1/events",
        status_code=202,
        summary="Push agency service events (CloudEvents JSON, a JSON array, or NDJSON)",
        responses={401: {"description": "missing or invalid agency key"},
                   413: {"description": f"body over {MAX_BODY_BYTES} bytes or over {MAX_ITEMS} events"},
                   400: {"description": "body is not JSON"},
                   503: {"description": "Kafka unavailable; retry (duplicates are harmless)"}},
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": {
                "description": "one CloudEvent or an array of them (schemas: schemas/jsonschema/<type>.json)",
                "oneOf": [{"type": "object"}, {"type": "array", "items": {"type": "object"},
                                                "maxItems": MAX_ITEMS}]}},
            "application/x-ndjson": {"schema": {"type": "string", "description": "one CloudEvent per line"}},
        }}},
    )
    async def post_events(request: Request) -> JSONResponse:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="arus"'}
        if scheme.lower() != "bearer" or not token.strip():
            return _problem(401, reasons.UNAUTHORIZED, "missing agency key: Authorization: Bearer <key>", challenge)
        if lookup is None:
            raise HTTPException(503, "no database configured: agency keys cannot be checked")
        agency = await asyncio.to_thread(lookup, token.strip())
        if agency is None:
            return _problem(401, reasons.UNAUTHORIZED, "unknown or revoked agency key", challenge)

        body = await _read_body(request, MAX_BODY_BYTES)
        if body is None:
            return _problem(413, reasons.PAYLOAD_TOO_LARGE, f"body larger than {MAX_BODY_BYTES} bytes")
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            return _problem(400, reasons.NOT_UTF8, "body is not UTF-8")
        parsed = parse_body(body, request.headers.get("content-type", "application/json"))
        if isinstance(parsed, Rejected):
            return _problem(400, parsed.reason, parsed.message)
        if len(parsed) > MAX_ITEMS:
            return _problem(413, reasons.PAYLOAD_TOO_LARGE, f"{len(parsed)} events; at most {MAX_ITEMS} per request")

        # validation and hashing of up to 10,000 events: off the event loop
        results, ingest, dead = await asyncio.to_thread(_process, parsed, agency, int(time.time() * 1000))
        try:
            await pub.publish(ingest, dead)
        except Exception as exc:  # noqa: BLE001 - the client must retry the whole request
            log.warning("agency ingest: Kafka delivery failed for %s (%s)", agency, type(exc).__name__)
            return _problem(503, reasons.PROCESSING_ERROR, "Kafka unavailable, nothing guaranteed; retry the request")
        accepted = len(ingest)
        if accepted:
            events.labels(agency, "accepted").inc(accepted)
        if dead:
            events.labels(agency, "rejected").inc(len(dead))
        return JSONResponse(
            {"agency": agency, "accepted": accepted, "rejected": len(dead), "results": results}, status_code=202
        )

    return r
