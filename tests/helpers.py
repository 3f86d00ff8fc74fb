"""Helpers shared by the tests: poll a condition with a deadline (never sleep to synchronise), SQL."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import paho.mqtt.client as mqtt
import psycopg

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    message: str = "",
) -> T:
    """Call `predicate` until it returns something truthy, and return that; AssertionError on timeout.

    Exceptions raised by the predicate count as "not yet" (a service still starting), and the last
    one is reported with the timeout.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last_exc = None
        except AssertionError:
            raise
        except Exception as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            why = f" (last error: {last_exc!r})" if last_exc else ""
            raise AssertionError(f"timed out after {timeout:.1f}s: {message or predicate!r}{why}")
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], Any],
    timeout: float,
    interval: float = 0.05,
    message: str = "",
) -> Any:
    """`wait_until` for async tests; the predicate may be a coroutine function."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if asyncio.iscoroutine(value) or isinstance(value, Awaitable):
                value = await value
            if value:
                return value
            last_exc = None
        except AssertionError:
            raise
        except Exception as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            why = f" (last error: {last_exc!r})" if last_exc else ""
            raise AssertionError(f"timed out after {timeout:.1f}s: {message or predicate!r}{why}")
        await asyncio.sleep(interval)


def pg_fetch(dsn: str, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    """Run one query in its own autocommit connection and return all rows (empty for no result)."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        cur = conn.execute(sql, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def pg_scalar(dsn: str, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> Any:
    """The first column of the first row, or None."""
    rows = pg_fetch(dsn, sql, params)
    return rows[0][0] if rows else None


def publish_mqtt(mqtt_url: str, messages: list[tuple[str, bytes]]) -> None:
    """Publish with QoS 1 from an outside client and wait for every PUBACK."""
    host, port = mqtt_url.removeprefix("mqtt://").rsplit(":", 1)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"outside-{uuid.uuid4().hex[:8]}")
    client.connect(host, int(port))
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(timeout=10)
            assert info.is_published()
    finally:
        client.loop_stop()
        client.disconnect()


def wait_pipeline_ready(dsn: str, mqtt_url: str, timeout: float = 90) -> None:
    """Probes from an unregistered device until one comes back as a dead letter: then the gateway is
    subscribed, the worker owns its partitions and the sink writes."""
    probe = f"probe-{uuid.uuid4().hex[:6]}"

    def probed() -> bool:
        publish_mqtt(mqtt_url, [(f"jember/v1/{probe}/telemetry",
                            orjson.dumps({"ts": int(time.time() * 1000), "values": {"waterLevel": 1}}))])
        return bool(pg_scalar(dsn, "SELECT count(*) FROM dead_letters WHERE device_id = %s", [probe]))

    wait_until(probed, timeout, interval=0.5, message="pipeline answers a probe")


@dataclass
class Dev:
    """A registry entry for unit tests (the fields validation and the stream read)."""

    device_id: str
    kind: str
    region_code: str
    revoked: bool = False
