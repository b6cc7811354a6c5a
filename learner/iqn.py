"""The implicit quantile network's learning rule on Ape-X (Dabney et al. 2018), with the options that
make it the seed's Rainbow-IQN (noisy layers, dueling; n-step and PER come from the architecture).

Double-DQN action selection (argmax of the online network's mean over K quantiles), N' target quantiles
from the target network, N online quantiles at the taken action, quantile-Huber loss (kappa) summed over
N and averaged over N'. The per-sample loss is the loss (IS-weighted) and the new priority, as the seed
does.
"""

from __future__ import annotations

import torch
from torch import nn

from apex_zmq.distributional import iqn_loss

from .dqn import Batch, DQNLearner


class IQNLearner(DQNLearner):
    """``DQNLearner`` with IQN's per-sample loss; fresh noise (if any) and taus every step."""

    def __init__(self, net: nn.Module, *args, n: int = 64, n_prime: int = 64, k: int = 32,
                 kappa: float = 1.0, **kwargs) -> None:
        super().__init__(net, *args, **kwargs)
        self.n, self.n_prime, self.k, self.kappa = n, n_prime, k, kappa

    def per_sample(self, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        loss = iqn_loss(self.net, self.target, b.obs, b.action, b.ret, b.disc, b.next_obs,
                        n=self.n, n_prime=self.n_prime, k=self.k, kappa=self.kappa)
        return loss, loss.detach()
