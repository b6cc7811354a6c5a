"""Distributional value learning for Ape-X: noisy layers, C51 (Rainbow) and IQN networks and losses.

Shared by the learner (the per-sample losses, which are also the new priorities) and the actors (acting
on expected values, and initial priorities from the outputs the actor already computed while acting,
its own network standing in for both the online and the target network).

Conventions:
  * ``C51Dueling.forward`` returns log-probabilities [B, A, atoms] (log-softmax over atoms): the
    cross-entropy needs log p, and log(softmax) would underflow to -inf where log_softmax does not.
  * ``IQNNet.forward(obs, taus)`` returns quantile values [B, N, A] at ``taus`` [B, N].
  * The cosine embedding uses i = 1..n_cos (as Dopamine; the IQN paper writes i = 0..n-1, whose i = 0
    term is the constant 1, a duplicate of the embedding layer's bias).
  * The quantile-Huber loss of one sample is summed over the N predicted quantiles and averaged over
    the N' target quantiles (Dabney et al. 2018 eq. 3, as Dopamine and the seed system).
  * Per-sample losses come back unreduced, [B]: the learner weights them by the IS weights and means.
    The new priorities: IQN's detached loss (as the seed system); Rainbow's the KL divergence
    KL(m || p) = cross-entropy - H(m) (Hessel et al. 2018), not the cross-entropy it minimises.
  * Heads, embeddings, losses and priorities run in float32 with autocast disabled (as
    ``networks.Dueling``); only the torso may run in bf16 under autocast.
  * Noise: ``NoisyLinear`` noise buffers are not in the state dict (weights messages and checkpoints
    carry mu and sigma only); callers resample noise explicitly (``reset_noise``) and switch it off
    for evaluation (``set_noise(net, False)``: mu weights only). The losses never touch the noise.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .envs import EnvSpec
from .torsos import build_torso

DISTRIBUTIONAL_ALGOS = ("rainbow", "iqn")


# ----------------------------------------------------------------------------- noisy layers


def _sample(shape: tuple[int, ...], device: torch.device,
            generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise on ``device``, drawn from ``generator`` (on its own device) if given."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


class NoisyLinear(nn.Module):
    """A linear layer with factorised Gaussian noise (Fortunato et al. 2018, "Noisy Networks").

    W = mu_W + sigma_W * (f(e_out) f(e_in)^T), b = mu_b + sigma_b * f(e_out), f(x) = sign(x) sqrt|x|,
    e ~ N(0, 1). ``eps_in`` / ``eps_out`` hold the noise already passed through f.

    Two noise modes, chosen by ``reset_noise``:
      * ``reset_noise()``: one sample shared by every row (the learner: one noisy network per step);
      * ``reset_noise(batch=B)``: an independent sample per row of dim 0 (the actor: one per env slot),
        eps_in [B, in], eps_out [B, out]. The input must then have B rows ([B, in] or [B, ..., in],
        the noise of row b applied to all of x[b]). Computed without B weight matrices:
        y = x mu_W^T + ((x * eps_in) sigma_W^T) * eps_out + mu_b + sigma_b * eps_out.
    ``noise_enabled = False`` (``set_noise``) uses mu only: evaluation and ``play`` act noise-free.
    The noise buffers are non-persistent: not in the state dict, so the weights message has the same
    names and shapes whatever noise mode a network is in.
    """

    def __init__(self, in_features: int, out_features: int, sigma0: float = 0.5) -> None:
        super().__init__()
        self.in_features, self.out_features, self.sigma0 = in_features, out_features, sigma0
        self.weight_mu = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_sigma = nn.Parameter(torch.empty(out_features, in_features))
        self.bias_mu = nn.Parameter(torch.empty(out_features))
        self.bias_sigma = nn.Parameter(torch.empty(out_features))
        self.register_buffer("eps_in", torch.zeros(in_features), persistent=False)
        self.register_buffer("eps_out", torch.zeros(out_features), persistent=False)
        self.noise_enabled = True
        self.reset_parameters()
        self.reset_noise()

    def reset_parameters(self) -> None:
        """mu ~ U(-1/sqrt(in), 1/sqrt(in)), sigma = sigma0/sqrt(in) (the paper's factorised init)."""
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.weight_mu.uniform_(-bound, bound)
            self.bias_mu.uniform_(-bound, bound)
            self.weight_sigma.fill_(self.sigma0 / math.sqrt(self.in_features))
            self.bias_sigma.fill_(self.sigma0 / math.sqrt(self.in_features))

    @staticmethod
    def _f(x: torch.Tensor) -> torch.Tensor:
        return x.sign() * x.abs().sqrt()

    def reset_noise(self, batch: int | None = None, generator: torch.Generator | None = None) -> None:
        """Resample the noise: one shared sample (``batch=None``) or one per row of a ``batch``."""
        lead = () if batch is None else (int(batch),)
        device, dtype = self.weight_mu.device, self.weight_mu.dtype  # follows .to(device / dtype)
        self.eps_in = self._f(_sample((*lead, self.in_features), device, generator)).to(dtype)
        self.eps_out = self._f(_sample((*lead, self.out_features), device, generator)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.noise_enabled:
            return F.linear(x, self.weight_mu, self.bias_mu)
        if self.eps_in.dim() == 1:
            # Shared noise: one [out, in] weight is cheaper than a second matmul over the batch.
            weight = self.weight_mu + self.weight_sigma * torch.outer(self.eps_out, self.eps_in)
            return F.linear(x, weight, self.bias_mu + self.bias_sigma * self.eps_out)
        rows = self.eps_in.shape[0]
        if x.dim() < 2 or x.shape[0] != rows:
            raise ValueError(f"per-row noise for {rows} rows, input has shape {tuple(x.shape)}: "
                             f"call reset_noise(batch={x.shape[0] if x.dim() else 1}) first")
        view = (rows,) + (1,) * (x.dim() - 2)  # row b's noise over every x[b, ...]
        e_in, e_out = self.eps_in.view(*view, -1), self.eps_out.view(*view, -1)
        return (F.linear(x, self.weight_mu, self.bias_mu)
                + (F.linear(x * e_in, self.weight_sigma) + self.bias_sigma) * e_out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, sigma0={self.sigma0}"


def noisy_layers(net: nn.Module) -> list[NoisyLinear]:
    """Every ``NoisyLinear`` in ``net``'s module tree."""
    return [m for m in net.modules() if isinstance(m, NoisyLinear)]


def set_noise(net: nn.Module, enabled: bool) -> None:
    """Turn the noise of every noisy layer in ``net`` on or off (off: act with the mu weights)."""
    for m in noisy_layers(net):
        m.noise_enabled = enabled


def resample_noise(net: nn.Module, batch: int | None = None,
                   generator: torch.Generator | None = None) -> None:
    """``reset_noise(batch, generator)`` on every noisy layer in ``net`` (a no-op without any)."""
    for m in noisy_layers(net):
        m.reset_noise(batch, generator)


def resample_shared_noise(layers: list[NoisyLinear], in_place: bool = False) -> None:
    """``reset_noise()`` (one sample for the whole batch) on each of ``layers``, drawn as one tensor:
    the same distribution in a few kernels, not a dozen per layer (a learner step resamples 8 layers).
    ``in_place``: copied into the noise buffers of the shared shape (a step captured in CUDA graphs reads
    them at fixed addresses), at one more kernel per buffer; else the buffers become views of the draw."""
    if not layers:
        return
    w = layers[0].weight_mu
    sizes = [n for m in layers for n in (m.in_features, m.out_features)]
    eps = NoisyLinear._f(torch.randn(sum(sizes), device=w.device)).to(w.dtype).split(sizes)
    for i, m in enumerate(layers):
        if in_place and m.eps_in.shape == eps[2 * i].shape and m.eps_out.shape == eps[2 * i + 1].shape:
            m.eps_in.copy_(eps[2 * i])
            m.eps_out.copy_(eps[2 * i + 1])
        else:
            m.eps_in, m.eps_out = eps[2 * i], eps[2 * i + 1]


def _linear(in_features: int, out_features: int, noisy: bool, sigma0: float) -> nn.Module:
    return NoisyLinear(in_features, out_features, sigma0) if noisy else nn.Linear(in_features, out_features)


def _mlp_head(features: int, hidden: int, out: int, noisy: bool, sigma0: float) -> nn.Sequential:
    return nn.Sequential(_linear(features, hidden, noisy, sigma0), nn.ReLU(),
                         _linear(hidden, out, noisy, sigma0))


class _NoiseMixin:
    """``reset_noise`` / ``set_noise`` over the network's noisy layers."""

    def reset_noise(self, batch: int | None = None, generator: torch.Generator | None = None) -> None:
        """Resample the noise of every noisy layer: shared (``batch=None``) or per row of ``batch``."""
        resample_noise(self, batch, generator)  # type: ignore[arg-type]

    def set_noise(self, enabled: bool) -> None:
        """Noise on, or off (mu weights only: evaluation, ``play``)."""
        set_noise(self, enabled)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- C51


def expected_q(log_probs: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Expected values sum_z z p(z) from log-probabilities [..., atoms] over ``support`` [atoms]."""
    return (log_probs.float().exp() * support.float()).sum(-1)


def categorical_projection(next_probs: torch.Tensor, ret: torch.Tensor, disc: torch.Tensor,
                           support: torch.Tensor) -> torch.Tensor:
    """Project the distribution of ret + disc * Z onto ``support`` (Bellemare et al. 2017, Alg. 1).

    next_probs [B, atoms] are Z's probabilities on ``support`` (evenly spaced, vmin..vmax); ret, disc
    [B] (disc = gamma^n, 0 after a termination). Tz = clamp(ret + disc z, vmin, vmax) lands at
    b = (Tz - vmin)/dz between atoms l = floor(b) and l + 1, which share its mass linearly. A b that is
    exactly an atom keeps all of its mass there (the l == u case that loses mass if done naively).
    Returns [B, atoms] float32 probabilities (each row sums to that of ``next_probs``).
    """
    p = next_probs.float()
    z = support.float()
    atoms = z.shape[0]
    vmin, vmax = z[0], z[-1]
    dz = (vmax - vmin) / (atoms - 1)
    tz = torch.clamp(ret.float()[:, None] + disc.float()[:, None] * z[None, :], vmin, vmax)
    b = (tz - vmin) / dz
    low = b.floor().clamp(0, atoms - 1)
    frac = b - low  # in [0, 1): the upper neighbour's share; 0 when b is exactly an atom
    low_i = low.long()
    up_i = (low_i + 1).clamp(max=atoms - 1)  # at b = atoms-1, frac = 0: nothing goes past the end
    m = torch.zeros_like(p)
    m.scatter_add_(1, low_i, p * (1.0 - frac))
    m.scatter_add_(1, up_i, p * frac)
    return m


def categorical_loss(logits_sa: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Cross-entropy -sum_i m_i log p_i per sample, [B], of logits (or log-probabilities: log_softmax
    leaves those unchanged) [B, atoms] against target probabilities m [B, atoms] (treated as constant)."""
    return -(target_probs.detach().float() * F.log_softmax(logits_sa.float(), dim=-1)).sum(-1)


def categorical_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy -sum_i m_i log m_i per row, [B] float32, with 0 log 0 = 0 (a projected target has empty atoms)."""
    p = probs.detach().float()
    return -torch.special.xlogy(p, p).sum(-1)


def categorical_kl(cross_entropy: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """KL(m || p) = cross-entropy - H(m) per sample, [B], from ``categorical_loss``' cross-entropy (detached).

    Rainbow prioritises by the KL divergence (Hessel et al. 2018): the cross-entropy adds the target's
    entropy H(m), which is large for a diffuse target whatever the prediction, and would rank a
    well-predicted wide distribution above a badly predicted narrow one. Rounding can leave a KL of
    ~-1e-7 where p = m: clamped at 0 (a priority must not be negative).
    """
    return (cross_entropy.detach().float() - categorical_entropy(target_probs)).clamp_min(0.0)


class C51Dueling(_NoiseMixin, nn.Module):
    """Dueling distributional head (C51, Rainbow) on a feature torso.

    logits(s, a) = V(s) + A(s, a) - mean_a A(s, a), each [atoms]; p(s, a) = softmax over atoms.
    ``forward`` returns log-probabilities [B, A, atoms]; ``q`` the expected values [B, A].
    ``support`` (a buffer, so it travels with the weights) holds the atoms' values vmin..vmax.
    """

    def __init__(self, torso: nn.Module, features: int, hidden: int, num_actions: int, atoms: int = 51,
                 vmin: float = -10.0, vmax: float = 10.0, noisy: bool = True, sigma0: float = 0.5) -> None:
        super().__init__()
        if atoms < 2 or not vmin < vmax:
            raise ValueError(f"C51 needs atoms >= 2 and vmin < vmax, got {atoms}, [{vmin}, {vmax}]")
        self.torso = torso
        self.num_actions, self.atoms = num_actions, atoms
        self.value = _mlp_head(features, hidden, atoms, noisy, sigma0)
        self.advantage = _mlp_head(features, hidden, num_actions * atoms, noisy, sigma0)
        self.register_buffer("support", torch.linspace(vmin, vmax, atoms))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        h = self.torso(obs)  # bf16 under autocast
        # Heads, softmax and everything downstream in float32 (see networks.Dueling).
        with torch.autocast(h.device.type, enabled=False):
            h = h.float()
            v = self.value(h).view(-1, 1, self.atoms)
            a = self.advantage(h).view(-1, self.num_actions, self.atoms)
            return F.log_softmax(v + a - a.mean(dim=1, keepdim=True), dim=-1)

    def q(self, obs: torch.Tensor) -> torch.Tensor:
        """Expected values [B, A] (what the actors act greedily on)."""
        return expected_q(self(obs), self.support)


# ----------------------------------------------------------------------------- IQN


def cosine_embedding(taus: torch.Tensor, n_cos: int = 64, freq: torch.Tensor | None = None) -> torch.Tensor:
    """cos(pi i tau) for i = 1..n_cos: [B, N] -> [B, N, n_cos] float32 (Dopamine's range; the paper's
    i = 0 term is a constant, redundant with the embedding layer's bias). ``freq``: the pi i already
    computed (``IQNNet.freq``), else computed here."""
    if freq is None:
        freq = _frequencies(n_cos, taus.device)
    return torch.cos(taus.float()[..., None] * freq)


def _frequencies(n_cos: int, device: torch.device | str | None = None) -> torch.Tensor:
    """pi i for i = 1..n_cos, float32: the cosine embedding's frequencies."""
    return (math.pi * torch.arange(1, n_cos + 1, dtype=torch.float64)).to(device, torch.float32)


def sample_taus(batch: int, n: int, device: torch.device | str,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Quantile fractions tau ~ U(0, 1), [batch, n] on ``device`` (drawn on ``generator``'s device)."""
    if generator is None:
        return torch.rand(batch, n, device=device)
    return torch.rand(batch, n, generator=generator, device=generator.device).to(device)


def quantile_huber_loss(pred: torch.Tensor, target: torch.Tensor, taus: torch.Tensor,
                        kappa: float = 1.0) -> torch.Tensor:
    """Quantile-Huber loss per sample, [B] (Dabney et al. 2018 eq. 3).

    pred [B, N]: predicted quantiles at ``taus`` [B, N]; target [B, N'] (treated as constant).
    u_ij = target_j - pred_i; rho_ij = |tau_i - 1{u_ij < 0}| * Huber_kappa(u_ij) / kappa;
    loss = sum_i mean_j rho_ij (summed over N, averaged over N'). ``kappa = 0``: the plain quantile
    loss |tau - 1{u < 0}| |u| (the limit of Huber_kappa / kappa).
    """
    u = target.detach().float()[:, None, :] - pred.float()[:, :, None]  # [B, N, N']
    abs_u = u.abs()
    if kappa > 0:
        huber = torch.where(abs_u <= kappa, 0.5 * u * u, kappa * (abs_u - 0.5 * kappa)) / kappa
    else:
        huber = abs_u
    weight = (taus.float()[:, :, None] - (u.detach() < 0).float()).abs()
    return (weight * huber).mean(dim=2).sum(dim=1)


class IQNNet(_NoiseMixin, nn.Module):
    """Implicit quantile network (Dabney et al. 2018) on a feature torso.

    Z_tau(s, a): torso features h [B, F] times phi(tau) = ReLU(Linear(cos embedding -> F)), then the
    head(s): dueling (V + A - mean A, per tau) or a single MLP, noisy or not. ``forward(obs, taus)``
    returns quantile values [B, N, A]; ``q`` the mean over k sampled taus, [B, A].
    """

    def __init__(self, torso: nn.Module, features: int, hidden: int, num_actions: int, n_cos: int = 64,
                 dueling: bool = True, noisy: bool = False, sigma0: float = 0.5) -> None:
        super().__init__()
        self.torso = torso
        self.num_actions, self.n_cos, self.dueling = num_actions, n_cos, dueling
        # The embedding stays a plain layer (as Rainbow-IQN): exploration noise belongs to the heads.
        self.embed = nn.Linear(n_cos, features)
        # A constant, so not in the state dict: computed once rather than every forward.
        self.register_buffer("freq", _frequencies(n_cos), persistent=False)
        if dueling:
            self.value = _mlp_head(features, hidden, 1, noisy, sigma0)
            self.advantage = _mlp_head(features, hidden, num_actions, noisy, sigma0)
        else:
            self.head = _mlp_head(features, hidden, num_actions, noisy, sigma0)

    def _quantiles(self, h: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        """Quantile values [B, N, A] from float32 torso features ``h`` [B, 1, F] at ``taus`` [B, N]."""
        phi = torch.relu(self.embed(cosine_embedding(taus, freq=self.freq)))  # [B, N, F]
        x = h * phi
        if not self.dueling:
            return self.head(x)
        a = self.advantage(x)  # [B, N, A]
        return self.value(x) + a - a.mean(dim=-1, keepdim=True)

    def forward(self, obs: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        h = self.torso(obs)  # bf16 under autocast: computed once, shared by the N taus
        with torch.autocast(h.device.type, enabled=False):
            return self._quantiles(h.float()[:, None, :], taus)

    def forward_pair(self, obs: torch.Tensor, taus: torch.Tensor, obs2: torch.Tensor,
                     taus2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward(obs, taus)`` and, without gradients, ``forward(obs2, taus2)``, with one torso call
        over both batches (on a small network a call's fixed cost outweighs its arithmetic; the heads run
        apart so that the backward pass covers the first batch's quantiles only). Noisy layers must hold
        shared noise (the learner's), not per-row noise for one batch."""
        b = obs.shape[0]
        h = self.torso(torch.cat([obs, obs2]))
        with torch.autocast(h.device.type, enabled=False):
            h = h.float()[:, None, :]
            with torch.no_grad():
                quant2 = self._quantiles(h[b:], taus2)
            return self._quantiles(h[:b], taus), quant2

    def q(self, obs: torch.Tensor, k: int = 32, generator: torch.Generator | None = None) -> torch.Tensor:
        """Expected values [B, A]: the mean of the quantile values at k taus ~ U(0, 1) per row."""
        taus = sample_taus(obs.shape[0], k, obs.device, generator)
        return self(obs, taus).mean(dim=1)


# ----------------------------------------------------------------------------- building


def build_distributional_network(spec: EnvSpec, hidden: int, algo: str, *, atoms: int = 51,
                                 vmin: float = -10.0, vmax: float = 10.0, noisy: bool = True,
                                 sigma0: float = 0.5, n_cos: int = 64,
                                 dueling: bool = True) -> C51Dueling | IQNNet:
    """The network for ``algo``: "rainbow" (C51, dueling; ``atoms``, ``vmin``, ``vmax``) or "iqn"
    (``n_cos``, ``dueling``). Noisy heads by default for both (Rainbow; Rainbow-IQN Ape-X)."""
    if algo not in DISTRIBUTIONAL_ALGOS:
        raise ValueError(f"algo must be one of {DISTRIBUTIONAL_ALGOS}, got {algo!r}")
    torso, features = build_torso(spec, hidden)
    if algo == "rainbow":
        return C51Dueling(torso, features, hidden, spec.num_actions, atoms, vmin, vmax, noisy, sigma0)
    return IQNNet(torso, features, hidden, spec.num_actions, n_cos, dueling, noisy, sigma0)


# ----------------------------------------------------------------------------- losses (learner)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(x.shape[0], device=x.device)


def _c51_target(logp_next_select: torch.Tensor, logp_next_target: torch.Tensor, ret: torch.Tensor,
                disc: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Double-DQN C51 target [B, atoms]: a* = argmax of the expected values under
    ``logp_next_select`` [B, A, atoms], its distribution under ``logp_next_target``, projected."""
    best = expected_q(logp_next_select, support).argmax(dim=1)
    p_next = logp_next_target[_rows(logp_next_target), best].float().exp()
    return categorical_projection(p_next, ret, disc, support)


def rainbow_loss_and_priority(online: C51Dueling, target: C51Dueling, obs: torch.Tensor, action: torch.Tensor,
                              ret: torch.Tensor, disc: torch.Tensor,
                              next_obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample C51 cross-entropy [B] float32, its KL divergence [B] detached: the new priority), with
    double-DQN action selection: a* = argmax of the online network's expected Q at next_obs, target
    distribution m = target network's at (next_obs, a*) projected through ret + disc z. The loss is
    differentiable in ``online``'s parameters only (its gradient is the KL's: H(m) is a constant).
    Noise is whatever the networks currently hold (resample it before)."""
    with torch.no_grad():
        m = _c51_target(online(next_obs), target(next_obs), ret, disc, online.support)
    loss = categorical_loss(online(obs)[_rows(obs), action], m)
    return loss, categorical_kl(loss, m)


def rainbow_loss(online: C51Dueling, target: C51Dueling, obs: torch.Tensor, action: torch.Tensor,
                 ret: torch.Tensor, disc: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
    """The per-sample C51 cross-entropy [B] of ``rainbow_loss_and_priority`` (the loss alone)."""
    return rainbow_loss_and_priority(online, target, obs, action, ret, disc, next_obs)[0]


def _gather_action(quant: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """quant [B, N, A] at action [B] -> [B, N]."""
    return quant.gather(2, action.long()[:, None, None].expand(-1, quant.shape[1], 1)).squeeze(2)


def _iqn_target(quant_select: torch.Tensor, quant_target: torch.Tensor, ret: torch.Tensor,
                disc: torch.Tensor) -> torch.Tensor:
    """ret + disc Z_tau'(s', a*) [B, N'], a* = argmax of the mean of ``quant_select`` [B, K, A]."""
    best = quant_select.float().mean(dim=1).argmax(dim=1)
    z = _gather_action(quant_target.float(), best)
    return ret.float()[:, None] + disc.float()[:, None] * z


def iqn_loss(online: IQNNet, target: IQNNet, obs: torch.Tensor, action: torch.Tensor, ret: torch.Tensor,
             disc: torch.Tensor, next_obs: torch.Tensor, n: int = 64, n_prime: int = 64, k: int = 32,
             kappa: float = 1.0, generator: torch.Generator | None = None,
             taus: torch.Tensor | None = None, taus_prime: torch.Tensor | None = None,
             taus_k: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample quantile-Huber loss [B] (float32) with double-DQN action selection.

    a* = argmax of the online network's mean over k taus at next_obs; targets ret + disc Z'_tau'
    from the target network at n_prime taus; predictions from the online network at (obs, action)
    at n taus. Taus not passed are drawn from ``generator`` in the order taus_k, taus_prime, taus.
    Differentiable in ``online``'s parameters only; the detached loss is the new priority.
    """
    b, dev = obs.shape[0], obs.device
    with torch.no_grad():
        taus_k = sample_taus(b, k, dev, generator) if taus_k is None else taus_k
        taus_prime = sample_taus(b, n_prime, dev, generator) if taus_prime is None else taus_prime
        quant_target = target(next_obs, taus_prime)
    taus = sample_taus(b, n, dev, generator) if taus is None else taus
    quant, quant_select = online.forward_pair(obs, taus, next_obs, taus_k)
    y = _iqn_target(quant_select, quant_target, ret, disc)
    return quantile_huber_loss(_gather_action(quant, action), y, taus, kappa)


# ----------------------------------------------------------------------------- priorities (actor)


def _tensor(x: np.ndarray | torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.as_tensor(x).to(dtype)


@torch.no_grad()
def rainbow_priorities_from_outputs(logp_obs: np.ndarray | torch.Tensor, logp_boot: np.ndarray | torch.Tensor,
                                    actions: np.ndarray | torch.Tensor, ret: np.ndarray | torch.Tensor,
                                    disc: np.ndarray | torch.Tensor,
                                    support: np.ndarray | torch.Tensor) -> np.ndarray:
    """Initial priorities [M] float32 from outputs the actor already has: ``C51Dueling`` log-probs
    [M, A, atoms] at each transition's observation and at its bootstrap observation: the KL divergence
    of ``rainbow_loss_and_priority`` with one network as online and target (equal to it, noise off)."""
    lo, lb = _tensor(logp_obs), _tensor(logp_boot)
    m = _c51_target(lb, lb, _tensor(ret), _tensor(disc), _tensor(support))
    kl = categorical_kl(categorical_loss(lo[_rows(lo), _tensor(actions, torch.long)], m), m)
    return kl.cpu().numpy().astype(np.float32)


@torch.no_grad()
def iqn_priorities_from_outputs(quant_obs: np.ndarray | torch.Tensor, taus_obs: np.ndarray | torch.Tensor,
                                quant_boot: np.ndarray | torch.Tensor, actions: np.ndarray | torch.Tensor,
                                ret: np.ndarray | torch.Tensor, disc: np.ndarray | torch.Tensor,
                                kappa: float = 1.0, n: int | None = None) -> np.ndarray:
    """Initial priorities [M] float32 from outputs the actor already has: ``IQNNet`` quantile values
    [M, N, A] at each observation (at ``taus_obs`` [M, N]) and [M, N', A] at its bootstrap
    observation (any taus). The bootstrap quantiles both select a* (their mean) and give the
    targets: ``iqn_loss`` with one network as online and target and taus_k = taus_prime.

    The loss is a sum over the N predicted quantiles, so its scale grows with N: pass the learner's
    ``n`` to rescale by n / N when the actor acts with fewer taus than the learner trains with.
    """
    qo = _tensor(quant_obs)
    loss = quantile_huber_loss(_gather_action(qo, _tensor(actions, torch.long)),
                               _iqn_target(_tensor(quant_boot), _tensor(quant_boot), _tensor(ret),
                                           _tensor(disc)),
                               _tensor(taus_obs), kappa)
    if n is not None:
        loss = loss * (n / qo.shape[1])
    return loss.cpu().numpy().astype(np.float32)
