"""The asynchronous family (Mnih et al. 2016, "Asynchronous Methods for Deep Reinforcement Learning"):
networks, returns, losses and gradient conversion, as pure functions with no sockets.

An actor-learner steps K envs for t_max steps, then computes the gradient of its algorithm's loss on
those t_max x K steps at the weights it acted with, and sends it to the learner (the parameter server).

Segments are [T, K] arrays in time order. With next-step autoreset (``envs.make_vector_env``) step t is a
transition (s_t, a_t, r_t, s_{t+1}) when ``valid[t]``; the step after an episode's end is the env's reset
step (``valid`` false: its action is ignored, it is masked out of every loss). s_{t+1} after a
terminated step is terminal (no bootstrap); after a truncated one it is the episode's last observation
(bootstrap from it).
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .envs import EnvSpec
from .torsos import build_torso, paper_conv_layers_for

def build_async_torso(spec: EnvSpec, hidden: int) -> nn.Module:
    """Mnih et al. 2016's torso: the paper's convolutions and ``hidden`` units for uint8 [C, H, W] images
    (smaller images: 3x3 convolutions), else a 2-layer MLP."""
    if len(spec.obs_shape) == 3:
        conv, features = build_torso(spec, hidden, convs=paper_conv_layers_for(spec.obs_shape))
        return nn.Sequential(conv, nn.Linear(features, hidden), nn.ReLU())
    return build_torso(spec, hidden, mlp_layers=2)[0]


class ActorCritic(nn.Module):
    """A3C's network: a shared torso, policy logits and a state value."""

    def __init__(self, spec: EnvSpec, hidden: int) -> None:
        super().__init__()
        self.torso = build_async_torso(spec, hidden)
        self.policy = nn.Linear(hidden, spec.num_actions)
        self.value = nn.Linear(hidden, 1)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, A], value [B])."""
        h = self.torso(obs)
        return self.policy(h), self.value(h).squeeze(1)

    def q(self, obs: torch.Tensor) -> torch.Tensor:
        """Action preferences for greedy evaluation (the evaluator and ``play`` take the argmax): the
        policy's logits, so greedy acting picks the policy's most likely action."""
        return self.forward(obs)[0]


class QWithTarget(nn.Module):
    """The Q algorithms' network: the online Q network and its target copy, held together so that the
    weights message (the state dict) carries both from the parameter server to the actor-learners.
    Only the online parameters are trainable; the evaluator and ``play`` act with the online one."""

    def __init__(self, spec: EnvSpec, hidden: int) -> None:
        super().__init__()
        self.online = nn.Sequential(build_async_torso(spec, hidden), nn.Linear(hidden, spec.num_actions))
        self.target = copy.deepcopy(self.online).requires_grad_(False)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.online(obs)

    def q(self, obs: torch.Tensor) -> torch.Tensor:
        return self.online(obs)

    @torch.no_grad()
    def sync_target(self) -> None:
        """Target network := online network."""
        self.target.load_state_dict(self.online.state_dict())


def build_async_network(spec: EnvSpec, hidden: int, algo: str) -> nn.Module:
    """``ActorCritic`` for a3c, ``QWithTarget`` for the Q algorithms."""
    return ActorCritic(spec, hidden) if algo == "a3c" else QWithTarget(spec, hidden)


def trainable(net: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter gradients are sent and applied for, in a fixed order."""
    return [(n, p) for n, p in net.named_parameters() if p.requires_grad]


# --------------------------------------------------------------------------- returns and targets


def segment_returns(rewards: torch.Tensor, terminated: torch.Tensor, cut: torch.Tensor, boot: torch.Tensor,
                    gamma: float) -> torch.Tensor:
    """Returns over a [T, K] segment: R_t = r_t + gamma (1 - term_t) x (boot_t if cut_t else R_{t+1}).

    ``boot`` [T, K] is the bootstrap value of s_{t+1}; ``cut`` says where the return stops accumulating
    and bootstraps instead (every step for one-step targets; for n-step ones a truncated episode's last
    step, and the segment's last step, where it is forced). A terminated step bootstraps from nothing.
    """
    T = rewards.shape[0]
    out = torch.empty_like(rewards)
    after = boot[T - 1]
    for t in range(T - 1, -1, -1):
        after = torch.where(cut[t] | (t == T - 1), boot[t], after)
        after = rewards[t] + gamma * (~terminated[t]).to(rewards.dtype) * after
        out[t] = after
    return out


