"""Restarts seen from an actor: which learner weights it takes, and the seed of a restarted actor."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from actor.common import newer_weights
from apex_zmq.exploration import actor_seed

A, B = 0x1111_2222_3333, 0x4444_5555_6666  # two learner incarnations


# --------------------------------------------------------------------------- newer_weights


@pytest.mark.parametrize("have_inc,have_version,inc,version,take", [
    # the same learner: only newer versions
    (A, 100, A, 101, True),
    (A, 100, A, 100, False),   # the periodic republish of the weights it already has
    (A, 100, A, 99, False),    # an older one (a late message)
    (A, 100, A, 0, False),
    # another learner incarnation (a restart): taken whatever its version
    (A, 100, B, 5, True),      # restarted from an older checkpoint: counts from there
    (A, 100, B, 0, True),      # restarted with no checkpoint: counts from 0
    (A, 100, B, 100, True),
    (A, 100, B, 10**9, True),
    # an actor that has no weights yet (incarnation and version -1) takes the first it sees
    (-1, -1, A, 0, True),
    (-1, -1, 0, 0, True),
    # incarnation 0 is a valid id like any other
    (0, 7, 0, 7, False),
    (0, 7, 0, 8, True),
    (0, 7, A, 3, True),
])
def test_newer_weights_table(have_inc, have_version, inc, version, take):
    assert newer_weights(have_inc, have_version, inc, version) is take


def test_after_switching_incarnation_the_new_one_counts_from_its_own_versions():
    have = (A, 5000)
    seen = []
    for inc, version in [(A, 5001), (B, 10), (A, 5002), (B, 9), (B, 11), (B, 11), (B, 12)]:
        if newer_weights(*have, inc, version):
            have = (inc, version)
            seen.append(have)
    # A's late 5002 after B took over is another incarnation, so it is taken too (the incarnation
    # whose weights keep coming wins); B's repeated 11 is not newer than what B already gave.
    assert seen == [(A, 5001), (B, 10), (A, 5002), (B, 9), (B, 11), (B, 12)]


# --------------------------------------------------------------------------- actor_seed


@pytest.mark.parametrize("num_envs", [1, 8, 32, 256])
def test_actor_seed_differs_across_actors_and_restarts(num_envs):
    seeds = {(actor, restart): actor_seed(0, actor, restart, num_envs)
             for actor, restart in itertools.product(range(16), range(10))}
    assert len(set(seeds.values())) == len(seeds)
    # every restart of actor 0 plays other games than its first run did
    assert all(seeds[(0, r)] != seeds[(0, 0)] for r in range(1, 10))
    # and the base seed matters too
    assert actor_seed(1, 0, 0, num_envs) != actor_seed(0, 0, 0, num_envs)
    assert actor_seed(1, 2, 3, num_envs) != actor_seed(0, 2, 3, num_envs)


def test_actor_env_seed_ranges_do_not_overlap():
    """Env k of an actor gets seed + k: two actors' (or restarts') K consecutive seeds must not
    collide, otherwise two envs replay the same games."""
    K = 32
    starts = sorted(actor_seed(0, a, r, K) for a in range(32) for r in range(4))
    gaps = np.diff(starts)
    assert gaps.min() >= K


def test_actor_seed_is_deterministic_across_processes():
    args = [(0, 0, 0, 8), (0, 3, 2, 8), (12345, 7, 1, 32), (2**40, 1, 99, 1)]
    here = [actor_seed(*a) for a in args]
    assert here == [actor_seed(*a) for a in args]
    code = ("from apex_zmq.exploration import actor_seed; "
            f"print([actor_seed(*a) for a in {args!r}])")
    for hashseed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env=dict(os.environ, PYTHONHASHSEED=hashseed)).stdout
        assert out.strip() == repr(here)


@pytest.mark.parametrize("num_envs", [1, 2, 32, 1 << 20, (1 << 31) - 2])
def test_actor_seed_leaves_room_for_every_env_seed_in_int32(num_envs):
    bound = 2**31 - num_envs
    for base, actor, restart in itertools.product([0, 1, 2**31 - 1, 2**62], range(6), range(6)):
        s = actor_seed(base, actor, restart, num_envs)
        assert type(s) is int and 0 <= s < bound
        assert s + num_envs - 1 <= 2**31 - 1  # the last env's seed still fits ale-py's int32


def test_actor_seed_is_spread_over_the_range():
    seeds = np.array([actor_seed(0, a, r, 8) for a in range(50) for r in range(20)])
    # 1000 draws over [0, 2^31): both halves and the top eighth are well represented
    assert 400 < (seeds < 2**30).sum() < 600
    assert (seeds > 7 * 2**28).sum() > 60


def test_actor_core_seeds_its_envs_with_actor_seed():
    from actor.main import ActorCore
    from apex_zmq.config import ActorConfig

    def core(restart: int):
        return ActorCore(ActorConfig(env="CartPole-v1", actor_index=1, num_actors=2, envs_per_actor=3,
                                     hidden=16, restart=restart, acting_dtype="float32"))

    first, again, restarted = core(0), core(0), core(1)
    try:
        assert first.seed == actor_seed(0, 1, 0, 3) and restarted.seed == actor_seed(0, 1, 1, 3)
        o0, o1, o2 = (c.groups[0].obs for c in (first, again, restarted))
        np.testing.assert_array_equal(o0, o1)  # deterministic
        assert not np.allclose(o0, o2)  # a restart plays fresh games
        assert first.weights_incarnation == -1 and first.weights_version == -1
        first.set_weights(*_weights_of(first), version=3, incarnation=A)
        assert (first.weights_incarnation, first.weights_version) == (A, 3)
    finally:
        for c in (first, again, restarted):
            c.close()


def _weights_of(core):
    from apex_zmq.networks import state_arrays
    return state_arrays(core.net)
