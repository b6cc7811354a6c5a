"""One learner step of each replay rule (dqn, rainbow, iqn) against figures computed by hand.

Stub networks with known outputs: observations are state indices 0..3, and each network looks its
outputs up in a table (Q values, atom probabilities, or quantile functions linear in tau). The online
and target tables differ, and the online network's greedy action at each next state is not the target's,
so evaluating with the wrong network, or selecting with the target (no double DQN), changes the figures.
The IS weights are [1, 0.25] and the learning rate 0 (the tables stay put). The expected losses and
priorities are written out here with plain loops: the C51 projection atom by atom, the quantile-Huber
loss pair by pair with the taus the test hands the learner.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from apex_zmq import distributional
from apex_zmq.distributional import build_distributional_network, iqn_loss, noisy_layers, rainbow_loss
from apex_zmq.envs import EnvSpec
from learner.dqn import Batch, DQNLearner
from test_distributional import _projection_reference
from learner.iqn import IQNLearner
from learner.rainbow import RainbowLearner

WEIGHTS = [1.0, 0.25]
OBS, ACTION, NEXT_OBS = [0, 1], [1, 0], [2, 3]
RET, DISC = [0.3, -0.4], [0.81, 0.9]


def _batch() -> Batch:
    return Batch(obs=torch.tensor(OBS, dtype=torch.float32)[:, None], action=torch.tensor(ACTION),
                 ret=torch.tensor(RET), disc=torch.tensor(DISC),
                 next_obs=torch.tensor(NEXT_OBS, dtype=torch.float32)[:, None], weight=torch.tensor(WEIGHTS),
                 ids=np.arange(2))


def _weighted_mean(losses: list[float]) -> float:
    return sum(w * x for w, x in zip(WEIGHTS, losses)) / len(losses)


def _argmax(xs: list[float]) -> int:
    best = max(xs)
    assert sum(x == best for x in xs) == 1, "a tie: the test's tables must pick one action"
    return xs.index(best)


def _state(obs: torch.Tensor) -> torch.Tensor:
    return obs.long().view(-1)


# ----------------------------------------------------------------------------- dqn

# Q[s][a]. At s' = 2 the online network prefers action 0, the target action 1; at s' = 3 the reverse.
Q_ONLINE = [[0.5, 1.5], [2.0, -1.0], [3.0, 1.0], [0.0, 2.0]]
Q_TARGET = [[9.0, 9.0], [9.0, 9.0], [0.5, 4.0], [5.0, -2.0]]


class QTable(nn.Module):
    """Q(s, .) = table[s]."""

    def __init__(self, table: list[list[float]]) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.table[_state(obs)]


def _huber(x: float) -> float:
    return 0.5 * x * x if abs(x) <= 1.0 else abs(x) - 0.5


def test_dqn_step_is_the_weighted_huber_of_double_dqn_n_step_errors() -> None:
    learner = DQNLearner(QTable(Q_ONLINE), "adam", lr=0.0, target_update=1000, grad_clip=40.0)
    learner.target.table.data.copy_(torch.tensor(Q_TARGET))
    td = []
    for s, a, r, d, s2 in zip(OBS, ACTION, RET, DISC, NEXT_OBS):
        best = _argmax(Q_ONLINE[s2])  # selected by the online network, valued by the target
        td.append(r + d * Q_TARGET[s2][best] - Q_ONLINE[s][a])
    prios, loss = learner.step(_batch())
    np.testing.assert_allclose(prios, [abs(x) for x in td], rtol=1e-6)
    assert loss == pytest.approx(_weighted_mean([_huber(x) for x in td]), rel=1e-6)
    assert torch.equal(learner.net.table.detach(), torch.tensor(Q_ONLINE))  # lr 0


# ----------------------------------------------------------------------------- rainbow

SUPPORT = [-2.0, -1.0, 0.0, 1.0, 2.0]
# Atom probabilities P[s][a]. Expected values at s' = 2: online a0 -0.6 < a1 0.6 (picks 1), target picks 0;
# at s' = 3: online a0 0.9 > a1 -0.9 (picks 0), target picks 1.
P_ONLINE = [
    [[0.1, 0.2, 0.4, 0.2, 0.1], [0.3, 0.1, 0.1, 0.2, 0.3]],
    [[0.05, 0.15, 0.2, 0.25, 0.35], [0.2, 0.2, 0.2, 0.2, 0.2]],
    [[0.4, 0.2, 0.2, 0.1, 0.1], [0.1, 0.1, 0.2, 0.2, 0.4]],
    [[0.05, 0.05, 0.2, 0.3, 0.4], [0.5, 0.2, 0.1, 0.1, 0.1]],
]
P_TARGET = [
    [[0.2] * 5, [0.2] * 5],
    [[0.2] * 5, [0.2] * 5],
    [[0.1, 0.1, 0.1, 0.2, 0.5], [0.6, 0.2, 0.1, 0.05, 0.05]],
    [[0.7, 0.1, 0.1, 0.05, 0.05], [0.0, 0.05, 0.05, 0.1, 0.8]],
]


class C51Table(nn.Module):
    """log p(s, a, .) = log_softmax(table[s, a]), the table holding log-probabilities; the C51 support."""

    def __init__(self, probs: list) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.tensor(probs).clamp_min(1e-12).log())
        self.register_buffer("support", torch.tensor(SUPPORT))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.table[_state(obs)], dim=-1)


def _project(p: list[float], ret: float, disc: float) -> list[float]:
    """Bellemare et al. 2017, Algorithm 1, one atom at a time (test_distributional's reference)."""
    return _projection_reference(np.asarray(p), ret, disc, np.asarray(SUPPORT)).tolist()


def _rainbow_by_hand() -> tuple[list[float], list[float]]:
    """(cross-entropies, KL divergences) of the two samples."""
    ces, kls = [], []
    for s, a, r, d, s2 in zip(OBS, ACTION, RET, DISC, NEXT_OBS):
        means = [sum(z * p for z, p in zip(SUPPORT, P_ONLINE[s2][b])) for b in range(2)]
        m = _project(P_TARGET[s2][_argmax(means)], r, d)
        ce = -sum(mi * math.log(pi) for mi, pi in zip(m, P_ONLINE[s][a]) if mi > 0)
        entropy = -sum(mi * math.log(mi) for mi in m if mi > 0)
        assert entropy > 0.1  # diffuse targets: the KL is not the cross-entropy
        ces.append(ce)
        kls.append(ce - entropy)
    return ces, kls


def test_rainbow_step_loss_is_the_weighted_cross_entropy_and_priorities_the_kl() -> None:
    learner = RainbowLearner(C51Table(P_ONLINE), "adam", lr=0.0, target_update=1000, grad_clip=40.0)
    learner.target.table.data.copy_(C51Table(P_TARGET).table.data)
    ces, kls = _rainbow_by_hand()
    prios, loss = learner.step(_batch())
    assert prios.dtype == np.float32
    np.testing.assert_allclose(prios, kls, rtol=1e-5, atol=1e-6)
    assert loss == pytest.approx(_weighted_mean(ces), rel=1e-5)
    prios2, loss2 = learner.step(_batch())  # lr 0: the same step again
    np.testing.assert_allclose(prios2, prios, rtol=1e-6)


# ----------------------------------------------------------------------------- iqn

# Quantile functions linear in tau: Z_tau(s, a) = BASE[s][a] + SCALE[s][a] * tau.
IQN_ONLINE = ([[0.2, -0.5], [1.0, 0.4], [2.0, 1.0], [0.0, 0.5]],
              [[1.0, 2.0], [0.5, 3.0], [0.0, 0.4], [1.0, 0.2]])
IQN_TARGET = ([[0.0, 0.0], [0.0, 0.0], [-1.0, 3.0], [2.5, -1.5]],
              [[1.0, 1.0], [1.0, 1.0], [2.0, 1.0], [0.5, 3.0]])
# Three draws per step, each size its own: K (select a*), N' (targets), N (predictions), [B, size].
TAUS_K = [[0.3, 0.6], [0.2, 0.9]]
TAUS_PRIME = [[0.1, 0.5, 0.95], [0.35, 0.65, 0.8]]
TAUS = [[0.05, 0.25, 0.7, 0.9], [0.15, 0.4, 0.6, 0.99]]


class IQNTable(nn.Module):
    """Quantile values [B, N, A] at taus [B, N]: BASE[s] + SCALE[s] tau."""

    def __init__(self, tables: tuple[list, list]) -> None:
        super().__init__()
        self.base, self.scale = (nn.Parameter(torch.tensor(t)) for t in tables)

    def forward(self, obs: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
        s = _state(obs)
        return self.base[s][:, None, :] + self.scale[s][:, None, :] * taus[:, :, None]

    def forward_pair(self, obs, taus, obs2, taus2):  # IQNNet's interface: the second without gradients
        with torch.no_grad():
            second = self(obs2, taus2)
        return self(obs, taus), second


def _z(tables: tuple[list, list], s: int, a: int, tau: float) -> float:
    return tables[0][s][a] + tables[1][s][a] * tau


def _iqn_by_hand(kappa: float) -> list[float]:
    losses = []
    for i, (s, a, r, d, s2) in enumerate(zip(OBS, ACTION, RET, DISC, NEXT_OBS)):
        means = [sum(_z(IQN_ONLINE, s2, b, t) for t in TAUS_K[i]) / len(TAUS_K[i]) for b in range(2)]
        best = _argmax(means)
        targets = [r + d * _z(IQN_TARGET, s2, best, t) for t in TAUS_PRIME[i]]
        total = 0.0
        for tau in TAUS[i]:
            pred = _z(IQN_ONLINE, s, a, tau)
            rho = 0.0
            for y in targets:
                u = y - pred
                huber = 0.5 * u * u if abs(u) <= kappa else kappa * (abs(u) - 0.5 * kappa)
                rho += abs(tau - (1.0 if u < 0 else 0.0)) * huber / kappa
            total += rho / len(targets)  # summed over the N predictions, averaged over the N' targets
        losses.append(total)
    return losses


@pytest.fixture
def known_taus(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``sample_taus`` hands out TAUS_K / TAUS_PRIME / TAUS by the number asked for; returns the sizes asked."""
    asked: list[int] = []
    by_size = {len(t[0]): torch.tensor(t) for t in (TAUS_K, TAUS_PRIME, TAUS)}

    def fake(batch: int, n: int, device, generator=None) -> torch.Tensor:
        asked.append(n)
        assert batch == 2 and n in by_size
        return by_size[n].clone()
    monkeypatch.setattr(distributional, "sample_taus", fake)
    return asked


def _iqn_learner(kappa: float) -> IQNLearner:
    learner = IQNLearner(IQNTable(IQN_ONLINE), "adam", 0.0, 1000, 40.0, n=len(TAUS[0]),
                         n_prime=len(TAUS_PRIME[0]), k=len(TAUS_K[0]), kappa=kappa)
    learner.target.base.data.copy_(torch.tensor(IQN_TARGET[0]))
    learner.target.scale.data.copy_(torch.tensor(IQN_TARGET[1]))
    return learner


@pytest.mark.parametrize("kappa", [1.0, 2.0])
def test_iqn_step_is_the_weighted_quantile_huber_loss_at_the_drawn_taus(known_taus: list[int],
                                                                        kappa: float) -> None:
    expected = _iqn_by_hand(kappa)
    prios, loss = _iqn_learner(kappa).step(_batch())
    assert sorted(known_taus) == [2, 3, 4]  # one draw of each: K, N', N
    np.testing.assert_allclose(prios, expected, rtol=1e-5)
    assert loss == pytest.approx(_weighted_mean(expected), rel=1e-5)


def test_iqn_kappa_reaches_the_loss(known_taus: list[int]) -> None:
    one, two = _iqn_by_hand(1.0), _iqn_by_hand(2.0)
    assert abs(_weighted_mean(one) - _weighted_mean(two)) > 0.05  # the tables put errors past kappa = 1
    _, loss = _iqn_learner(2.0).step(_batch())
    assert loss == pytest.approx(_weighted_mean(two), rel=1e-5)


# ----------------------------------------------------------------------------- noise

VECTOR = EnvSpec("CartPole-v1", (4,), "float32", 2, False)


@pytest.mark.parametrize("algo,rule", [("rainbow", RainbowLearner), ("iqn", IQNLearner)])
def test_noisy_learners_draw_fresh_noise_in_both_networks_every_step_and_use_it(
        monkeypatch: pytest.MonkeyPatch, algo: str, rule: type) -> None:
    torch.manual_seed(5)
    net = build_distributional_network(VECTOR, 8, algo, atoms=11, vmin=-3, vmax=3, noisy=True)
    kw = dict(n=4, n_prime=3, k=2) if algo == "iqn" else {}
    learner = rule(net, "adam", 0.0, 1000, 40.0, **kw)
    drawn: dict[int, torch.Tensor] = {}  # iqn's taus of the last step, by their number (4, 3, 2: N, N', K)
    sample = distributional.sample_taus

    def keep(batch: int, n: int, device, generator=None) -> torch.Tensor:
        drawn[n] = sample(batch, n, device, generator)
        return drawn[n]
    monkeypatch.setattr(distributional, "sample_taus", keep)
    g = torch.Generator().manual_seed(6)
    b = Batch(obs=torch.randn(6, 4, generator=g), action=torch.randint(0, 2, (6,), generator=g),
              ret=torch.randn(6, generator=g), disc=torch.full((6,), 0.9), next_obs=torch.randn(6, 4, generator=g),
              weight=torch.ones(6), ids=np.arange(6))

    def noise(m: nn.Module) -> list[torch.Tensor]:
        return [t.clone() for layer in noisy_layers(m) for t in (layer.eps_in, layer.eps_out)]
    assert noise(learner.net) and noise(learner.target)
    seen = []
    for _ in range(3):
        _, loss = learner.step(b)
        online, target = noise(learner.net), noise(learner.target)
        assert all(not torch.equal(x, y) for x, y in zip(online, target))  # independent draws
        for prev_online, prev_target in seen:
            assert all(not torch.equal(x, y) for x, y in zip(online, prev_online))
            assert all(not torch.equal(x, y) for x, y in zip(target, prev_target))
        seen.append((online, target))
        # The step's loss is the one with the noise it left in the networks: drawn before, not after.
        with torch.no_grad():
            if algo == "rainbow":
                again = rainbow_loss(learner.net, learner.target, b.obs, b.action, b.ret, b.disc, b.next_obs)
            else:
                again = iqn_loss(learner.net, learner.target, b.obs, b.action, b.ret, b.disc, b.next_obs,
                                 taus=drawn[4], taus_prime=drawn[3], taus_k=drawn[2])
        assert loss == pytest.approx(float(again.mean()), rel=1e-5)
