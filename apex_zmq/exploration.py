"""Exploration maths: the Ape-X epsilon ladder and batched epsilon-greedy."""

from __future__ import annotations

import numpy as np


def epsilon_ladder(i: int, n: int, base: float = 0.4, alpha: float = 7.0) -> float:
    """Epsilon of env slot ``i`` out of ``n`` slots in the run (Horgan et al. 2018, eq. 1).

    eps_i = base ** (1 + alpha * i / (n - 1)); a run with one slot uses ``base``.
    """
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"expected 0 <= i < n with n >= 1, got i={i}, n={n}")
    if n == 1:
        return base
    return base ** (1.0 + alpha * i / (n - 1))


def actor_epsilons(actor_index: int, envs_per_actor: int, num_actors: int,
                   base: float = 0.4, alpha: float = 7.0) -> np.ndarray:
    """Epsilons of one actor's env slots: slot ``actor_index * envs_per_actor + k`` of the run's ladder."""
    n = num_actors * envs_per_actor
    first = actor_index * envs_per_actor
    return np.array([epsilon_ladder(first + k, n, base, alpha) for k in range(envs_per_actor)],
                    dtype=np.float64)


def epsilon_greedy(q: np.ndarray, eps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-row epsilon-greedy actions from Q values ``q`` [K, A] and epsilons ``eps`` [K]."""
    greedy = q.argmax(axis=1)
    random = rng.integers(0, q.shape[1], size=q.shape[0])
    explore = rng.random(q.shape[0]) < eps
    return np.where(explore, random, greedy).astype(np.int64)


def actor_seed(base: int, actor_index: int, restart: int, num_envs: int) -> int:
    """Seed of one actor incarnation's envs (env k gets ``seed + k``) and exploration stream.

    Distinct for every (base, actor, restart): a restarted actor plays fresh games and draws fresh
    exploration noise instead of repeating what it sent before it crashed.
    """
    state = np.random.SeedSequence([base, actor_index, restart]).generate_state(1, dtype=np.uint32)[0]
    return int(state) % (2**31 - num_envs)  # env seeds seed..seed+K-1 stay in ale-py's int32 range


# Mnih et al. 2016: each actor-learner's final epsilon is drawn from these with these probabilities.
PAPER_FINAL_EPSILONS = (0.1, 0.01, 0.5)
PAPER_FINAL_PROBS = (0.4, 0.3, 0.3)


def draw_final_epsilons(rng: np.random.Generator, k: int) -> np.ndarray:
    """Final epsilons of ``k`` env slots, each drawn from {0.1, 0.01, 0.5} with {0.4, 0.3, 0.3}."""
    return rng.choice(np.array(PAPER_FINAL_EPSILONS), size=k, p=np.array(PAPER_FINAL_PROBS))


def annealed_epsilon(final: np.ndarray | float, frames: int, anneal_frames: int) -> np.ndarray | float:
    """Epsilon falling linearly from 1 to ``final`` over ``anneal_frames`` frames, then held there."""
    if anneal_frames <= 0:
        return final
    left = max(0.0, 1.0 - frames / anneal_frames)
    return final + (1.0 - final) * left
