"""SumTree: property tests against a brute-force numpy reference, plus small hand-drawn trees.

Leaf values are small integers or dyadic floats (k / 8), so every partial sum is exact in float64
and ``find`` must agree with ``np.searchsorted(np.cumsum(leaves), v, side='right')`` exactly,
even for queries that sit exactly on a prefix-sum boundary.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replay_server.sumtree import SumTree

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True)


def reference_find(leaves: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.cumsum(leaves), v, side="right")


def check_against_reference(tree: SumTree, leaves: np.ndarray, queries: np.ndarray) -> None:
    cap = leaves.size
    assert tree.total == leaves.sum()  # exact: values are integers / dyadic
    np.testing.assert_array_equal(tree.get(np.arange(cap)), leaves)
    # Every inner node holds the sum of its two children; padding leaves stay zero.
    t = tree._tree
    n_leaves = t.size // 2
    inner = np.arange(1, n_leaves)
    np.testing.assert_array_equal(t[inner], t[2 * inner] + t[2 * inner + 1])
    np.testing.assert_array_equal(t[n_leaves + cap:], 0.0)
    if leaves.sum() == 0:
        return
    got = tree.find(queries)
    np.testing.assert_array_equal(got, reference_find(leaves, queries))
    assert got.min() >= 0 and got.max() < cap
    assert np.all(leaves[got] > 0), "a zero-priority leaf was returned"


@st.composite
def tree_program(draw, dyadic: bool = False):
    cap = draw(st.integers(1, 70))
    value = st.integers(0, 20).map(lambda k: k / 8.0) if dyadic else st.integers(0, 20).map(float)
    batches = draw(st.lists(
        st.lists(st.tuples(st.integers(0, cap - 1), value), min_size=0, max_size=2 * cap + 3),
        min_size=1, max_size=6))
    fracs = draw(st.lists(st.floats(0.0, 1.0, exclude_max=True, allow_nan=False), min_size=1,
                          max_size=40))
    return cap, batches, fracs


def run_program(cap, batches, fracs, check_every_batch=True):
    tree = SumTree(cap)
    leaves = np.zeros(cap)
    for batch in batches:
        idx = np.array([i for i, _ in batch], dtype=np.int64)
        vals = np.array([v for _, v in batch], dtype=np.float64)
        tree.set(idx, vals)
        for i, v in batch:  # sequential writes: last write wins
            leaves[i] = v
        if check_every_batch:
            total = leaves.sum()
            queries = np.array(fracs) * total
            queries = queries[queries < total]
            check_against_reference(tree, leaves, queries)
    return tree, leaves


@SETTINGS
@given(tree_program())
def test_matches_bruteforce_integer_leaves(prog):
    run_program(*prog)


@SETTINGS
@given(tree_program(dyadic=True))
def test_matches_bruteforce_dyadic_leaves(prog):
    run_program(*prog)


@SETTINGS
@given(tree_program())
def test_find_at_every_boundary_and_midpoint(prog):
    """Queries exactly on cumsum boundaries go to the next non-zero leaf (side='right')."""
    tree, leaves = run_program(*prog, check_every_batch=False)
    total = leaves.sum()
    if total == 0:
        return
    grid = np.arange(0.0, total, 0.5)  # integers are boundaries or interior points; .5s interior
    boundaries = np.cumsum(leaves)
    boundaries = boundaries[boundaries < total]
    queries = np.concatenate([grid, boundaries, np.nextafter(boundaries, 0.0),
                              [np.nextafter(total, 0.0)]])
    check_against_reference(tree, leaves, queries)


def test_large_tree_random_queries():
    rng = np.random.default_rng(0)
    cap = 10_000
    tree = SumTree(cap)
    leaves = rng.integers(0, 5, size=cap).astype(np.float64)
    tree.set(np.arange(cap), leaves)
    # overwrite a random subset, with duplicates, in a second batch
    idx = rng.integers(0, cap, size=3000)
    vals = rng.integers(0, 5, size=3000).astype(np.float64)
    tree.set(idx, vals)
    for i, v in zip(idx, vals):
        leaves[i] = v
    queries = rng.random(5000) * leaves.sum()
    check_against_reference(tree, leaves, queries)


# ----------------------------------------------------------------- hand-drawn trees


def test_capacity_4_layout_and_find():
    tree = SumTree(4)
    tree.set(np.arange(4), np.array([1.0, 2.0, 3.0, 4.0]))
    # node 1 root, node j has children 2j, 2j+1, leaves at nodes 4..7
    np.testing.assert_array_equal(tree._tree, [0.0, 10.0, 3.0, 7.0, 1.0, 2.0, 3.0, 4.0])
    assert tree.total == 10.0
    q = np.array([0.0, 0.5, 0.999, 1.0, 2.9, 3.0, 5.99, 6.0, 9.99])
    np.testing.assert_array_equal(tree.find(q), [0, 0, 0, 1, 1, 2, 2, 3, 3])
    # scalar-ish and 0-d input
    assert int(tree.find(np.array([9.999]))[0]) == 3


def test_capacity_4_update_propagates():
    tree = SumTree(4)
    tree.set(np.arange(4), np.array([1.0, 2.0, 3.0, 4.0]))
    tree.set(np.array([1]), np.array([0.0]))
    np.testing.assert_array_equal(tree._tree, [0.0, 8.0, 1.0, 7.0, 1.0, 0.0, 3.0, 4.0])
    # the zero leaf 1 is skipped: v in [1, 4) now lands on leaf 2
    np.testing.assert_array_equal(tree.find(np.array([0.5, 1.0, 3.99, 4.0, 7.99])), [0, 2, 2, 3, 3])


def test_capacity_5_pads_to_8():
    tree = SumTree(5)
    tree.set(np.arange(5), np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert tree._tree.size == 16
    leaves = tree._tree[8:]
    np.testing.assert_array_equal(leaves, [1, 2, 3, 4, 5, 0, 0, 0])
    np.testing.assert_array_equal(tree._tree[4:8], [3, 7, 5, 0])
    np.testing.assert_array_equal(tree._tree[2:4], [10, 5])
    assert tree.total == 15.0
    q = np.array([0.0, 0.99, 1.0, 2.99, 3.0, 5.99, 6.0, 9.99, 10.0, 14.99, np.nextafter(15.0, 0)])
    np.testing.assert_array_equal(tree.find(q), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4])


def test_capacity_3_with_zero_middle_leaf():
    tree = SumTree(3)
    tree.set(np.array([0, 1, 2]), np.array([2.0, 0.0, 5.0]))
    np.testing.assert_array_equal(tree._tree, [0, 7, 2, 5, 2, 0, 5, 0])
    np.testing.assert_array_equal(tree.find(np.array([0.0, 1.99, 2.0, 6.99])), [0, 0, 2, 2])


def test_capacity_1():
    tree = SumTree(1)
    assert tree.total == 0.0
    tree.set(np.array([0]), np.array([3.5]))
    assert tree.total == 3.5
    np.testing.assert_array_equal(tree.get(np.array([0])), [3.5])
    np.testing.assert_array_equal(tree.find(np.array([0.0, 1.0, 3.49])), [0, 0, 0])
    tree.set(np.array([0, 0]), np.array([1.0, 2.0]))
    assert tree.total == 2.0


def test_last_write_wins_for_duplicates():
    tree = SumTree(6)
    tree.set(np.array([3, 1, 3, 5, 1, 3]), np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    np.testing.assert_array_equal(tree.get(np.arange(6)), [0, 5, 0, 6, 0, 4])
    assert tree.total == 15.0


def test_empty_set_is_noop():
    tree = SumTree(4)
    tree.set(np.array([2]), np.array([1.0]))
    tree.set(np.array([], dtype=np.int64), np.array([]))
    assert tree.total == 1.0


def test_total_zero_after_clearing():
    tree = SumTree(7)
    tree.set(np.arange(7), np.arange(7, dtype=np.float64))
    tree.set(np.arange(7), np.zeros(7))
    assert tree.total == 0.0
    np.testing.assert_array_equal(tree._tree, 0.0)


# ----------------------------------------------------------------- rejection


@pytest.mark.parametrize("cap", [0, -1])
def test_bad_capacity(cap):
    with pytest.raises(ValueError):
        SumTree(cap)


@pytest.mark.parametrize("idx", [[-1], [4], [0, 1, 100], [3, -2]])
def test_set_index_out_of_range_raises(idx):
    tree = SumTree(4)
    tree.set(np.arange(4), np.ones(4))
    before = tree._tree.copy()
    with pytest.raises(IndexError):
        tree.set(np.array(idx), np.full(len(idx), 2.0))
    np.testing.assert_array_equal(tree._tree, before)  # nothing was written


@pytest.mark.parametrize("bad", [-1.0, -1e-300, math.nan, math.inf, -math.inf])
def test_set_bad_value_raises(bad):
    tree = SumTree(5)
    tree.set(np.arange(5), np.ones(5))
    before = tree._tree.copy()
    with pytest.raises(ValueError):
        tree.set(np.array([0, 2, 4]), np.array([7.0, bad, 7.0]))
    np.testing.assert_array_equal(tree._tree, before)  # the good values were not written either
    assert tree.total == 5.0
