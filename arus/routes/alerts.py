"""Alerts over HTTP: list, detail, live SSE stream, operators' acknowledge/resolve, outbound webhook.

    GET  /v1/alerts                 filters: state, severity (minimum), kecamatan, kind, rule, region
                                    (code prefix), since/until (on updated_at), limit
    GET  /v1/alerts/stream          Server-Sent Events: one event per alert_events row
    GET  /v1/alerts/{id}            the alert and its whole history
    POST /v1/alerts/{id}/ack        Authorization: Bearer <operator token>
    POST /v1/alerts/{id}/resolve

The stream: every API process holds ONE PostgreSQL connection that LISTENs on `arus_alert_events`
(the alert_events trigger notifies each new row's seq at commit) and fans the rows out to its SSE
clients through asyncio queues. An SSE event is `id: <seq>`, `event: <transition>`, `data: {"seq",
"alert", "event"}`. A client that reconnects with `Last-Event-ID: n` (header, as browsers do, or
`?last_event_id=n`) is subscribed first, then gets every row with seq > n from the table, then the
live rows it has not already been sent: no gap, no duplicate on that connection.

Commands: the API writes the transition at once, in one transaction (alerts row + alert_events row
with dedup `{id}:cmd:{command_id}`, actor = operator name), so every console sees it through the
stream; then it produces a command envelope (schemas.alerts.COMMAND_TYPE) to the ingest topic so
the stream's alert state learns it. When Kafka is unreachable the transition still stands, the
answer is 202 with a `warning`, and the command is retried in the background (in memory: lost if
this process stops first).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import psycopg
from fastapi import APIRouter, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from psycopg import conninfo
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from pydantic import BaseModel, Field

from infra.operators import Auth, check_token, token_name
from infra.settings import Settings
from schemas import reasons
from schemas import topics as topic_names
from schemas.alerts import COMMAND_TYPE, SEVERITIES, STATES, command_dedup, command_key

log = logging.getLogger(__name__)
WIB = ZoneInfo("Asia/Jakarta")
CHANNEL = "arus_alert_events"
LIMIT_DEFAULT = 200
LIMIT_MAX = 1000
REPLAY_PAGE = 500
SUBSCRIBER_QUEUE = 10_000
HOLD_BACK_S = 1.0  # longest wait for a lower seq still in flight (see AlertHub._dispatch); only
# while another writer holds alert_events, so it rarely applies, but a loaded machine needs the margin
TIME_FIELDS = ("opened_at", "updated_at", "acknowledged_at", "resolved_at")

_ALERT_COLUMNS = ("id", "rule_id", "entity", "kind", "region_code", "kecamatan", "metric", "severity", "state",
                  "value", "message", "opened_at", "updated_at", "acknowledged_at", "acknowledged_by",
                  "resolved_at", "resolved_by", "trigger_event", "version")
_ALERT_SELECT = ", ".join(f"a.{c}" for c in _ALERT_COLUMNS) + ", r.name AS kecamatan_name"
_EVENT_COLUMNS = ("seq", "dedup", "alert_id", "time", "transition", "severity", "state", "actor", "value", "note")
_EVENT_SELECT = (", ".join(f"e.{c} AS e_{c}" for c in _EVENT_COLUMNS) + ", "
                 + ", ".join(f"a.{c} AS a_{c}" for c in _ALERT_COLUMNS) + ", r.name AS a_kecamatan_name")
_EVENTS_FROM = ("FROM alert_events e LEFT JOIN alerts a ON a.id = e.alert_id"
                " LEFT JOIN regions r ON r.code = a.kecamatan")


# --------------------------------------------------------------------------- representation


def iso_utc(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def wib(dt: datetime | None) -> str | None:
    return dt.astimezone(WIB).strftime("%Y-%m-%d %H:%M:%S WIB") if dt is not None else None


def alert_json(row: dict[str, Any]) -> dict[str, Any]:
    """An alerts row as the API shows it: times in UTC ISO 8601 plus `<time>_wib` for display."""
    out = {c: row.get(c) for c in (*_ALERT_COLUMNS, "kecamatan_name")}
    for f in TIME_FIELDS:
        out[f] = iso_utc(row.get(f))
        out[f + "_wib"] = wib(row.get(f))
    return out


def event_json(row: dict[str, Any]) -> dict[str, Any]:
    out = {c: row.get(c) for c in _EVENT_COLUMNS}
    out["time"] = iso_utc(row.get("time"))
    out["time_wib"] = wib(row.get("time"))
    return out


def stream_message(row: dict[str, Any]) -> dict[str, Any]:
    """One joined alert_events x alerts row -> the SSE data: the event, and the alert after it: the
    stored alert with this event's severity and value. Its state (and who acknowledged or resolved
    it) is always the stored one: an operator's acknowledgement or resolution stands even when the
    stream, not yet aware of it, emits a transition that still says `open` (the sink keeps the
    operator's state in the row, schemas/alerts.py)."""
    ev = event_json({c: row[f"e_{c}"] for c in _EVENT_COLUMNS})
    alert: dict[str, Any] | None = None
    if row.get("a_id") is not None:
        alert = alert_json({c: row[f"a_{c}"] for c in (*_ALERT_COLUMNS, "kecamatan_name")})
        alert["severity"] = ev["severity"]
        if ev["value"] is not None:
            alert["value"] = ev["value"]
    return {"seq": ev["seq"], "alert": alert, "event": ev}


def sse_frame(msg: dict[str, Any]) -> bytes:
    return (f"id: {msg['seq']}\nevent: {msg['event']['transition']}\n".encode()
            + b"data: " + orjson.dumps(msg) + b"\n\n")


# --------------------------------------------------------------------------- filters


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _parse_time(value: str | None, name: str) -> datetime | None:
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise HTTPException(422, f"{name}: not an ISO 8601 time: {value!r}") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)  # a time without offset is UTC


