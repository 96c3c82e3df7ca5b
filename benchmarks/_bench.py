"""Helpers shared by the benchmarks: variants in turn, steady-state memory, atomic JSON results.

Rounds: every benchmark runs its variants in turn, round after round, and
reverses the order every other round (:func:`in_turn`), so no variant always
runs right after the same neighbour (whose cache and heap state it inherits).

Memory: keep freed blocks instead of returning them to the OS.

PyTorch's CPU tensors come from glibc's malloc. With its default settings a
freed block of several MB is handed back to the kernel (munmap, or a trimmed
heap) and the next allocation of that size faults in fresh zeroed pages:
thousands of page faults per call, at random depending on what ran before.
That noise is the allocator's, not any BN implementation's, so every variant
in these benchmarks runs with freed memory kept for reuse (what a caching
allocator such as jemalloc or tcmalloc gives a training loop anyway). Pass
``--system-malloc`` to measure with the defaults instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import time

from typing import Callable

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def seconds(fn: Callable, reps: int = 1, warm: bool = False) -> float:
    """Wall-clock seconds per call of ``fn``, over ``reps`` calls (after one untimed call if ``warm``)."""
    if warm:
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def in_turn(variants: dict, rounds: int, measure: Callable) -> dict:
    """``{label: [measure(fn) per round]}``, the variants in turn, order reversed every other round."""
    times = {label: [] for label in variants}
    items = list(variants.items())
    for r in range(rounds):
        for label, fn in items if r % 2 == 0 else reversed(items):
            times[label].append(measure(fn))
    return times


def keep_freed_memory() -> str:
    """Raise glibc's mmap and trim thresholds; return a line saying what was done."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024) == 1  # glibc's maximum on 64-bit
        ok = ok and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        return "system malloc (mallopt not available)"
    return "glibc malloc keeping freed blocks up to 32 MB" if ok else "glibc malloc, mallopt refused"


def write_json(path: str, data: dict) -> None:
    """Write ``data`` to ``path`` atomically (a killed run leaves the old file or none, never half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, path)
