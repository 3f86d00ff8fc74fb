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
