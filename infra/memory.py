"""Process memory: keep a long-running service's RSS from ratcheting up after bursts.

glibc serves large allocations with mmap and returns them to the OS on free, but it raises its mmap
threshold to the size of each large block freed (up to 32 MB). After the worker frees one burst
(a full state snapshot: several MB of JSON, its 512 KB chunks and the producer's batches), later
blocks of that size come from the heap instead, and a fragmented heap is not given back: the soak saw
the worker's RSS step up by ~30 MB at a snapshot and stay there. A fixed threshold keeps large blocks
on mmap, so a burst's memory goes back when the burst is over.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # <malloc.h>; setting it also turns off glibc's dynamic adjustment


def fix_mmap_threshold(threshold_bytes: int = 256 * 1024) -> bool:
    """Pin glibc's mmap threshold (no-op elsewhere). True when set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or no libc to load: nothing to pin
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, threshold_bytes))
    if not ok:
        log.warning("mallopt(M_MMAP_THRESHOLD, %d) refused", threshold_bytes)
    return ok