@dataclass(frozen=True)
class AlertFilter:
    states: tuple[str, ...] | None = None  # None: any state
    severities: tuple[str, ...] | None = None  # the minimum and above
    kecamatan: tuple[str, ...] = ()  # codes or names
    kinds: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()
    region: str | None = None  # code prefix
    since: datetime | None = None
    until: datetime | None = None

    @classmethod
    def parse(cls, state: str | None, severity: str | None, kecamatan: str | None, kind: str | None,
              rule: str | None, region: str | None, since: str | None, until: str | None,
              default_states: Sequence[str] | None) -> AlertFilter:
        states: tuple[str, ...] | None
        if state in (None, ""):
            states = tuple(default_states) if default_states else None
        elif state == "all":
            states = None
        else:
            states = tuple(_csv(state))
            bad = [s for s in states if s not in STATES]
            if bad:
                raise HTTPException(422, f"state: unknown {', '.join(bad)}; one of {', '.join(STATES)} or all")
        severities = None
        if severity:
            if severity not in SEVERITIES:
                raise HTTPException(422, f"severity: unknown {severity!r}; one of {', '.join(SEVERITIES)}")
            severities = SEVERITIES[SEVERITIES.index(severity):]
        return cls(states, severities, tuple(_csv(kecamatan)), tuple(_csv(kind)), tuple(_csv(rule)),
                   region or None, _parse_time(since, "since"), _parse_time(until, "until"))

    def sql(self) -> tuple[str, list[Any]]:
        """WHERE clause (on alias a = alerts, r = its kecamatan's region row) and parameters."""
        where: list[str] = ["TRUE"]
        params: list[Any] = []
        if self.states is not None:
            where.append("a.state = ANY(%s)")
            params.append(list(self.states))
        if self.severities is not None:
            where.append("a.severity = ANY(%s)")
            params.append(list(self.severities))
        if self.kecamatan:
            where.append("(a.kecamatan = ANY(%s) OR lower(r.name) = ANY(%s))")
            params += [list(self.kecamatan), [k.lower() for k in self.kecamatan]]
        if self.kinds:
            where.append("a.kind = ANY(%s)")
            params.append(list(self.kinds))
        if self.rules:
            where.append("a.rule_id = ANY(%s)")
            params.append(list(self.rules))
        if self.region:
            where.append("a.region_code LIKE %s")
            params.append(self.region.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        if self.since is not None:
            where.append("a.updated_at >= %s")
            params.append(self.since)
        if self.until is not None:
            where.append("a.updated_at < %s")
            params.append(self.until)
        return " AND ".join(where), params

    def matches(self, alert: dict[str, Any] | None) -> bool:
        """The same filter on a stream message's alert (since/until do not apply to a live stream)."""
        if alert is None:
            return self == AlertFilter()
        if self.states is not None and alert["state"] not in self.states:
            return False
        if self.severities is not None and alert["severity"] not in self.severities:
            return False
        if self.kecamatan and alert.get("kecamatan") not in self.kecamatan and \
                (alert.get("kecamatan_name") or "").lower() not in {k.lower() for k in self.kecamatan}:
            return False
        if self.kinds and alert.get("kind") not in self.kinds:
            return False
        if self.rules and alert.get("rule_id") not in self.rules:
            return False
        return not (self.region and not (alert.get("region_code") or "").startswith(self.region))


# --------------------------------------------------------------------------- the LISTEN fan-out


@dataclass(eq=False)
class Subscriber:
    queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=lambda: asyncio.Queue(SUBSCRIBER_QUEUE))
    overflowed: bool = False


