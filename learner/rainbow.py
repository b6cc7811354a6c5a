"""Rainbow's learning rule on Ape-X (Hessel et al. 2018): C51 distributional dueling head with NoisyNet
layers, double-DQN action selection, n-step targets projected onto the support, prioritized replay.

The per-sample cross-entropy to the projected target is the loss (weighted by the IS weights); the new
priority is its KL divergence, cross-entropy less the target's entropy (Hessel et al. 2018 prioritise by
the KL loss; Kaixhin's Rainbow and the seed system use the cross-entropy, which ranks any diffuse target
high however well it is predicted). The optimizer, target syncs, clipping, mixed precision and checkpoint
state are double DQN's (``DQNLearner``).
"""

from __future__ import annotations

import torch

from apex_zmq.distributional import rainbow_loss_and_priority

from .dqn import Batch, DQNLearner


class RainbowLearner(DQNLearner):
    """``DQNLearner`` with Rainbow's loss and KL priorities; fresh noise in both networks every step."""

    def per_sample(self, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return rainbow_loss_and_priority(self.net, self.target, b.obs, b.action, b.ret, b.disc, b.next_obs)
