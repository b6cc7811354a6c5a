"""Handing freed memory back: a long-running role's resident memory must not keep what it freed."""

from __future__ import annotations

import pytest

from apex_zmq.memory import _libc, release_freed_memory


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(_libc() is None, reason="no glibc malloc_trim here")
def test_release_returns_fragmented_free_memory_to_the_system() -> None:
    # 96 MB of 1 KB blocks (malloc's, not pymalloc's), then all but one in 64 freed: the live blocks
    # pin the heap's pages, so the allocator keeps the freed ~94 MB resident until it is trimmed.
    blocks = [bytes(1024) for _ in range(96 * 1024)]
    keep = blocks[::64]
    del blocks
    held = _rss_mb()
    assert release_freed_memory()
    after = _rss_mb()
    assert held - after > 40, f"resident memory {held:.0f} MB before the release, {after:.0f} MB after"
    assert len(keep) == 1536