class AlertHub:
    """One LISTEN connection per process; each notified alert_events row is read once and put on
    every subscriber's queue. After a lost connection it reconnects and catches up (seq > highest)."""

    def __init__(self, dsn: str, pool: AsyncConnectionPool[Any]) -> None:
        self.dsn = dsn
        self.pool = pool
        self.subscribers: set[Subscriber] = set()
        self.ready = asyncio.Event()
        self.high = 0  # highest seq broadcast
        self._recent: deque[int] = deque(maxlen=20_000)
        self._recent_set: set[int] = set()
        self._pending: asyncio.Queue[int] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self.on_event: Callable[[], None] = lambda: None
        self.fetch = fetch_events  # module function, replaceable in unit tests

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._listen(), name="alert-hub-listen"),
                       asyncio.create_task(self._dispatch(), name="alert-hub-dispatch")]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        for sub in list(self.subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(None)

    def subscribe(self) -> Subscriber:
        sub = Subscriber()
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    async def _listen(self) -> None:
        first = True
        delay = 0.2
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True,
                                                             application_name="arus-api-listen")
            except psycopg.Error as exc:
                self.ready.clear()
                log.warning("alert stream: cannot connect to PostgreSQL (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            try:
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    cur = await conn.execute("SELECT coalesce(max(seq), 0) FROM alert_events")
                    row = await cur.fetchone()
                    latest = int(row[0]) if row else 0
                    if first:
                        self.high = latest
                        first = False
                    elif latest > self.high:
                        # missed while disconnected: catch up from the table
                        cur = await conn.execute(
                            "SELECT seq FROM alert_events WHERE seq > %s ORDER BY seq", (self.high,))
                        for (seq,) in await cur.fetchall():
                            self._pending.put_nowait(int(seq))
                    self.ready.set()
                    delay = 0.2
                    async for note in conn.notifies():
                        with contextlib.suppress(ValueError):
                            self._pending.put_nowait(int(note.payload))
            except psycopg.Error as exc:
                self.ready.clear()
                log.warning("alert stream: LISTEN connection lost (%s); reconnecting", exc)
                await asyncio.sleep(delay)

    def _drain(self, into: set[int]) -> None:
        while not self._pending.empty():
            into.add(self._pending.get_nowait())

    async def _writers_in_flight(self) -> bool:
        """Some other transaction has inserted into alert_events and not finished (it holds the
        table's RowExclusiveLock until commit or rollback). When the check itself fails the answer
        is yes: the caller's hold-back deadline bounds the wait."""
        try:
            async with self.pool.connection(timeout=2) as conn:
                cur = await conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE relation = 'alert_events'::regclass"
                    " AND mode = 'RowExclusiveLock' AND pid <> pg_backend_pid())")
                row = await cur.fetchone()
        except (psycopg.Error, PoolTimeout) as exc:
            log.debug("alert stream: in-flight check failed (%s)", exc)
            return True
        return bool(row and row[0])

    async def _committed(self, seqs: set[int]) -> set[int]:
        """Which of these seqs are visible now. Asked after `_writers_in_flight` said no: PostgreSQL
        makes a commit visible before it releases the writer's locks, so a seq committed by then is
        seen here even when its notification has not been read from the LISTEN connection yet."""
        try:
            async with self.pool.connection(timeout=2) as conn:
                cur = await conn.execute("SELECT seq FROM alert_events WHERE seq = ANY(%s)", (sorted(seqs),))
                return {int(r[0]) for r in await cur.fetchall()}
        except (psycopg.Error, PoolTimeout) as exc:
            log.debug("alert stream: visibility check failed (%s)", exc)
            return set()

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = {await self._pending.get()}
            self._drain(batch)
            # Sequence numbers are taken at insert, rows become visible at commit: two writers (the
            # sink, an operator's command) can commit out of seq order. While a lower seq is missing
            # and another writer is still in a transaction on alert_events, hold the batch briefly
            # so clients see seq order (their Last-Event-ID then never skips a late commit). A hole
            # with no writer in flight is either committed already (its lock goes after the commit
            # is visible; its notification may not have been read yet: take it from the table) or
            # permanent (rollback, ON CONFLICT DO NOTHING): no further wait.
            deadline = loop.time() + HOLD_BACK_S
            while True:
                top = max(batch)
                if top - self.high > 10_000:
                    break
                holes = set(range(self.high + 1, top)) - batch - self._recent_set
                if not holes or loop.time() > deadline:
                    break
                if not await self._writers_in_flight():
                    batch |= await self._committed(holes)
                    break
                await asyncio.sleep(0.005)
                self._drain(batch)
            seqs = sorted(s for s in batch if s not in self._recent_set)
            if not seqs:
                continue
            for attempt in range(20):
                try:
                    rows = await self.fetch(self.pool, "e.seq = ANY(%s)", [seqs])
                    break
                except (psycopg.Error, PoolTimeout) as exc:
                    log.warning("alert stream: cannot read events %s (%s)", seqs[:5], exc)
                    await asyncio.sleep(min(0.1 * 2 ** attempt, 2.0))
            else:
                log.error("alert stream: dropped events %s (database unavailable)", seqs)
                continue
            for msg in rows:
                self._broadcast(msg)

    def _broadcast(self, msg: dict[str, Any]) -> None:
        seq = msg["seq"]
        if seq in self._recent_set:
            return
        if len(self._recent) == self._recent.maxlen:
            self._recent_set.discard(self._recent[0])
        self._recent.append(seq)
        self._recent_set.add(seq)
        self.high = max(self.high, seq)
        self.on_event()
        for sub in list(self.subscribers):
            try:
                sub.queue.put_nowait(msg)
            except asyncio.QueueFull:
                # a client this far behind reconnects and replays from its Last-Event-ID
                sub.overflowed = True
                self.subscribers.discard(sub)


