"""The soak, short (CI): `arus bench soak` with every component running at a steady rate; nothing lost,
RSS of gateway, worker and sink flat after warm-up. The long soak is the same command by hand
(`arus bench soak --minutes 30`; figures in docs/reliability.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_a_short_soak_loses_nothing_and_memory_stays_flat(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    # its own embedded services in a temporary directory (no ARUS_* service URLs passed on)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARUS_")}
    proc = subprocess.run(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "arus.cli", "bench", "soak", "--minutes", "2", "--soak-rate", "1000",
         "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540, check=False,
    )
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = orjson.loads(out.read_bytes())
    stage = figures["stages"]["soak"]
    assert figures["soak_lost_events"] == 0 and stage["lost_events"] == 0 and stage["lost_rows"] == 0, stage.get("error")
    assert stage["published"] >= 100_000  # 2 minutes at 1,000/s
    rss = stage["rss"]
    assert set(rss) == {"gateway", "worker", "sink"}
    # Two minutes is warm-up for the slope (the worker's windows fill for window + lateness = 11 min,
    # allocator arenas settle): here the bound is growth after the first quarter <= max(10 MB, 10 %),
    # which a leak of a few MB per minute breaks; the slope criterion (`flat`) is the long soak's.
    for name, r in rss.items():
        assert r["growth_mb"] <= max(10.0, 0.1 * r["rss_after_warmup_mb"]), (name, r)
    assert stage["max_worker_lag"] < 20_000 and stage["max_sink_lag"] < 20_000, (stage["max_worker_lag"],
                                                                                 stage["max_sink_lag"])
