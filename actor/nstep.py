"""n-step return maths over a segment of steps from K environments with next-step autoreset.

Both gymnasium vector envs and ale-py's AtariVectorEnv use *next-step* autoreset: the step that
ends an episode returns the final observation, and the following step ignores its action and
returns the first observation of the next episode with reward 0. Such a reset step is marked
``valid=False``: it starts no transition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .frames import Stack, stack_table


@dataclass
class NStepTargets:
    """n-step targets for each step (t, k) of a segment."""

    ret: np.ndarray    # [T, K] float32: sum_{i<m} gamma^i r_{t+i}, m = steps until bootstrap or end
    disc: np.ndarray   # [T, K] float32: gamma^m for bootstrapping, 0 after a termination
    boot: np.ndarray   # [T, K] int64: observation index (0..T) to bootstrap from
    done: np.ndarray   # [T, K] bool: the target is complete (known from this segment alone)


def nstep_targets(rewards: np.ndarray, terminated: np.ndarray, truncated: np.ndarray,
                  valid: np.ndarray, gamma: float, n: int) -> NStepTargets:
    """n-step targets over a segment of T steps from K envs.

    Observation index t is the observation at which step t's action was taken; step t leads to
    observation t+1. A transition that reaches an episode end after m <= n steps stops there: a
    termination gives discount 0, a truncation bootstraps from the final observation with gamma^m.
    Every valid step t <= T - n is complete; later steps may still be waiting for rewards.
    """
    T, K = rewards.shape
    t = np.arange(T)[:, None]
    ret = np.zeros((T, K), dtype=np.float64)
    disc = np.zeros((T, K), dtype=np.float64)
    boot = np.broadcast_to(t, (T, K)).copy()
    alive = valid.astype(bool).copy()
    done = ~alive  # invalid steps have nothing to wait for
    for i in range(n):
        idx = t + i
        in_range = np.broadcast_to(idx < T, (T, K))
        safe = np.minimum(idx, T - 1)
        active = alive & in_range
        r = np.take_along_axis(rewards, np.broadcast_to(safe, (T, K)), axis=0)
        ret += np.where(active, gamma ** i * r, 0.0)
        term = np.take_along_axis(terminated, np.broadcast_to(safe, (T, K)), axis=0) & active
        trunc = np.take_along_axis(truncated, np.broadcast_to(safe, (T, K)), axis=0) & active & ~term
        ended = term | trunc
        boot[ended] = np.broadcast_to(idx + 1, (T, K))[ended]
        disc[trunc] = gamma ** (i + 1)
        done |= ended
        alive &= ~ended
        if i == n - 1:
            reached = alive & np.broadcast_to(idx + 1 <= T, (T, K))
            boot[reached] = np.broadcast_to(idx + 1, (T, K))[reached]
            disc[reached] = gamma ** n
            done |= reached
    return NStepTargets(ret.astype(np.float32), disc.astype(np.float32), boot, done)


def initial_priorities(q: np.ndarray, actions: np.ndarray, targets: NStepTargets,
                       steps: np.ndarray, envs: np.ndarray) -> np.ndarray:
    """|TD| of transitions (steps[j], envs[j]) from the actor's own Q values.

    ``q`` is [T+1, K, A]: Q of every observation of the segment under the actor's network.
    TD = ret + disc * max_a Q(boot, a) - Q(obs, action).
    """
    return dqn_priorities(q[steps, envs], q[targets.boot[steps, envs], envs], actions[steps, envs],
                          targets.ret[steps, envs], targets.disc[steps, envs])


def dqn_priorities(q_obs: np.ndarray, q_boot: np.ndarray, actions: np.ndarray, ret: np.ndarray,
                   disc: np.ndarray) -> np.ndarray:
    """|TD| [M] from Q [M, A] at each transition's observation and at its bootstrap observation:
    TD = ret + disc * max_a Q(boot, a) - Q(obs, action)."""
    td = ret + disc * q_boot.max(axis=1) - q_obs[np.arange(len(actions)), actions]
    return np.abs(td).astype(np.float32)


# (outputs at the observations [M, ...], outputs at the bootstrap observations, actions [M], ret [M],
# disc [M]) -> initial priorities [M]: what each learning rule's actor computes from its own outputs.
PriorityFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class SegmentBuffer:
    """Collects the steps of K envs and turns every ``steps`` of them into one experience chunk.

    A segment holds L = steps + n - 1 steps and L + 1 observations. Rows 0..steps-1 are complete
    once the segment is full and are emitted; the last n - 1 steps (and n observations) are carried
    into the next segment, where they become complete. Observations are lz4-compressed as they
    arrive; every observation of the segment goes into the chunk's frame table once. Stacked
    observations may come as stacks of frame references (``actor.frames``): then every frame the
    segment's stacks refer to goes in once, and the chunk's indices are [n, S] (the wire's stack
    layout). A chunk stays self-contained: it carries the older frames of its first stacks again.
    """

    def __init__(self, num_envs: int, steps: int, n: int, gamma: float, num_actions: int,
                 out_shape: tuple[int, ...] | None = None, priority_fn: PriorityFn = dqn_priorities) -> None:
        """``out_shape``: what the actor's network gives per observation (default: Q [num_actions]);
        ``priority_fn`` turns those outputs into initial priorities (default: double DQN's |TD|)."""
        self.K, self.steps, self.n, self.gamma = num_envs, steps, n, gamma
        self.L = steps + n - 1
        L, K = self.L, num_envs
        self.priority_fn = priority_fn
        self.q = np.zeros((L + 1, K, *(out_shape or (num_actions,))), dtype=np.float32)
        self.actions = np.zeros((L, K), dtype=np.int64)
        self.rewards = np.zeros((L, K), dtype=np.float32)
        self.terminated = np.zeros((L, K), dtype=bool)
        self.truncated = np.zeros((L, K), dtype=bool)
        self.valid = np.zeros((L, K), dtype=bool)
        self.blobs: list[list[bytes] | list[Stack]] = []
        self.num_steps = 0

    @property
    def full(self) -> bool:
        """All L steps and L + 1 observations are in."""
        return len(self.blobs) == self.L + 1

    def add_obs(self, blobs: list[bytes] | list[Stack], q: np.ndarray) -> None:
        """The next observation of every env (compressed, or a stack of compressed frames) and the
        network's outputs for it [K, *out_shape] (Q values [K, A] for double DQN)."""
        if len(self.blobs) != self.num_steps:
            raise RuntimeError("add_obs and add_step must alternate, starting with add_obs")
        self.q[len(self.blobs)] = q
        self.blobs.append(blobs)

    def add_step(self, actions: np.ndarray, rewards: np.ndarray, terminated: np.ndarray,
                 truncated: np.ndarray, valid: np.ndarray) -> None:
        """The step taken at the latest observation."""
        t = self.num_steps
        if t >= self.L or len(self.blobs) != t + 1:
            raise RuntimeError("add_step needs a fresh observation and a segment that is not full")
        self.actions[t], self.rewards[t] = actions, rewards
        self.terminated[t], self.truncated[t], self.valid[t] = terminated, truncated, valid
        self.num_steps += 1

    def emit(self) -> dict[str, np.ndarray | list[bytes]]:
        """Transitions of the complete rows as chunk fields; carries the tail into the next segment."""
        if not self.full:
            raise RuntimeError("segment is not full")
        K, E = self.K, self.steps
        tg = nstep_targets(self.rewards, self.terminated, self.truncated, self.valid, self.gamma, self.n)
        rows, envs = np.nonzero(tg.done[:E] & self.valid[:E])
        blobs = [b for per_env in self.blobs for b in per_env]
        obs_at, next_at = rows * K + envs, tg.boot[rows, envs] * K + envs
        if blobs and isinstance(blobs[0], tuple):  # stacks of frame references: [n, S] indices
            blobs, table = stack_table(blobs)
            obs_idx, next_idx = table[obs_at], table[next_at]
        else:
            obs_idx, next_idx = obs_at.astype(np.int32), next_at.astype(np.int32)
        out = dict(
            blobs=blobs, obs_idx=obs_idx, next_idx=next_idx,
            action=self.actions[rows, envs].astype(np.int32),
            ret=tg.ret[rows, envs], disc=tg.disc[rows, envs],
            priority=self.priority_fn(self.q[rows, envs], self.q[tg.boot[rows, envs], envs],
                                      self.actions[rows, envs], tg.ret[rows, envs], tg.disc[rows, envs]))
        # Carry the last n - 1 steps and n observations.
        keep = self.L - E
        for a in (self.actions, self.rewards, self.terminated, self.truncated, self.valid):
            a[:keep] = a[E:]
        self.q[:keep + 1] = self.q[E:]
        self.blobs = self.blobs[E:]
        self.num_steps = keep
        return out
