"""The two stages of the kecamatan aggregates (per-partition partials -> merge) under crashes at any
point, without Kafka: four source partitions and one merge partition run as the runtime runs them
(fold batches; at a checkpoint flush, deliver the outputs, write the state), with random crashes of
either stage, including in the middle of delivering a flush. Whatever happens, the last merged
aggregate of every kecamatan window equals the aggregate of the input (nothing lost, nothing twice).

This is what tests/chaos/test_worker_crash.py checks across processes; CI once saw its kecamatan
aggregates stay wrong after a SIGKILL: the merge closed a window on a source's watermark while the
restarted source was still going to send that window's partials again.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import orjson
import pytest

from schemas.envelope import TELEMETRY_TYPE
from stream_processors.outputs import Outputs
from stream_processors.region_merge import RegionMergePartition
from stream_processors.telemetry import TelemetryPartition
from stream_processors.validation import TimePolicy
from tests.helpers import Dev

T0 = 1_790_000_040_000
NOW = T0 + 3_600_000
SIZE, LATENESS, RETENTION = 60_000, 30_000, 3_600_000
SOURCES = 4
POLICY = TimePolicy(max_age_ms=10**12, max_future_ms=10**12)
KECS = ["35.09.01", "35.09.02", "35.09.03"]
REG = {f"d{i:02d}": Dev(f"d{i:02d}", "water_level", f"{KECS[i % 3]}.2001") for i in range(12)}
PARTIALS = "internal.region-partials"
TAIL = T0 + 1_200 * 500  # where the main input ends


def _input(rng: random.Random) -> tuple[list[list[bytes]], dict[tuple[str, int], list[float]]]:
    """Per source partition its log; the truth per (kecamatan, window): the readings' values."""
    logs: list[list[bytes]] = [[] for _ in range(SOURCES)]
    truth: dict[tuple[str, int], list[float]] = defaultdict(list)
    for i in range(1_200):
        dev = f"d{i % 12:02d}"
        t = T0 + i * 500 - rng.choice([0, 0, 0, 20_000])  # some late, all within the allowed lateness
        value = round(rng.uniform(0.5, 3.0), 3)
        env = orjson.dumps({"specversion": "1.0", "id": f"{dev}/{t}", "source": f"/jember/v1/{dev}",
                            "type": TELEMETRY_TYPE, "time": t, "subject": dev,
                            "data": {"values": {"waterLevel": value}}})
        part = int(dev[1:]) % SOURCES
        logs[part].append(env)
        if rng.random() < 0.05:
            logs[part].append(env)  # a QoS 1 repeat
        truth[(REG[dev].region_code[:8], t - t % SIZE)].append(value)
    return logs, truth


class Stage:
    """One partition of a stage as the runtime drives it: its processor, its position in its input,
    its last written checkpoint. A restart is a fresh processor restored from that checkpoint."""

    def __init__(self) -> None:
        self.checkpoint: bytes | None = None
        self.proc = self._fresh()
        self.next = 0

    def _fresh(self) -> Any:
        raise NotImplementedError

    def fold(self, log: list[bytes], n: int) -> None:
        out = Outputs()
        for offset in range(self.next, min(len(log), self.next + n)):
            self.proc.process(log[offset], offset, NOW, out)
            self.proc.offset = offset
            self.next = offset + 1

    def restart(self) -> None:
        self.proc = self._fresh()
        if self.checkpoint is not None:
            self.proc.restore(orjson.loads(self.checkpoint))
        self.next = self.proc.offset + 1


class Source(Stage):
    """One ingest partition; its flushes deliver partials to the merge's log."""

    def __init__(self, p: int) -> None:
        self.p = p
        super().__init__()

    def _fresh(self) -> TelemetryPartition:
        return TelemetryPartition(self.p, "jember.ingest", SIZE, LATENESS, POLICY, lambda: REG)

    def checkpoint_now(self, partials: list[bytes], crash_after: int | None = None) -> None:
        out = Outputs()
        self.proc.flush(out)
        sent = [v for t, _, v in out.records if t == PARTIALS]
        if crash_after is not None:  # the process dies while the flush is being delivered
            partials.extend(sent[:crash_after])
            self.restart()
            return
        partials.extend(sent)
        self.checkpoint = orjson.dumps(self.proc.snapshot(full=True))
        self.proc.checkpoint_written()


