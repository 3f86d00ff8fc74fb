"""Stage 2: merge per-partition kecamatan partial windows into one kecamatan aggregate.

Input records are keyed by kecamatan|metric|window and carry the full partial state of one source
partition, so applying one twice is harmless (replace, then merge).

A merged window is kept until every source partition has closed it for good, or at most
`retention_ms` past the newest watermark, so that one silent or lagging source cannot hold state
forever (keeping every window for the whole retention, an hour, made the worker's memory grow for 70
minutes of a soak). "For good" is the watermark of the source's last *written checkpoint*, which each
partial carries as `closed`: before writing a checkpoint the source delivered the final partials of
every window that watermark closes, and a restarted source resumes from that checkpoint, so it never
sends those windows again. The newest watermark a partial carries is not enough: a source that dies
before its checkpoint restarts from an older one and sends the windows in between again, first with
part of their readings (CI saw a kecamatan aggregate lose readings when the merge had dropped such a
window in between; tests/unit/test_region_merge_crashes.py). Windows close this way only once all
`expected_sources` (the ingest topic's partitions, as configured or as a partial says, `of`) have
been heard from; until then, by retention.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping
from typing import Any

import orjson

from schemas import reasons, topics
from schemas.alerts import COMMAND_TYPE
from schemas.results import Rejected

from . import windows as W
from .outputs import Outputs

MergeKey = tuple[str, str, int]


class RegionMergePartition:
    def __init__(self, partition: int, source_topic: str, size_ms: int, retention_ms: int,
                 lateness_ms: int | None = None, expected_sources: int = 1) -> None:
        self.partition = partition
        self.source_topic = source_topic
        self.size_ms = size_ms
        self.retention_ms = retention_ms  # at most this long past their end (a source may lag or fall silent)
        self.lateness_ms = lateness_ms  # the sources' allowed lateness; None: keep for the whole retention
        self.expected_sources = expected_sources  # source partitions; closing waits until all were heard
        self.offset = -1
        self.watermark = 0
        self.source_closed: dict[str, int] = {}  # source -> the watermark of its last written checkpoint
        self.closed_below = -1  # windows starting at or before this were dropped: a partial for one is too late
        self.state: dict[MergeKey, dict[str, list[float]]] = {}
        self.dirty: set[MergeKey] = set()
        self.expired = 0
        self.alerts: Any = None  # stream_processors.alerting.handler.RegionAlerts: aggregate alert rules

    def process(self, raw: bytes, offset: int, now_ms: int, out: Outputs) -> None:
        try:
            msg = orjson.loads(raw)
            if self.alerts is not None and isinstance(msg, dict) and msg.get("type") == COMMAND_TYPE:
                self.alerts.on_command(msg, now_ms, out)  # an operator's command for a kecamatan alert
                return
            key = (str(msg["kecamatan"]), str(msg["metric"]), int(msg["window_start"]))
            src = str(msg["src"])
            partial = [float(x) for x in msg["state"]]
            wm = int(msg.get("watermark", 0))
            closed = int(msg.get("closed", -1))
            sources = int(msg.get("of", 0))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            out.dead_letter(Rejected(reasons.PROCESSING_ERROR, f"bad region partial: {exc}"),
                            raw, self.source_topic, self.partition, offset, now_ms)
            return
        if len(partial) != W.HEADER:
            out.dead_letter(Rejected(reasons.PROCESSING_ERROR, "region partial state has a wrong length"),
                            raw, self.source_topic, self.partition, offset, now_ms)
            return
        if key not in self.state and (key[2] <= self.closed_below
                                      or key[2] + self.size_ms + self.retention_ms <= self.watermark):
            self.expired += 1  # far too late: a fresh merge would hold one source only and be wrong
            return
        if wm > self.watermark:
            self.watermark = wm
        if sources > self.expected_sources:
            self.expected_sources = sources  # the ingest topic has more partitions than configured
        if closed > self.source_closed.get(src, -1):
            self.source_closed[src] = closed
        elif src not in self.source_closed:
            self.source_closed[src] = -1
        self.state.setdefault(key, {})[src] = partial
        self.dirty.add(key)

    def flush(self, out: Outputs) -> None:
        for key in self.dirty:
            sources = self.state.get(key)
            if not sources:
                continue
            merged = W.merge(array("d", s) for s in sources.values())
            assert merged is not None
            kec, metric, start = key
            result = W.result(merged)
            out.emit(topics.AGGREGATES, f"kecamatan|{kec}|{metric}|{start}", {
                "scope": "kecamatan", "key": kec, "region": kec, "metric": metric,
                "window_start": start, "window_end": start + self.size_ms, **result,
                "final": False,
            })
            if self.alerts is not None:
                self.alerts.on_window(kec, metric, start, result, out)
        if self.alerts is not None:
            self.alerts.tick(self.watermark)
        self.drop_closed()

    def drop_closed(self) -> None:
        limit = self.watermark - self.size_ms - self.retention_ms
        if self.lateness_ms is not None and len(self.source_closed) >= self.expected_sources:
            # closed for good at every source: start + size + lateness <= its checkpointed watermark
            complete = min(self.source_closed.values())
            limit = max(limit, complete - self.size_ms - self.lateness_ms)
        self.closed_below = max(self.closed_below, limit)
        for key in [k for k in self.state if k[2] <= self.closed_below]:
            del self.state[key]

    def snapshot(self, full: bool) -> dict[str, Any]:
        keys = self.state.keys() if full else self.dirty
        payload = {
            "offset": self.offset, "watermark": self.watermark, "full": full,
            "sources": self.source_closed, "closed_below": self.closed_below,
            "m": [[k[0], k[1], k[2], self.state[k]] for k in keys if k in self.state],
        }
        if self.alerts is not None:
            payload["alerts"] = self.alerts.snapshot()
        self.dirty = set()
        return payload

    def restore(self, payload: Mapping[str, Any]) -> None:
        if payload.get("full"):
            self.state.clear()
        for kec, metric, start, sources in payload.get("m", ()):
            self.state[(kec, metric, start)] = {s: list(v) for s, v in sources.items()}
        if self.alerts is not None and payload.get("alerts"):
            self.alerts.restore(payload["alerts"])
        self.offset = int(payload["offset"])
        self.watermark = int(payload["watermark"])
        # (a checkpoint of the previous version holds [previous, newest] watermarks: not proof of a
        # written checkpoint, so those sources count as heard from, closing nothing until they send again)
        self.source_closed = {str(k): v if isinstance(v, int) else -1
                              for k, v in (payload.get("sources") or {}).items()}
        self.closed_below = int(payload.get("closed_below", -1))
