"""Process memory: keep a long-running service's RSS from ratcheting up after bursts.

glibc serves large allocations with mmap and returns them to the OS on free, but it raises its mmap
threshold to the size of each large block freed (up to 32 MB). After the worker frees one burst
(a full state snapshot: several MB of JSON, its 512 KB chunks and the producer's batches), later
blocks of that size come from the heap instead, and a fragmented heap is not given back: the soak saw
the worker's RSS step up by ~30 MB at a snapshot and stay there. A fixed threshold keeps large blocks
on mmap, so a burst's memory goes back when the burst is over.

Medium blocks (under the threshold) still come from the heap, and free space between live chunks is
not given back either: the 30-minute soak's census (mallinfo2) saw the worker's heap hold ~30 MB in
use and 45–130 MB free after snapshot bursts, which was the RSS "growth". `trim_heap` (malloc_trim)
hands those free pages back; the worker calls it every few seconds (a few ms of CPU).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # <malloc.h>; setting it also turns off glibc's dynamic adjustment


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:  # no libc to load
        return None


def fix_mmap_threshold(threshold_bytes: int = 256 * 1024) -> bool:
    """Pin glibc's mmap threshold (no-op elsewhere). True when set."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:  # not glibc (musl, macOS): nothing to pin
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, threshold_bytes))
    if not ok:
        log.warning("mallopt(M_MMAP_THRESHOLD, %d) refused", threshold_bytes)
    return ok


def trim_heap() -> bool:
    """Give the heap's free pages back to the OS (glibc's malloc_trim(0), which also releases free
    pages between live chunks). False where there is no such call."""
    libc = _libc()
    malloc_trim = getattr(libc, "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    malloc_trim(0)
    return True
