"""What every covshift benchmark needs to be fair: a pinned allocator, alternation, medians, load.

Import this module before torch allocates anything (``import harness`` first thing in a script under
benchmarks/): it pins glibc's malloc, so that heap state does not move a ratio between two identical
modules (it did, by up to 1.38x in one process, before this).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import random
import statistics
import time
from typing import Callable, Sequence

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8


def pin_malloc() -> str:
    """Fix glibc malloc's adaptive behaviour for the whole run; returns what was done."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "malloc not pinned (no glibc mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Blocks below 32 MiB (the largest fixed threshold glibc allows) come from the heap, freed
    # memory is never returned to the OS, one arena: the allocator does the same thing every block.
    ok = all(
        mallopt(p, v)
        for p, v in ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20), (_M_ARENA_MAX, 1))
    )
    return "glibc malloc pinned (mmap threshold 32 MiB, no trim, top pad 64 MiB, 1 arena)" if ok else "mallopt refused"


MALLOC = pin_malloc()


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3, inner: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, called in a fresh random order ``repeats`` times.

    A new (seeded) permutation each round means no function always runs first, nor always right after
    the same other one (a fixed rotation let a slow function always cool the cache of the one after
    it); ``inner`` calls are timed together when one call is too short for the clock.
    """
    names = list(fns)
    order = random.Random(0)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        for n in order.sample(names, len(names)):
            f = fns[n]
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            times[n].append((time.perf_counter() - t0) / inner)
    return {n: statistics.median(ts) for n, ts in times.items()}


def geomean(values: Sequence[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))
