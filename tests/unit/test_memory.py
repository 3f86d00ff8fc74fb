"""infra/memory.py pins glibc's mmap threshold where there is a glibc (this machine and the image)."""

from __future__ import annotations

import platform
import sys

import pytest

from infra.memory import fix_mmap_threshold


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_pins_the_mmap_threshold_on_glibc() -> None:
    assert fix_mmap_threshold(256 * 1024) is True


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e6


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's")
def test_trim_gives_back_free_pages_between_live_blocks() -> None:
    from infra.memory import trim_heap

    blocks = [bytes(2000) + i.to_bytes(4, "little") for i in range(100_000)]  # ~200 MB of heap blocks
    keep = blocks[::100]  # one live block every ~200 KB: the heap cannot shrink from its top
    del blocks
    before = _rss_mb()
    assert trim_heap() is True
    after = _rss_mb()
    assert before - after > 50, f"RSS {before:.0f} MB -> {after:.0f} MB"
    assert len(keep) == 1000
