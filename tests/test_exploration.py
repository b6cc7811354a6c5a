"""The Ape-X epsilon ladder eps_i = base ** (1 + alpha * i / (n - 1)) and batched epsilon-greedy."""

from __future__ import annotations

import numpy as np
import pytest

from apex_zmq.exploration import actor_epsilons, epsilon_greedy, epsilon_ladder

# n = 8, alpha = 7: the exponent is 1 + i, so eps_i = 0.4 ** (i + 1), written out by hand.
LADDER_8 = [0.4, 0.16, 0.064, 0.0256, 0.01024, 0.004096, 0.0016384, 0.00065536]


def test_ladder_hand_computed_n8():
    got = [epsilon_ladder(i, 8) for i in range(8)]
    np.testing.assert_allclose(got, LADDER_8, rtol=1e-12)


def test_ladder_endpoints_and_midpoint():
    # ends are base and base ** (1 + alpha) for any n > 1
    for n in (2, 3, 17, 256):
        assert epsilon_ladder(0, n) == pytest.approx(0.4, rel=1e-12)
        assert epsilon_ladder(n - 1, n) == pytest.approx(0.00065536, rel=1e-12)
    # n = 3, i = 1: 0.4 ** 4.5 = 0.0256 * sqrt(0.4) = 0.0256 * 0.63245553203...
    assert epsilon_ladder(1, 3) == pytest.approx(0.016190861620062, rel=1e-12)


def test_ladder_custom_base_alpha():
    # base 0.5, alpha 2, n 3: exponents 1, 2, 3
    assert [epsilon_ladder(i, 3, base=0.5, alpha=2.0) for i in range(3)] == [0.5, 0.25, 0.125]
    # alpha 0: every slot gets base
    assert [epsilon_ladder(i, 4, base=0.3, alpha=0.0) for i in range(4)] == [0.3] * 4


def test_ladder_single_slot_uses_base():
    assert epsilon_ladder(0, 1) == 0.4
    assert epsilon_ladder(0, 1, base=0.25, alpha=3.0) == 0.25


@pytest.mark.parametrize("i,n", [(-1, 4), (4, 4), (0, 0), (1, 1), (0, -2)])
def test_ladder_rejects_bad_slots(i, n):
    with pytest.raises(ValueError):
        epsilon_ladder(i, n)


@pytest.mark.parametrize("n", [2, 3, 8, 50, 256])
def test_ladder_strictly_decreasing_within_bounds(n):
    eps = np.array([epsilon_ladder(i, n) for i in range(n)])
    assert np.all(np.diff(eps) < 0)
    assert np.all((eps > 0) & (eps <= 0.4))


def test_actor_epsilons_hand_computed():
    # 4 actors x 2 envs = the n = 8 ladder; actor 2 owns slots 4 and 5
    np.testing.assert_allclose(actor_epsilons(2, 2, 4), [0.01024, 0.004096], rtol=1e-12)
    np.testing.assert_allclose(actor_epsilons(0, 2, 4), [0.4, 0.16], rtol=1e-12)
    assert actor_epsilons(0, 2, 4).dtype == np.float64


@pytest.mark.parametrize("num_actors,envs", [(4, 2), (8, 1), (1, 8), (2, 4)])
def test_actor_epsilons_tile_the_global_ladder(num_actors, envs):
    parts = [actor_epsilons(a, envs, num_actors) for a in range(num_actors)]
    assert all(p.shape == (envs,) for p in parts)
    np.testing.assert_allclose(np.concatenate(parts), LADDER_8, rtol=1e-12)


@pytest.mark.parametrize("num_actors,envs", [(3, 5), (5, 3), (7, 16)])
def test_actor_epsilons_concatenate_to_ladder(num_actors, envs):
    n = num_actors * envs
    full = np.array([epsilon_ladder(i, n) for i in range(n)])
    got = np.concatenate([actor_epsilons(a, envs, num_actors) for a in range(num_actors)])
    np.testing.assert_array_equal(got, full)
    assert np.unique(got).size == n  # no two slots share an epsilon


def test_actor_epsilons_custom_base_alpha():
    np.testing.assert_allclose(actor_epsilons(1, 1, 3, base=0.5, alpha=2.0), [0.25])


def test_single_env_single_actor():
    np.testing.assert_array_equal(actor_epsilons(0, 1, 1), [0.4])


# ----------------------------------------------------------------- epsilon_greedy


def test_greedy_when_eps_zero():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(500, 6))
    a = epsilon_greedy(q, np.zeros(500), rng)
    np.testing.assert_array_equal(a, q.argmax(axis=1))
    assert a.dtype == np.int64 and a.shape == (500,)


def test_uniform_when_eps_one():
    rng = np.random.default_rng(1)
    K, A = 60_000, 4
    q = np.tile(np.array([0.0, 0.0, 10.0, 0.0]), (K, 1))  # greedy would always pick 2
    a = epsilon_greedy(q, np.ones(K), rng)
    counts = np.bincount(a, minlength=A)
    assert counts.sum() == K and a.min() >= 0 and a.max() < A
    # each action 1/4: sd of a count ~ sqrt(K * 3/16) ~ 106; allow ~6 sd
    np.testing.assert_allclose(counts / K, 0.25, atol=0.011)
    # chi-square with 3 dof: 99.99th percentile ~ 21.1
    chi2 = ((counts - K / A) ** 2 / (K / A)).sum()
    assert chi2 < 21.1


def test_per_row_epsilons():
    rng = np.random.default_rng(2)
    K, A = 40_000, 5
    q = np.zeros((K, A))
    q[:, 3] = 1.0  # greedy = 3
    eps = np.where(np.arange(K) % 2 == 0, 0.0, 0.5)
    a = epsilon_greedy(q, eps, rng)
    assert np.all(a[0::2] == 3)  # eps 0 rows are always greedy
    # eps 0.5 rows pick the greedy action with prob 0.5 + 0.5 / 5 = 0.6
    frac = np.mean(a[1::2] == 3)
    assert abs(frac - 0.6) < 0.02
    others = a[1::2][a[1::2] != 3]
    np.testing.assert_allclose(np.bincount(others, minlength=A)[[0, 1, 2, 4]] / others.size, 0.25,
                               atol=0.02)


def test_seeded_rng_is_reproducible():
    q = np.random.default_rng(3).normal(size=(100, 4))
    eps = np.full(100, 0.5)
    a1 = epsilon_greedy(q, eps, np.random.default_rng(42))
    a2 = epsilon_greedy(q, eps, np.random.default_rng(42))
    np.testing.assert_array_equal(a1, a2)
    assert not np.array_equal(a1, q.argmax(axis=1))  # exploration actually happened
