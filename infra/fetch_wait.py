"""The consumers' fetch long-poll bound (Kafka's fetch.max.wait.ms), adapted to what the broker does.

Why adapt: the embedded broker, Tansu, holds a fetch for its whole wait even when records arrive
meanwhile, so every consumer hop of a caught-up pipeline adds up to the wait to its latency (two hops
from a reading to its alert): a short wait is better. But Tansu also answers a fetch with nothing when
it cannot collect the records within the wait, and its in-memory partitions get slower to scan as
they grow: measured, with 20 ms and ~100k records per partition a consumer behind by thousands
received nothing for as long as we watched (docs/performance.md). A fixed 100 ms wait avoided that at
the cost of ~40 ms of alert latency, and would only move the cliff further out.

So each consumer starts at the floor and doubles its wait (up to the ceiling) when it stays starved —
the broker reports records past its position but polls bring none — and halves it back toward the
floor after a while without starvation. Apache Kafka answers a fetch as soon as records arrive, so
there the wait stays at the floor and costs nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)


class FetchWait:
    """Pure policy: the fetch wait (ms) to use next, from what the last poll saw at monotonic `now`."""

    def __init__(self, floor_ms: int, ceiling_ms: int, *, starved_polls: float = 3.0,
                 relax_after_s: float = 30.0) -> None:
        if floor_ms < 1 or ceiling_ms < floor_ms:
            raise ValueError(f"fetch wait needs 1 <= floor ({floor_ms}) <= ceiling ({ceiling_ms})")
        self.floor_ms = floor_ms
        self.ceiling_ms = ceiling_ms
        self.wait_ms = floor_ms
        self.starved_polls = starved_polls  # starved for this many waits in a row -> double
        self.relax_after_s = relax_after_s  # this long at a raised wait without starvation -> halve
        self._starved_since: float | None = None
        self._changed_at = 0.0

    def observe(self, now: float, *, got_records: bool, behind: bool) -> int:
        if got_records or not behind:
            self._starved_since = None
            if self.wait_ms > self.floor_ms and now - self._changed_at >= self.relax_after_s:
                self.wait_ms = max(self.floor_ms, self.wait_ms // 2)
                self._changed_at = now
            return self.wait_ms
        if self._starved_since is None:
            self._starved_since = now
        elif (now - self._starved_since) * 1000.0 >= self.starved_polls * self.wait_ms \
                and self.wait_ms < self.ceiling_ms:
            self.wait_ms = min(self.ceiling_ms, self.wait_ms * 2)
            self._starved_since = now
            self._changed_at = now
        return self.wait_ms


class ConsumerFetchWait:
    """Applies a FetchWait to an aiokafka consumer; call `after_poll` after every getmany."""

    def __init__(self, consumer: Any, name: str, floor_ms: int, ceiling_ms: int) -> None:
        self.consumer = consumer
        self.name = name
        self.policy = FetchWait(floor_ms, max(floor_ms, ceiling_ms))
        self._applied = floor_ms

    async def after_poll(self, now: float, got_records: bool) -> None:
        behind = False
        if not got_records and self.policy.wait_ms < self.policy.ceiling_ms:
            behind = await self._behind()
        wait = self.policy.observe(now, got_records=got_records, behind=behind)
        if wait != self._applied:
            # aiokafka builds each FetchRequest from this attribute (0.10-0.14); the constructor
            # argument is fixed, hence the one private touch.
            fetcher = getattr(self.consumer, "_fetcher", None)
            if fetcher is not None and hasattr(fetcher, "_fetch_max_wait_ms"):
                fetcher._fetch_max_wait_ms = wait
                log.info("%s: fetch wait %d -> %d ms (%s)", self.name, self._applied, wait,
                         "starved by the broker" if wait > self._applied else "no starvation lately")
                self._applied = wait

    async def _behind(self) -> bool:
        """True when the broker's last answer reports records past our position on some partition."""
        for tp in self.consumer.assignment():
            try:
                high = self.consumer.highwater(tp)
                if high is None:
                    continue
                # position() waits for a partition whose offset is being reset: do not stall the loop
                if high > await asyncio.wait_for(self.consumer.position(tp), timeout=0.05):
                    return True
            except Exception:  # noqa: BLE001, S112 - revoked meanwhile or no position yet: not starved
                continue
        return False
