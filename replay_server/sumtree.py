"""A vectorized numpy sum-tree over a fixed number of slots."""

from __future__ import annotations

import numpy as np


def _dedup_sorted(a: np.ndarray) -> np.ndarray:
    """Unique values of an already-sorted array (cheaper than np.unique)."""
    if a.size <= 1:
        return a
    keep = np.empty(a.size, dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


class SumTree:
    """Binary sum-tree: leaf ``i`` holds a non-negative value, every inner node the sum below it.

    The tree is one float64 array of 2 * L nodes (L = capacity rounded up to a power of two),
    node 1 is the root, node j has children 2j and 2j+1, leaves start at node L. Every method
    takes and returns arrays so a batch of 512 costs one pass per tree level, not 512.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._leaves = 1 << max(0, (capacity - 1).bit_length())
        self._depth = self._leaves.bit_length() - 1
        self._tree = np.zeros(2 * self._leaves, dtype=np.float64)

    @property
    def total(self) -> float:
        """Sum of all leaves."""
        return float(self._tree[1]) if self._leaves > 1 else float(self._tree[1])

    def get(self, idx: np.ndarray) -> np.ndarray:
        """Leaf values at slots ``idx``."""
        return self._tree[np.asarray(idx, dtype=np.int64) + self._leaves]

    def leaves(self, start: int, stop: int) -> np.ndarray:
        """Leaf values of slots [start, stop), a copy (one slice: cheaper than ``get`` on a range)."""
        return self._tree[self._leaves + start:self._leaves + stop].copy()

    def set(self, idx: np.ndarray, values: np.ndarray) -> None:
        """Set leaves ``idx`` to ``values`` (for a repeated slot the last value wins)."""
        idx = np.asarray(idx, dtype=np.int64)
        values = np.asarray(values, dtype=np.float64)
        if idx.size == 0:
            return
        if idx.min() < 0 or idx.max() >= self.capacity:
            raise IndexError(f"slot out of range [0, {self.capacity})")
        if np.any(~np.isfinite(values)) or np.any(values < 0):
            raise ValueError("sum-tree values must be finite and non-negative")
        # Last write wins for duplicates: keep the final occurrence of each slot.
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        last = np.ones(sidx.size, dtype=bool)
        last[:-1] = sidx[1:] != sidx[:-1]
        nodes = sidx[last] + self._leaves
        self._tree[nodes] = values[order][last]
        nodes = _dedup_sorted(nodes >> 1)
        while nodes[0] >= 1:
            self._tree[nodes] = self._tree[2 * nodes] + self._tree[2 * nodes + 1]
            if nodes[0] == 1:
                break
            nodes = _dedup_sorted(nodes >> 1)

    def find(self, values: np.ndarray) -> np.ndarray:
        """For each prefix-sum target v in [0, total), the slot i with cumsum[i-1] <= v < cumsum[i].

        Same answer as ``np.searchsorted(np.cumsum(leaves), v, side='right')``.
        """
        v = np.array(values, dtype=np.float64, copy=True)
        node = np.ones(v.shape, dtype=np.int64)
        for _ in range(self._depth):
            node *= 2  # the left child
            left_sum = self._tree[node]
            right = v >= left_sum
            np.subtract(v, left_sum, out=v, where=right)
            node += right
        return node - self._leaves