def nstep_cut(truncated: torch.Tensor) -> torch.Tensor:
    """Where n-step returns bootstrap: truncated steps and the segment's last step."""
    cut = truncated.clone()
    cut[-1] = True
    return cut


# --------------------------------------------------------------------------- losses


def a3c_loss(logits: torch.Tensor, values: torch.Tensor, actions: torch.Tensor, returns: torch.Tensor,
             mask: torch.Tensor, entropy_beta: float, value_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A3C's loss averaged over the valid steps: -log pi(a|s) A - beta H(pi(s)) + value_coef (R - V)^2,
    with the advantage A = R - V(s) held constant in the policy term. Returns (loss, mean entropy)."""
    logp = F.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    advantage = returns - values
    per_step = (-logp.gather(1, actions[:, None]).squeeze(1) * advantage.detach()
                + value_coef * advantage.pow(2) - entropy_beta * entropy)
    m = mask.to(per_step.dtype)
    n = m.sum().clamp_min(1.0)
    return (per_step * m).sum() / n, ((entropy * m).sum() / n).detach()


def q_loss(q: torch.Tensor, actions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The Q algorithms' loss: (y - Q(s, a))^2 averaged over the valid steps (y held constant)."""
    err = targets.detach() - q.gather(1, actions[:, None]).squeeze(1)
    m = mask.to(err.dtype)
    return (err.pow(2) * m).sum() / m.sum().clamp_min(1.0)


def q_targets(algo: str, rewards: torch.Tensor, terminated: torch.Tensor, truncated: torch.Tensor,
              next_q_target: torch.Tensor, next_actions: torch.Tensor, gamma: float) -> torch.Tensor:
    """Targets y [T, K] of the Q algorithms from the target network's Q(s_{t+1}, .) [T, K, A]:
    nstep_q: n-step returns to the segment's end bootstrapped with max_a Q_target; onestep_q:
    r + gamma max_a Q_target(s', a); onestep_sarsa: r + gamma Q_target(s', a') with a' the action taken
    (chosen) at s'."""
    if algo == "onestep_sarsa":
        boot = next_q_target.gather(2, next_actions[..., None]).squeeze(2)
    else:
        boot = next_q_target.max(dim=2).values
    cut = nstep_cut(truncated) if algo == "nstep_q" else torch.ones_like(truncated)
    return segment_returns(rewards, terminated, cut, boot, gamma)


# --------------------------------------------------------------------------- gradients on the wire


def gradient_arrays(net: nn.Module, dtype: str = "float32") -> tuple[list[str], list[np.ndarray]]:
    """(names, arrays) of the trainable parameters' gradients, as the wire carries them: float32, or
    bfloat16 (rounded to nearest) as uint16 bit patterns."""
    names, arrays = [], []
    for name, p in trainable(net):
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        g = g.detach().to("cpu", torch.float32).contiguous()
        names.append(name)
        arrays.append(g.numpy().copy() if dtype == "float32" else
                      g.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).copy())
    return names, arrays


def gradient_tensors(arrays: Sequence[np.ndarray], dtype: str) -> list[torch.Tensor]:
    """The float32 tensors of a gradients message's arrays (``gradient_arrays``' inverse, bit exact)."""
    if dtype == "float32":
        return [torch.from_numpy(np.array(a, dtype=np.float32)) for a in arrays]
    return [torch.from_numpy(np.array(a, dtype=np.uint16).view(np.int16)).view(torch.bfloat16).float()
            for a in arrays]


def gradient_mismatch(net: nn.Module, names: Sequence[str], arrays: Sequence[np.ndarray]) -> str | None:
    """Why gradients do not fit ``net``'s trainable parameters (names, order, shapes), or None."""
    own = trainable(net)
    if [n for n, _ in own] != list(names):
        return f"gradients for {list(names)[:3]}..., the network trains {[n for n, _ in own][:3]}..."
    for (name, p), a in zip(own, arrays):
        if tuple(p.shape) != tuple(a.shape):
            return f"{name}: gradient shape {tuple(a.shape)}, parameter {tuple(p.shape)}"
    return None
