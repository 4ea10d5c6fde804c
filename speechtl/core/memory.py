"""Giving freed heap memory back to the system.

glibc's allocator keeps memory a process has freed for reuse, and with tensors of many
shapes (one batch of pieces after another through a long recording) what it keeps
grows: transcribing 20 minutes peaked 238 MB above 1 minute, where trimming the heap
after each batch holds the two within 5 % (benchmarks/README.md). :func:`trim_heap`
calls glibc's ``malloc_trim``; elsewhere (musl, macOS, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def trim_heap() -> bool:
    """Return the heap's free memory to the system (glibc); True where that was done."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True