async def fetch_events(pool: AsyncConnectionPool[Any], where: str, params: list[Any],
                       limit: int | None = None) -> list[dict[str, Any]]:
    sql = f"SELECT {_EVENT_SELECT} {_EVENTS_FROM} WHERE {where} ORDER BY e.seq"
    if limit:
        sql += f" LIMIT {int(limit)}"
    async with pool.connection(timeout=10) as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(sql, params)
        return [stream_message(r) for r in await cur.fetchall()]


# --------------------------------------------------------------------------- Kafka: commands, dead letters


class Producer:
    """aiokafka producer started in the background (the API starts without Kafka) with a small
    in-memory retry list of records Kafka did not take."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.producer: Any = None
        self.pending: deque[tuple[str, bytes, bytes]] = deque(maxlen=10_000)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.settings.kafka_bootstrap:
            self._task = asyncio.create_task(self._run(), name="alert-producer")

    async def _run(self) -> None:
        from aiokafka import AIOKafkaProducer
        from aiokafka.errors import KafkaError

        delay = 0.5
        while self.producer is None:
            p = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap, acks="all",
                                 request_timeout_ms=5000, client_id="arus-api")
            try:
                await p.start()
                self.producer = p
            except (KafkaError, OSError) as exc:
                with contextlib.suppress(Exception):
                    await p.stop()
                log.warning("api: Kafka not reachable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        while True:  # resend what failed earlier
            await asyncio.sleep(2.0)
            while self.pending:
                topic, key, value = self.pending[0]
                if not await self._send(topic, key, value):
                    break
                self.pending.popleft()

    async def _send(self, topic: str, key: bytes, value: bytes) -> bool:
        if self.producer is None:
            return False
        try:
            await asyncio.wait_for(self.producer.send_and_wait(topic, value, key=key), timeout=6)
            return True
        except Exception as exc:  # Kafka errors and timeouts: the caller reports it
            log.warning("api: produce to %s failed: %s", topic, exc)
            return False

    async def send(self, topic: str, key: bytes, value: bytes, retry_later: bool = True) -> bool:
        ok = await self._send(topic, key, value)
        if not ok and retry_later:
            self.pending.append((topic, key, value))
        return ok

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self.producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.producer.stop(), timeout=5)


def command_envelope(action: str, actor: str, alert: dict[str, Any], command_id: str, now: datetime,
                     note: str | None) -> dict[str, Any]:
    env: dict[str, Any] = {
        "specversion": "1.0", "id": command_id, "source": "arus-api", "type": COMMAND_TYPE,
        "time": now.isoformat(timespec="milliseconds"), "subject": alert["id"],
        "datacontenttype": "application/json",
        "data": {"action": action, "actor": actor, "alert_id": alert["id"], "rule_id": alert["rule_id"],
                 "entity": alert["entity"], "command_id": command_id, "note": note},
    }
    if alert.get("region_code"):
        env["region"] = alert["region_code"]
    return env


# --------------------------------------------------------------------------- webhook


class Webhook:
    """POSTs every alert event (the SSE data) to ALERT_WEBHOOK_URL, in order, with retries and
    exponential backoff; after the last attempt the notification becomes a dead letter (reason
    webhook_failed) in the dlq topic and the dead_letters table. Header X-Arus-Event-Id = seq."""

    def __init__(self, settings: Settings, hub: AlertHub, pool: AsyncConnectionPool[Any], producer: Producer):
        self.settings, self.hub, self.pool, self.producer = settings, hub, pool, producer
        self._task: asyncio.Task[None] | None = None
        self.delivered = 0
        self.failed = 0
        self.on_result: Callable[[str], None] = lambda result: None

    def start(self) -> None:
        if self.settings.alert_webhook_url:
            self._task = asyncio.create_task(self._run(), name="alert-webhook")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    async def _run(self) -> None:
        import httpx

        s = self.settings
        url = s.alert_webhook_url
        assert url is not None
        sub = self.hub.subscribe()
        try:
            async with httpx.AsyncClient(timeout=s.alert_webhook_timeout_s) as client:
                while True:
                    msg = await sub.queue.get()
                    if msg is None:
                        return
                    body = orjson.dumps(msg)
                    error = ""
                    for attempt in range(s.alert_webhook_attempts):
                        try:
                            resp = await client.post(url, content=body, headers={
                                "content-type": "application/json", "x-arus-event-id": str(msg["seq"])})
                            if 200 <= resp.status_code < 300:
                                error = ""
                                break
                            error = f"HTTP {resp.status_code}"
                        except httpx.HTTPError as exc:
                            error = f"{type(exc).__name__}: {exc}"
                        if attempt + 1 < s.alert_webhook_attempts:
                            await asyncio.sleep(min(s.alert_webhook_backoff_s * 2 ** attempt, 30.0))
                    self.on_result("dead_lettered" if error else "delivered")
                    if error:
                        self.failed += 1
                        await self._dead_letter(msg, body, f"webhook {url} refused event {msg['seq']} after "
                                                           f"{s.alert_webhook_attempts} attempt(s): {error}")
                    else:
                        self.delivered += 1
        finally:
            self.hub.unsubscribe(sub)

    async def _dead_letter(self, msg: dict[str, Any], body: bytes, message: str) -> None:
        log.warning("%s", message)
        dl_id = hashlib.sha1(f"webhook:{msg['seq']}".encode()).hexdigest()  # noqa: S324 - an id
        now = datetime.now(UTC)
        entity = (msg.get("alert") or {}).get("entity")
        record = {"id": dl_id, "reason": reasons.WEBHOOK_FAILED, "message": message, "source": "api-webhook",
                  "device_id": entity, "topic": None, "partition": None, "offset": msg["seq"],
                  "raw": body.decode(), "raw_encoding": "utf-8", "time": int(now.timestamp() * 1000)}
        await self.producer.send(self.settings.topic(topic_names.DLQ), dl_id.encode(), orjson.dumps(record),
                                 retry_later=False)
        try:  # the table too (same id: the sink's copy of the topic record collapses into this row)
            async with self.pool.connection(timeout=10) as conn:
                await conn.execute(
                    "INSERT INTO dead_letters (id, time, reason, message, source, device_id, topic,"
                    " \"partition\", \"offset\", raw, raw_encoding) VALUES (%s, %s, %s, %s, %s, %s, NULL,"
                    " NULL, %s, %s, 'utf-8') ON CONFLICT (id) DO NOTHING",
                    (dl_id, now, reasons.WEBHOOK_FAILED, message, "api-webhook", entity, msg["seq"],
                     body.decode()))
        except (psycopg.Error, PoolTimeout) as exc:
            log.error("webhook dead letter %s not stored: %s", dl_id, exc)


# --------------------------------------------------------------------------- routes


class CommandBody(BaseModel):
    note: str | None = Field(None, max_length=1000, description="free text stored with the transition")
    command_id: str | None = Field(None, min_length=1, max_length=100,
                                   description="idempotency key: a retried command with the same id is one "
                                               "transition (default: a new uuid4)")


class AlertMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        reg = registry or CollectorRegistry()
        self.clients = Gauge("arus_api_sse_clients", "connected GET /v1/alerts/stream clients", registry=reg)
        self.events = Counter("arus_api_alert_events_total", "alert events read by the LISTEN fan-out", registry=reg)
        self.commands = Counter("arus_api_alert_commands_total", "operators' commands by action and answer",
                                ["action", "status"], registry=reg)
        self.webhook = Counter("arus_api_alert_webhook_total", "webhook notifications: delivered or dead-lettered",
                               ["result"], registry=reg)


@dataclass
class _State:
    pool: AsyncConnectionPool[Any] | None = None
    hub: AlertHub | None = None
    producer: Producer | None = None
    webhook: Webhook | None = None


class _StateCollector:
    """Scrape-time gauges: alerts by state and severity (one small query, cached 5 s) and the use of
    the API's database pool."""

    def __init__(self, st: _State, dsn: str | None) -> None:
        self.st = st
        self.dsn = dsn
        self._cache: tuple[float, list[tuple[str, str, int]]] = (0.0, [])

    def _alerts(self) -> list[tuple[str, str, int]]:
        at, rows = self._cache
        if self.dsn is None or time.monotonic() - at < 5.0:
            return rows
        try:
            with psycopg.connect(self.dsn, connect_timeout=2, autocommit=True) as conn:
                rows = [(str(a), str(b), int(c)) for a, b, c in conn.execute(
                    "SELECT state, severity, count(*) FROM alerts GROUP BY 1, 2").fetchall()]
        except psycopg.Error:
            return rows  # the last known values; /healthz says the database is unreachable
        self._cache = (time.monotonic(), rows)
        return rows

    def collect(self) -> Any:
        alerts = GaugeMetricFamily("arus_alerts", "alerts by state and severity", labels=["state", "severity"])
        for state, severity, n in self._alerts():
            alerts.add_metric([state, severity], n)
        yield alerts
        pool = GaugeMetricFamily("arus_api_db_pool_connections", "the API's PostgreSQL pool", labels=["what"])
        if self.st.pool is not None:
            stats = self.st.pool.get_stats()
            for what in ("pool_size", "pool_available", "requests_waiting"):
                pool.add_metric([what], stats.get(what, 0))
        yield pool


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": 'Bearer realm="arus-operators"'})


