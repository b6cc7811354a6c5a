"""Handing freed memory back to the operating system, for roles that run for days."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from functools import cache


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> bool:
    """Collect cyclic garbage, then ask glibc's allocator to return its free pages (``malloc_trim(0)``,
    every arena). Work that allocates and frees a lot in a worker thread (matplotlib redrawing a figure)
    otherwise leaves fragmented free memory in that thread's arena, and resident memory creeps up by
    megabytes an hour. Returns False where the C library has no ``malloc_trim`` (musl, macOS)."""
    gc.collect()
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
