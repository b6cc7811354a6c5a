"""The learner's seam for learning rules (``--algo``).

A learning rule is the only part of the learner that knows the algorithm: it builds its networks, takes
one training step on a prioritized batch and returns the batch's new priorities and the loss (as device
tensors: ``step_tensors``; ``step`` reads them back), names the network the actors and the evaluator act
with (broadcast as weights), and gives the state a checkpoint keeps. The program (``learner.main``) wires sockets, loaders, checkpoints and telemetry around any rule,
so a new algorithm is a new file here plus a line in ``RULES``.

The asynchronous family (a3c, nstep_q, onestep_q, onestep_sarsa) has no batches to learn from: its rule
is the parameter server (``param_server.ParameterServer``), which applies the actor-learners' gradients
(``apply``) instead of taking ``step``s, and ``param_server.serve`` is its program; checkpoints, resume
and the weights it publishes go through the same ``LearnerCore``.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
import torch
from torch import nn

from apex_zmq import config as C
from apex_zmq.envs import EnvSpec
from apex_zmq.models import build_network

from .dqn import Batch, DQNLearner
from .iqn import IQNLearner
from .param_server import ParameterServer
from .rainbow import RainbowLearner


class LearningRule(Protocol):
    """What the learner program needs from an algorithm."""

    net: nn.Module  # the online network: its state is broadcast as weights (what the actors act with)
    steps: int      # training steps taken (the weights version)

    def step(self, b: Batch) -> tuple[np.ndarray, float]:
        """One training step on ``b``; returns (new priority per item of ``b.ids``, loss), read back."""

    def step_tensors(self, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``step`` without reading back: (new priority per item [B] float32, loss []) on the training
        device (the learner program copies them off it without waiting: ``readback``)."""

    def state_dict(self) -> dict:
        """Everything needed to resume (networks, optimizer, counters)."""

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict``."""


def _network(spec: EnvSpec, cfg: C.LearnerConfig, device: torch.device, channels_last: bool) -> nn.Module:
    net = build_network(spec, cfg.hidden, cfg.algo, **C.net_options(cfg)).to(device)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def _common(cfg: C.LearnerConfig, amp: bool) -> dict:
    # --compile: mode reduce-overhead, torch.compile's CUDA-graph mode (LearnerCore allows it on CUDA only)
    return dict(optimizer=cfg.optimizer, lr=cfg.lr, target_update=cfg.target_update, grad_clip=cfg.grad_clip,
                amp=amp, adam_eps=cfg.adam_eps, rmsprop_alpha=cfg.rmsprop_alpha, rmsprop_eps=cfg.rmsprop_eps,
                compile_options=dict(mode="reduce-overhead") if cfg.compile else None)


def build_dqn(spec: EnvSpec, cfg: C.LearnerConfig, device: torch.device, amp: bool,
              channels_last: bool) -> LearningRule:
    """Double DQN on the dueling network (Ape-X's learning rule)."""
    return DQNLearner(_network(spec, cfg, device, channels_last), **_common(cfg, amp))


def build_rainbow(spec: EnvSpec, cfg: C.LearnerConfig, device: torch.device, amp: bool,
                  channels_last: bool) -> LearningRule:
    """Rainbow: C51 dueling head, noisy layers (``--noisy``), cross-entropy priorities."""
    return RainbowLearner(_network(spec, cfg, device, channels_last), **_common(cfg, amp))


def build_iqn(spec: EnvSpec, cfg: C.LearnerConfig, device: torch.device, amp: bool,
              channels_last: bool) -> LearningRule:
    """IQN (dueling and noisy layers optional): quantile-Huber loss as loss and priority."""
    return IQNLearner(_network(spec, cfg, device, channels_last), **_common(cfg, amp), n=cfg.iqn_n,
                      n_prime=cfg.iqn_n_prime, k=cfg.iqn_k, kappa=cfg.kappa)


def build_async(spec: EnvSpec, cfg: C.LearnerConfig, device: torch.device, amp: bool,
                channels_last: bool) -> LearningRule:
    """The asynchronous family's parameter server (Mnih et al. 2016): gradients from the actor-learners
    applied with one shared RMSProp; the rule's loss is computed by the actor-learners."""
    return ParameterServer(_network(spec, cfg, device, channels_last), lr=cfg.lr, alpha=cfg.rmsprop_alpha,
                           eps=cfg.rmsprop_eps, grad_clip=cfg.grad_clip, target_update=cfg.target_update,
                           max_staleness=cfg.max_staleness)


RuleFactory = Callable[[EnvSpec, C.LearnerConfig, torch.device, bool, bool], LearningRule]
RULES: dict[str, RuleFactory] = {"dqn": build_dqn, "rainbow": build_rainbow, "iqn": build_iqn,
                                 **{name: build_async for name in C.ASYNC_ALGOS}}


def make_rule(spec: EnvSpec, cfg: C.LearnerConfig, device: torch.device, amp: bool = False,
              channels_last: bool = False) -> LearningRule:
    """The learning rule ``cfg.algo`` names, built for ``spec`` on ``device``."""
    if cfg.algo not in RULES:
        raise SystemExit(f"--algo {cfg.algo!r}: expected one of {sorted(RULES)}")
    return RULES[cfg.algo](spec, cfg, device, amp, channels_last)
