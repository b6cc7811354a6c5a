"""Rainbow's learning rule on Ape-X (Hessel et al. 2018): C51 distributional dueling head with NoisyNet
layers, double-DQN action selection, n-step targets projected onto the support, prioritized replay.

The per-sample cross-entropy to the projected target is both the loss (weighted by the IS weights) and
the new priority, as in Kaixhin's Rainbow and the Rainbow-IQN Ape-X seed. The optimizer, target syncs,
clipping, mixed precision and checkpoint state are double DQN's (``DQNLearner``).
"""

from __future__ import annotations

import torch

from apex_zmq.distributional import rainbow_loss

from .dqn import Batch, DQNLearner


class RainbowLearner(DQNLearner):
    """``DQNLearner`` with Rainbow's per-sample loss; fresh noise in both networks every step."""

    def per_sample(self, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        self.resample_noise()
        loss = rainbow_loss(self.net, self.target, b.obs, b.action, b.ret, b.disc, b.next_obs)
        return loss, loss.detach()
