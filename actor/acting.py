"""How an actor acts with each learning rule's network, and what it keeps for initial priorities.

Every rule's actor greedy-acts on expected values Q(s, .) (epsilon-greedy on top with the ladder) and
stores per observation the outputs its rule's priority needs, so the initial priorities come from the
same forward pass that chose the actions, the actor's network standing in for online and target:

- dqn: Q [A] (from the acting copy: float32, bf16 or int8); priority |TD|.
- rainbow: log-probabilities [A, atoms]; Q = sum of atoms times probabilities; priority = the KL
  divergence of the projected target from the prediction (the learner's, not its cross-entropy loss).
- iqn: quantile values at K (``--iqn-k``) fresh taus, with the taus: [K, A + 1]; Q = their mean;
  priority = the quantile-Huber loss (rescaled to the learner's N quantiles).

Noisy networks resample their noise every step with an independent sample for every env slot
(``--exploration noisy|both``), or act with the mean weights (``ladder``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from apex_zmq import config as C
from apex_zmq.distributional import (
    expected_q,
    iqn_priorities_from_outputs,
    rainbow_priorities_from_outputs,
    resample_noise,
    sample_taus,
    set_noise,
)

from .nstep import PriorityFn, dqn_priorities


class Acting:
    """Double DQN's: the acting copy's Q values are the outputs."""

    def __init__(self, net: nn.Module, policy: nn.Module, num_actions: int) -> None:
        self.net, self.policy = net, policy
        self.out_shape: tuple[int, ...] = (num_actions,)
        self.priority_fn: PriorityFn = dqn_priorities

    @torch.no_grad()
    def outputs(self, obs: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """(Q [K, A] to act on, outputs [K, *out_shape] for the segment)."""
        q = self.policy(obs)
        return q, q.numpy()


class NoisyActing(Acting):
    """A network whose noisy layers (if any) are resampled per step and env slot, or switched off."""

    def __init__(self, net: nn.Module, noisy_exploration: bool, generator: torch.Generator) -> None:
        self.net, self.policy = net, net
        self.noisy, self.generator = noisy_exploration, generator
        set_noise(net, noisy_exploration)

    def _resample(self, rows: int) -> None:
        if self.noisy:
            resample_noise(self.net, rows, self.generator)


class RainbowActing(NoisyActing):
    def __init__(self, net: nn.Module, num_actions: int, atoms: int, noisy_exploration: bool,
                 generator: torch.Generator) -> None:
        super().__init__(net, noisy_exploration, generator)
        self.out_shape = (num_actions, atoms)
        self.priority_fn = lambda lo, lb, a, r, d: rainbow_priorities_from_outputs(lo, lb, a, r, d,
                                                                                   net.support.detach())

    @torch.no_grad()
    def outputs(self, obs: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        self._resample(len(obs))
        logp = self.net(obs)
        return expected_q(logp, self.net.support), logp.numpy()


class IQNActing(NoisyActing):
    def __init__(self, net: nn.Module, num_actions: int, k: int, learner_n: int, kappa: float,
                 noisy_exploration: bool, generator: torch.Generator) -> None:
        super().__init__(net, noisy_exploration, generator)
        # K taus both to act (their mean) and for the priority: the heads run once per tau, ~100M
        # multiply-adds each on Atari, so the actor does not pay for the learner's N = 64. The loss
        # sums over the N predicted quantiles; rescaled by N / K it is on the learner's scale.
        self.k = k
        self.out_shape = (k, num_actions + 1)  # the quantiles [K, A] and their taus as one more column
        A = num_actions
        self.priority_fn = lambda o, b, a, r, d: iqn_priorities_from_outputs(
            o[..., :A], o[..., A], b[..., :A], a, r, d, kappa, n=learner_n)

    @torch.no_grad()
    def outputs(self, obs: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        self._resample(len(obs))
        taus = sample_taus(len(obs), self.k, obs.device, self.generator)
        quant = self.net(obs, taus)  # [rows, K, A]
        out = torch.cat([quant, taus[..., None]], dim=2)
        return quant.mean(dim=1), out.numpy()


def make_acting(cfg: C.ActorConfig, net: nn.Module, policy: nn.Module, num_actions: int, seed: int) -> Acting:
    """The acting of ``cfg.algo`` (``policy``: dqn's acting copy; the others act with ``net`` itself)."""
    if cfg.algo == "dqn":
        return Acting(net, policy, num_actions)
    generator = torch.Generator().manual_seed(seed)
    noisy = C.exploration_of(cfg) in ("noisy", "both")
    if cfg.algo == "rainbow":
        return RainbowActing(net, num_actions, cfg.atoms, noisy, generator)
    return IQNActing(net, num_actions, cfg.iqn_k, cfg.iqn_n, cfg.kappa, noisy, generator)