def routes(settings: Settings, registry: CollectorRegistry | None = None) -> APIRouter:
    st = _State()
    metrics = AlertMetrics(registry)
    if registry is not None:
        registry.register(_StateCollector(st, settings.database_dsn() if settings.database_url else None))

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if settings.database_url is not None:
            dsn = conninfo.make_conninfo(settings.database_dsn(), connect_timeout=5, application_name="arus-api")
            st.pool = AsyncConnectionPool(dsn, min_size=1, max_size=8, open=False, kwargs={"autocommit": True})
            await st.pool.open(wait=False)
            st.hub = AlertHub(dsn, st.pool)
            st.hub.on_event = metrics.events.inc
            st.hub.start()
        st.producer = Producer(settings)
        st.producer.start()
        if st.hub is not None and st.pool is not None:
            st.webhook = Webhook(settings, st.hub, st.pool, st.producer)
            st.webhook.on_result = lambda result: metrics.webhook.labels(result).inc()
            st.webhook.start()
        try:
            yield
        finally:
            if st.webhook is not None:
                await st.webhook.stop()
            if st.hub is not None:
                await st.hub.stop()
            await st.producer.stop()
            if st.pool is not None:
                await st.pool.close()

    router = APIRouter(lifespan=lifespan, tags=["alerts"])

    def pool() -> AsyncConnectionPool[Any]:
        if st.pool is None:
            raise HTTPException(503, "no database configured (ARUS_DATABASE_URL)")
        return st.pool

    @router.get("/v1/alerts")
    async def list_alerts(
        state: str | None = Query(None, description="comma-separated states, or `all` (default open,acknowledged)"),
        severity: str | None = Query(None, description="minimum severity: info < warning < major < critical"),
        kecamatan: str | None = Query(None, description="kecamatan code(s) or name(s), comma-separated"),
        kind: str | None = Query(None, description="sensor kind(s), comma-separated"),
        rule: str | None = Query(None, description="rule id(s), comma-separated"),
        region: str | None = Query(None, description="region code prefix, e.g. 35.09.19"),
        since: str | None = Query(None, description="updated at or after (ISO 8601; UTC when no offset)"),
        until: str | None = Query(None, description="updated before (ISO 8601)"),
        limit: int = Query(LIMIT_DEFAULT, ge=1, le=LIMIT_MAX),
    ) -> dict[str, Any]:
        """Alerts sorted by severity (critical first) then most recently updated. `last_seq` is the
        newest alert event of the same snapshot: open the stream with `?last_event_id=<last_seq>` to
        follow on from this list without a gap."""
        flt = AlertFilter.parse(state, severity, kecamatan, kind, rule, region, since, until,
                                default_states=("open", "acknowledged"))
        where, params = flt.sql()
        # Every event up to what the stream had broadcast before this snapshot is in the snapshot;
        # later ones may not be: `last_seq` is no higher, so following on from it never skips one
        # (an event in both is harmless: it carries the alert's state).
        broadcast = st.hub.high if st.hub is not None and st.hub.ready.is_set() else None
        sql = (f"SELECT {_ALERT_SELECT} FROM alerts a LEFT JOIN regions r ON r.code = a.kecamatan WHERE {where}"
               " ORDER BY array_position(%s::text[], a.severity) DESC, a.updated_at DESC, a.id LIMIT %s")
        try:
            async with pool().connection(timeout=10) as conn, conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                cur = await conn.execute("SELECT coalesce(max(seq), 0) FROM alert_events")
                row = await cur.fetchone()
                last_seq = int(row[0]) if row else 0
                if broadcast is not None:
                    last_seq = min(last_seq, broadcast)
                dcur = conn.cursor(row_factory=dict_row)
                await dcur.execute(sql, [*params, list(SEVERITIES), limit])
                rows = await dcur.fetchall()
        except PoolTimeout:
            raise HTTPException(503, "database unavailable") from None
        now = datetime.now(UTC)
        return {"alerts": [alert_json(r) for r in rows], "count": len(rows), "limit": limit,
                "last_seq": last_seq, "generated_at": iso_utc(now), "generated_at_wib": wib(now)}

    @router.get("/v1/alerts/stream")
    async def stream(
        request: Request,
        last_event_id_header: str | None = Header(None, alias="Last-Event-ID"),
        last_event_id: int | None = Query(None, ge=0, description="replay events after this seq (the "
                                          "Last-Event-ID header, when present, takes precedence)"),
        state: str | None = Query(None, description="comma-separated states (default: all)"),
        severity: str | None = Query(None),
        kecamatan: str | None = Query(None),
        kind: str | None = Query(None),
        rule: str | None = Query(None),
        region: str | None = Query(None),
        since: str | None = Query(None, description="without a Last-Event-ID: first replay events since then"),
    ) -> StreamingResponse:
        """Server-Sent Events: `id` = seq, `event` = transition, `data` = {seq, alert, event};
        a `: heartbeat` comment every ARUS_SSE_HEARTBEAT_S seconds."""
        flt = AlertFilter.parse(state, severity, kecamatan, kind, rule, region, since, None, default_states=None)
        after: int | None = last_event_id
        if last_event_id_header:
            try:
                after = int(last_event_id_header.strip())
            except ValueError:
                raise HTTPException(422, "Last-Event-ID must be an alert event seq (integer)") from None
        p = pool()
        hub = st.hub
        assert hub is not None
        try:
            await asyncio.wait_for(hub.ready.wait(), timeout=10)
        except TimeoutError:
            raise HTTPException(503, "alert stream not ready (database unavailable)") from None
        sub = hub.subscribe()  # first subscribe, then read the table: nothing falls in between
        heartbeat = settings.sse_heartbeat_s

        async def body() -> AsyncIterator[bytes]:
            metrics.clients.inc()
            try:
                yield f"retry: 2000\n: connected, heartbeat every {heartbeat:g}s\n\n".encode()
                replayed: set[int] = set()
                if after is not None or flt.since is not None:
                    cursor = after if after is not None else 0
                    while True:
                        where = "e.seq > %s"
                        params: list[Any] = [cursor]
                        if after is None and flt.since is not None:
                            where += " AND e.time >= %s"
                            params.append(flt.since)
                        rows = await fetch_events(p, where, params, limit=REPLAY_PAGE)
                        for msg in rows:
                            replayed.add(msg["seq"])
                            if flt.matches(msg["alert"]):
                                yield sse_frame(msg)
                        if len(rows) < REPLAY_PAGE:
                            break
                        cursor = rows[-1]["seq"]
                while True:
                    try:
                        item: dict[str, Any] | None = await asyncio.wait_for(sub.queue.get(), timeout=heartbeat)
                    except TimeoutError:
                        if sub.overflowed:
                            return
                        yield b": heartbeat\n\n"
                        continue
                    if item is None:
                        return
                    msg = item
                    if msg["seq"] in replayed or not flt.matches(msg["alert"]):
                        continue
                    yield sse_frame(msg)
            finally:
                metrics.clients.dec()
                hub.unsubscribe(sub)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.get("/v1/alerts/{alert_id}")
    async def get_alert(alert_id: str) -> dict[str, Any]:
        """One alert and every transition it went through (oldest first)."""
        try:
            async with pool().connection(timeout=10) as conn:
                cur = conn.cursor(row_factory=dict_row)
                await cur.execute(f"SELECT {_ALERT_SELECT} FROM alerts a LEFT JOIN regions r ON r.code = a.kecamatan"
                                  " WHERE a.id = %s", (alert_id,))
                row = await cur.fetchone()
                if row is None:
                    raise HTTPException(404, f"no alert {alert_id!r}")
                await cur.execute(f"SELECT {', '.join(_EVENT_COLUMNS)} FROM alert_events WHERE alert_id = %s"
                                  " ORDER BY seq", (alert_id,))
                events = await cur.fetchall()
        except PoolTimeout:
            raise HTTPException(503, "database unavailable") from None
        return {"alert": alert_json(row), "events": [event_json(e) for e in events]}

    async def authenticate(authorization: str | None) -> str:
        if not authorization:
            raise _unauthorized("missing operator token (Authorization: Bearer <token from `arus operators add`>)")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized("expected Authorization: Bearer <operator token>")
        name = token_name(token)
        if name is None:
            raise _unauthorized("invalid operator token")
        async with pool().connection(timeout=10) as conn:
            cur = await conn.execute("SELECT token_hash, revoked_at IS NOT NULL FROM operators WHERE name = %s",
                                     (name,))
            row = await cur.fetchone()
        result = Auth.INVALID if row is None else await asyncio.to_thread(check_token, token, row[0], bool(row[1]))
        if result is Auth.INVALID:
            raise _unauthorized("invalid operator token")
        if result is Auth.REVOKED:
            raise HTTPException(403, f"operator {name} is revoked")
        return name

    async def command(action: str, alert_id: str, authorization: str | None, body: CommandBody | None
                      ) -> JSONResponse:
        actor = await authenticate(authorization)
        command_id = (body.command_id if body and body.command_id else None) or str(uuid.uuid4())
        note = body.note if body else None
        dedup = command_dedup(alert_id, command_id)
        now = datetime.now(UTC)
        repeated = False
        async with pool().connection(timeout=10) as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(f"SELECT {_ALERT_SELECT} FROM alerts a LEFT JOIN regions r ON r.code = a.kecamatan"
                              " WHERE a.id = %s FOR UPDATE OF a", (alert_id,))
            alert = await cur.fetchone()
            if alert is None:
                raise HTTPException(404, f"no alert {alert_id!r}")
            await cur.execute(f"SELECT {', '.join(_EVENT_COLUMNS)} FROM alert_events WHERE dedup = %s", (dedup,))
            event = await cur.fetchone()
            if event is not None:
                repeated = True  # the same command again (a retried request): one transition
            else:
                state = alert["state"]
                if action == "ack" and state != "open":
                    raise HTTPException(409, f"alert {alert_id} is {state}: only an open alert can be acknowledged")
                if action == "resolve" and state == "resolved":
                    raise HTTPException(409, f"alert {alert_id} is already resolved")
                if action == "ack":
                    await cur.execute(
                        "UPDATE alerts SET state = 'acknowledged', acknowledged_at = %s, acknowledged_by = %s,"
                        " updated_at = %s WHERE id = %s", (now, actor, now, alert_id))
                    alert.update(state="acknowledged", acknowledged_at=now, acknowledged_by=actor)
                else:
                    await cur.execute(
                        "UPDATE alerts SET state = 'resolved', resolved_at = %s, resolved_by = %s,"
                        " updated_at = %s WHERE id = %s", (now, actor, now, alert_id))
                    alert.update(state="resolved", resolved_at=now, resolved_by=actor)
                alert["updated_at"] = now
                await cur.execute(
                    "INSERT INTO alert_events (dedup, alert_id, time, transition, severity, state, actor, value, note)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (dedup) DO NOTHING"
                    f" RETURNING {', '.join(_EVENT_COLUMNS)}",
                    (dedup, alert_id, now, "acknowledged" if action == "ack" else "resolved", alert["severity"],
                     alert["state"], actor, alert["value"], note))
                event = await cur.fetchone()
        out: dict[str, Any] = {"alert": alert_json(alert), "event": event_json(event) if event else None,
                               "command_id": command_id, "repeated": repeated}
        producer = st.producer
        assert producer is not None
        envelope = command_envelope(action, actor, alert, command_id, now, note)
        if repeated:
            return JSONResponse(out, status_code=200)
        if await producer.send(settings.topic(topic_names.INGEST), command_key(alert["entity"]).encode(),
                               orjson.dumps(envelope)):
            out["command"] = "sent"
            return JSONResponse(out, status_code=200)
        out["command"] = "pending"
        out["warning"] = ("the transition is stored, but the command could not be sent to Kafka yet "
                          "(the stream learns it when Kafka is back; retried by this API process)")
        return JSONResponse(out, status_code=202)

    async def counted(action: str, alert_id: str, authorization: str | None, body: CommandBody | None
                      ) -> JSONResponse:
        try:
            resp = await command(action, alert_id, authorization, body)
        except HTTPException as exc:
            metrics.commands.labels(action, str(exc.status_code)).inc()
            raise
        metrics.commands.labels(action, str(resp.status_code)).inc()
        return resp

    @router.post("/v1/alerts/{alert_id}/ack", responses={
        401: {"description": "missing or wrong operator token"}, 403: {"description": "operator revoked"},
        404: {"description": "no such alert"}, 409: {"description": "not open (already acknowledged or resolved)"},
        202: {"description": "stored, but the command envelope could not reach Kafka yet (see `warning`)"}})
    async def ack(alert_id: str, body: CommandBody | None = None,
                  authorization: str | None = Header(None)) -> JSONResponse:
        """Acknowledge an open alert (Authorization: Bearer <operator token>)."""
        return await counted("ack", alert_id, authorization, body)

    @router.post("/v1/alerts/{alert_id}/resolve", responses={
        401: {"description": "missing or wrong operator token"}, 403: {"description": "operator revoked"},
        404: {"description": "no such alert"}, 409: {"description": "already resolved"},
        202: {"description": "stored, but the command envelope could not reach Kafka yet (see `warning`)"}})
    async def resolve(alert_id: str, body: CommandBody | None = None,
                      authorization: str | None = Header(None)) -> JSONResponse:
        """Resolve an open or acknowledged alert (Authorization: Bearer <operator token>)."""
        return await counted("resolve", alert_id, authorization, body)

    router.state = st  # type: ignore[attr-defined]  # for tests and the console
    return router