class Merge(Stage):
    """The merge partition; its flushes deliver kecamatan aggregates, upserted as the sink does."""

    def __init__(self) -> None:
        super().__init__()
        self.emitted: dict[tuple[str, int], dict] = {}  # the sink's upsert: the last value wins

    def _fresh(self) -> RegionMergePartition:
        return RegionMergePartition(0, PARTIALS, SIZE, LATENESS + RETENTION, lateness_ms=LATENESS,
                                    expected_sources=SOURCES)

    def checkpoint_now(self, crash_after: int | None = None) -> None:
        out = Outputs()
        self.proc.flush(out)
        sent = [orjson.loads(v) for t, _, v in out.records if t == "aggregates"]
        for agg in sent[:crash_after] if crash_after is not None else sent:
            self.emitted[(agg["key"], agg["window_start"])] = agg
        if crash_after is not None:
            self.restart()
            return
        self.checkpoint = orjson.dumps(self.proc.snapshot(full=True))


def _run(seed: int) -> tuple[Merge, dict[tuple[str, int], list[float]]]:
    rng = random.Random(seed)
    logs, truth = _input(rng)
    sources, merge, partials = [Source(p) for p in range(SOURCES)], Merge(), []
    while any(s.next < len(logs[s.p]) for s in sources) or merge.next < len(partials):
        roll = rng.random()
        s = rng.choice(sources)
        if roll < 0.45:
            s.fold(logs[s.p], rng.randint(1, 60))
        elif roll < 0.60:
            s.checkpoint_now(partials)
        elif roll < 0.64:
            s.checkpoint_now(partials, crash_after=rng.randint(0, 6))  # killed mid-delivery
        elif roll < 0.66:
            s.restart()  # killed between checkpoints
        elif roll < 0.88:
            merge.fold(partials, rng.randint(1, 40))
        elif roll < 0.97:
            merge.checkpoint_now()
        else:
            merge.checkpoint_now(crash_after=rng.randint(0, 4))
    # the stream goes on, without crashes: two more minutes of readings at every source, each folded
    # and checkpointed, so that every source's partials tell the merge how far it has checkpointed
    for minute in (1, 2):
        t = TAIL + minute * 3 * SIZE
        for s in sources:
            dev = f"d{s.p:02d}"
            logs[s.p].append(orjson.dumps({"specversion": "1.0", "id": f"{dev}/{t}", "source": f"/jember/v1/{dev}",
                                           "type": TELEMETRY_TYPE, "time": t, "subject": dev,
                                           "data": {"values": {"waterLevel": 1.0}}}))
            truth[(REG[dev].region_code[:8], t - t % SIZE)].append(1.0)
            s.fold(logs[s.p], 1)
            s.checkpoint_now(partials)
        merge.fold(partials, len(partials))
        merge.checkpoint_now()
    return merge, truth


@pytest.mark.parametrize("seed", range(60))
def test_merged_kecamatan_windows_equal_the_input_whatever_crashes(seed):
    merge, truth = _run(seed)
    got = {key: (agg["count"], round(agg["sum"], 6), agg["min"], agg["max"]) for key, agg in merge.emitted.items()}
    want = {key: (len(v), round(sum(v), 6), min(v), max(v)) for key, v in truth.items()}
    assert got == want
    held = sorted({start for _, _, start in merge.proc.state})
    # the main input's windows were dropped once every source had checkpointed past them, not kept
    # for the retention; the tail's are held until a checkpoint past them is heard of
    assert held == [TAIL + 3 * SIZE, TAIL + 6 * SIZE]
