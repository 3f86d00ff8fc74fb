"""Helpers shared by the tests: poll a condition with a deadline (never sleep to synchronise), SQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

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
