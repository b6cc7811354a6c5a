"""Distributional maths and networks (Rainbow / IQN) against plain references written out here."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from apex_zmq.distributional import (
    C51Dueling,
    IQNNet,
    NoisyLinear,
    build_distributional_network,
    categorical_loss,
    categorical_projection,
    cosine_embedding,
    expected_q,
    iqn_loss,
    iqn_priorities_from_outputs,
    noisy_layers,
    quantile_huber_loss,
    rainbow_loss,
    rainbow_loss_and_priority,
    rainbow_priorities_from_outputs,
    resample_shared_noise,
    sample_taus,
    set_noise,
)
from apex_zmq.envs import EnvSpec

ATARI = EnvSpec("ALE/Pong-v5", (4, 84, 84), "uint8", 6, True)
VECTOR = EnvSpec("CartPole-v1", (4,), "float32", 2, False)


def _obs(spec: EnvSpec, n: int, g: torch.Generator) -> torch.Tensor:
    if spec.obs_dtype == "uint8":
        return torch.randint(0, 256, (n, *spec.obs_shape), generator=g, dtype=torch.uint8)
    return torch.randn(n, *spec.obs_shape, generator=g)


# ----------------------------------------------------------------------------- C51 projection


def _projection_reference(p: np.ndarray, ret: float, disc: float, z: np.ndarray) -> np.ndarray:
    """Bellemare et al. 2017, Algorithm 1, one atom at a time."""
    vmin, vmax, atoms = z[0], z[-1], len(z)
    dz = (vmax - vmin) / (atoms - 1)
    m = np.zeros(atoms)
    for j in range(atoms):
        tz = min(max(ret + disc * z[j], vmin), vmax)
        b = (tz - vmin) / dz
        lo, up = math.floor(b), math.ceil(b)
        if lo == up:
            m[lo] += p[j]
        else:
            m[lo] += p[j] * (up - b)
            m[up] += p[j] * (b - lo)
    return m


@pytest.mark.parametrize("atoms,vmin,vmax", [(11, -5.0, 5.0), (51, -10.0, 10.0)])
def test_categorical_projection_matches_the_per_atom_loop(atoms: int, vmin: float, vmax: float) -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.linspace(vmin, vmax, atoms)
    # Terminal (disc 0), returns far outside the support either side, ordinary ones, and (with dz = 1
    # on the 11-atom support) integer shifts that land exactly on atoms, at the ends too.
    ret = torch.tensor([0.0, 3.0, -100.0, 100.0, 1.0, -2.0, 0.37, 2.5, 4.0, -5.0, 0.5, 7.0])
    disc = torch.tensor([0.0, 0.0, 0.99, 0.99, 1.0, 1.0, 0.9, 0.0, 1.0, 1.0, 0.5, 0.3])
    p = torch.softmax(torch.randn(len(ret), atoms, generator=g) * 2, dim=1)
    m = categorical_projection(p, ret, disc, z)
    assert m.shape == (len(ret), atoms) and m.dtype == torch.float32
    zn = z.double().numpy()
    for i in range(len(ret)):
        ref = _projection_reference(p[i].double().numpy(), float(ret[i]), float(disc[i]), zn)
        np.testing.assert_allclose(m[i].numpy(), ref, atol=1e-5)
    torch.testing.assert_close(m.sum(1), torch.ones(len(ret)), atol=1e-5, rtol=0)
    assert (m >= 0).all()


def test_categorical_projection_edge_cases() -> None:
    z = torch.linspace(-5.0, 5.0, 11)
    p = torch.softmax(torch.randn(4, 11, generator=torch.Generator().manual_seed(1)), dim=1)
    ret, disc = torch.tensor([2.0, 50.0, -50.0, 0.0]), torch.tensor([0.0, 0.9, 0.9, 1.0])
    m = categorical_projection(p, ret, disc, z)
    assert m[0, 7] == pytest.approx(1.0, abs=1e-6)   # terminal, ret on an atom: all mass there
    assert m[1, 10] == pytest.approx(1.0, abs=1e-6)  # above vmax: clamped onto the last atom
    assert m[2, 0] == pytest.approx(1.0, abs=1e-6)   # below vmin: clamped onto the first atom
    torch.testing.assert_close(m[3], p[3])            # identity: every atom onto itself


def test_categorical_loss_is_cross_entropy_for_logits_and_log_probs() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 7, generator=g) * 3
    target = torch.softmax(torch.randn(5, 7, generator=g), dim=1)
    ref = torch.tensor([-sum(float(target[i, j]) * math.log(float(torch.softmax(logits[i], 0)[j]))
                             for j in range(7)) for i in range(5)])
    torch.testing.assert_close(categorical_loss(logits, target), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(categorical_loss(F.log_softmax(logits, 1), target), ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- quantile-Huber, cosines


def _quantile_huber_reference(pred: np.ndarray, target: np.ndarray, taus: np.ndarray,
                              kappa: float) -> np.ndarray:
    out = np.zeros(len(pred))
    for b in range(len(pred)):
        total = 0.0
        for i in range(pred.shape[1]):
            row = 0.0
            for j in range(target.shape[1]):
                u = target[b, j] - pred[b, i]
                if kappa == 0:  # the plain quantile loss
                    h = abs(u)
                else:  # Huber_kappa(u) / kappa
                    huber = 0.5 * u * u if abs(u) <= kappa else kappa * (abs(u) - 0.5 * kappa)
                    h = huber / kappa
                row += abs(taus[b, i] - (1.0 if u < 0 else 0.0)) * h
            total += row / target.shape[1]  # mean over N'
        out[b] = total  # sum over N
    return out


@pytest.mark.parametrize("kappa", [1.0, 2.0, 0.0])
def test_quantile_huber_loss_matches_the_elementwise_formula(kappa: float) -> None:
    g = torch.Generator().manual_seed(3)
    pred, target, taus = torch.randn(3, 5, generator=g) * 2, torch.randn(3, 4, generator=g) * 2, \
        torch.rand(3, 5, generator=g)
    got = quantile_huber_loss(pred, target, taus, kappa)
    ref = _quantile_huber_reference(pred.double().numpy(), target.double().numpy(), taus.double().numpy(),
                                    kappa)
    assert got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_quantile_huber_loss_is_least_at_the_tau_quantile() -> None:
    # One prediction against targets 0..99: over a grid of predictions, the loss is least at the
    # tau-quantile of the targets (what the gradient drives each quantile towards).
    grid = torch.linspace(0.0, 99.0, 397)
    target = torch.arange(100.0).expand(len(grid), 100)
    for tau in (0.1, 0.25, 0.9):
        loss = quantile_huber_loss(grid[:, None], target, torch.full((len(grid), 1), tau), kappa=1.0)
        assert abs(float(grid[loss.argmin()]) - (100 * tau - 0.5)) < 1.0


def test_cosine_embedding_shape_and_values() -> None:
    taus = torch.tensor([[0.0, 0.25, 1.0], [0.5, 0.1, 0.9]])
    e = cosine_embedding(taus, 64)
    assert e.shape == (2, 3, 64) and e.dtype == torch.float32
    for b in range(2):
        for n in range(3):
            for i in range(64):  # i = 1..64 (Dopamine's range)
                want = math.cos(math.pi * (i + 1) * float(taus[b, n]))
                # float32: the argument (up to 64 pi) is good to ~1.5e-5, so is its cosine
                assert float(e[b, n, i]) == pytest.approx(want, abs=3e-5)
    assert torch.allclose(e[0, 0], torch.ones(64))  # tau = 0: every cosine is 1
    assert cosine_embedding(taus, 8).shape == (2, 3, 8)


# ----------------------------------------------------------------------------- NoisyLinear


def test_noisy_linear_init_and_state_dict() -> None:
    layer = NoisyLinear(16, 3, sigma0=0.5)
    assert (layer.weight_mu.abs() <= 1 / 4).all() and (layer.bias_mu.abs() <= 1 / 4).all()
    assert torch.allclose(layer.weight_sigma, torch.full((3, 16), 0.5 / 4))
    assert torch.allclose(layer.bias_sigma, torch.full((3,), 0.5 / 4))
    keys = list(layer.state_dict())
    layer.reset_noise(batch=7)  # the noise mode leaves the weights message unchanged
    assert list(layer.state_dict()) == keys == ["weight_mu", "weight_sigma", "bias_mu", "bias_sigma"]


def test_noisy_linear_without_noise_is_the_mu_layer() -> None:
    layer = NoisyLinear(6, 4)
    x = torch.randn(10, 6)
    layer.noise_enabled = False
    ref = F.linear(x, layer.weight_mu, layer.bias_mu)
    for batch in (None, 10):
        layer.reset_noise(batch)
        torch.testing.assert_close(layer(x), ref)
    layer.noise_enabled = True
    assert not torch.allclose(layer(x), ref)


def test_noisy_linear_shared_noise_is_one_factorised_weight() -> None:
    layer = NoisyLinear(6, 4)
    layer.reset_noise(generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 6)
    w = layer.weight_mu + layer.weight_sigma * torch.outer(layer.eps_out, layer.eps_in)
    torch.testing.assert_close(layer(x), x @ w.T + layer.bias_mu + layer.bias_sigma * layer.eps_out)
    # eps = f(e) = sign(e) sqrt|e| of the generator's normals.
    e = torch.randn(6 + 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer.eps_in, e[:6].sign() * e[:6].abs().sqrt())
    y = layer(x)
    layer.reset_noise()
    assert not torch.allclose(layer(x), y)


def test_noisy_linear_per_row_noise_equals_per_row_weight_matrices() -> None:
    layer = NoisyLinear(5, 3)
    layer.reset_noise(batch=4)
    assert layer.eps_in.shape == (4, 5) and layer.eps_out.shape == (4, 3)
    x = torch.randn(4, 5)
    x3 = torch.randn(4, 6, 5)  # [B, N, in] (IQN's taus): row b's noise over all of x3[b]
    y, y3 = layer(x), layer(x3)
    for b in range(4):
        w = layer.weight_mu + layer.weight_sigma * torch.outer(layer.eps_out[b], layer.eps_in[b])
        bias = layer.bias_mu + layer.bias_sigma * layer.eps_out[b]
        torch.testing.assert_close(y[b], w @ x[b] + bias)
        torch.testing.assert_close(y3[b], x3[b] @ w.T + bias)
    with pytest.raises(ValueError, match="per-row noise"):
        layer(torch.randn(3, 5))


def test_noisy_linear_output_mean_and_variance() -> None:
    # S independent noise samples at once (per-row mode) for one input x.
    torch.manual_seed(4)
    layer = NoisyLinear(5, 3, sigma0=2.0)
    x = torch.randn(5)
    s = 200_000
    layer.reset_noise(batch=s, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = layer(x.expand(s, 5)).double()
    mu_out = (layer.weight_mu @ x + layer.bias_mu).double()
    # f(e) has mean 0 and E f(e)^2 = E|e| = c = sqrt(2/pi), so with noise = f(e_o)(sum_i s_oi f(e_i) x_i + s_bo):
    # Var y_o = c^2 sum_i s_oi^2 x_i^2 + c s_bo^2.
    c = math.sqrt(2 / math.pi)
    var = (c * c * (layer.weight_sigma ** 2 @ x ** 2) + c * layer.bias_sigma ** 2).double()
    sd = var.sqrt()
    assert torch.all((y.mean(0) - mu_out).abs() < 5 * sd / math.sqrt(s))
    torch.testing.assert_close(y.var(0), var.detach(), rtol=0.03, atol=0)
    # Shared mode over many resamples: the same mean.
    g = torch.Generator().manual_seed(6)
    ys = []
    with torch.no_grad():
        for _ in range(2000):
            layer.reset_noise(generator=g)
            ys.append(layer(x[None])[0])
    ys = torch.stack(ys).double()
    assert torch.all((ys.mean(0) - mu_out).abs() < 5 * sd / math.sqrt(2000))
    torch.testing.assert_close(ys.var(0), var.detach(), rtol=0.15, atol=0)


def test_set_noise_and_network_noise_helpers() -> None:
    net = build_distributional_network(VECTOR, 16, "rainbow")
    assert len(noisy_layers(net)) == 4  # both heads, both layers
    x = torch.randn(3, 4)
    a = net(x)
    net.reset_noise()
    assert not torch.allclose(net(x), a)
    set_noise(net, False)
    b = net(x)
    net.reset_noise(batch=3)
    torch.testing.assert_close(net(x), b)
    net.set_noise(True)
    assert not torch.allclose(net(x), b)


# ----------------------------------------------------------------------------- networks


@pytest.mark.parametrize("spec,hidden", [(VECTOR, 32), (ATARI, 64)])
@pytest.mark.parametrize("algo", ["rainbow", "iqn"])
def test_network_shapes_dtypes_and_losses(spec: EnvSpec, hidden: int, algo: str) -> None:
    torch.manual_seed(7)
    g = torch.Generator().manual_seed(7)
    net = build_distributional_network(spec, hidden, algo, atoms=21)
    target = copy.deepcopy(net)
    obs, next_obs = _obs(spec, 2, g), _obs(spec, 2, g)
    action, ret, disc = torch.tensor([1, 0]), torch.tensor([1.0, -0.5]), torch.tensor([0.97, 0.0])
    a = spec.num_actions
    with torch.no_grad():
        net.reset_noise(batch=2)  # per-env-slot noise, as an actor acts
        if algo == "rainbow":
            assert isinstance(net, C51Dueling) and net.support.shape == (21,)
            assert net(obs).shape == (2, a, 21)
        else:
            assert isinstance(net, IQNNet)
            assert net(obs, sample_taus(2, 8, "cpu", g)).shape == (2, 8, a)
        assert net.q(obs).shape == (2, a)
        net.reset_noise()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # torso bf16, heads float32
            out = net(obs) if algo == "rainbow" else net(obs, sample_taus(2, 8, "cpu", g))
            loss = (rainbow_loss(net, target, obs, action, ret, disc, next_obs) if algo == "rainbow" else
                    iqn_loss(net, target, obs, action, ret, disc, next_obs, n=8, n_prime=8, k=4, generator=g))
        assert out.dtype == torch.float32 and loss.dtype == torch.float32
        assert loss.shape == (2,) and torch.isfinite(loss).all() and (loss >= 0).all()


def test_c51_q_is_the_expected_value_and_probabilities_sum_to_one() -> None:
    torch.manual_seed(8)
    net = build_distributional_network(VECTOR, 16, "rainbow", atoms=11, vmin=-3, vmax=5, noisy=False)
    x = torch.randn(6, 4)
    with torch.no_grad():
        logp = net(x)
        torch.testing.assert_close(logp.exp().sum(-1), torch.ones(6, 2))
        ref = (logp.exp() * torch.linspace(-3, 5, 11)).sum(-1)
        torch.testing.assert_close(net.q(x), ref)
        torch.testing.assert_close(expected_q(logp, net.support), ref)


def test_iqn_q_is_the_mean_over_sampled_taus() -> None:
    torch.manual_seed(9)
    net = build_distributional_network(VECTOR, 16, "iqn", noisy=False)
    x = torch.randn(3, 4)
    with torch.no_grad():
        # The same generator state gives the same taus: q is exactly their mean.
        taus = sample_taus(3, 32, "cpu", torch.Generator().manual_seed(1))
        torch.testing.assert_close(net.q(x, k=32, generator=torch.Generator().manual_seed(1)),
                                   net(x, taus).mean(1))
        # Many samples approach the integral over tau (midpoint rule on a fine grid).
        grid = ((torch.arange(4000) + 0.5) / 4000).expand(3, 4000)
        exact = net(x, grid).mean(1)
        spread = net(x, grid).std(1)
        approx = net.q(x, k=20000, generator=torch.Generator().manual_seed(2))
        assert torch.all((approx - exact).abs() < 5 * spread / math.sqrt(20000) + 1e-5)


def test_iqn_not_dueling_and_quantiles_shared_torso() -> None:
    net = build_distributional_network(VECTOR, 16, "iqn", dueling=False, noisy=False, n_cos=8)
    assert not hasattr(net, "value") and net.embed.in_features == 8
    x = torch.randn(2, 4)
    taus = torch.rand(2, 5)
    with torch.no_grad():
        q = net(x, taus)
        # Each tau column is computed independently of the others.
        torch.testing.assert_close(net(x, taus[:, 2:3])[:, 0], q[:, 2])


@pytest.mark.parametrize("dueling", [True, False])
def test_iqn_forward_pair_is_two_forwards_with_gradients_through_the_first_only(dueling: bool) -> None:
    torch.manual_seed(12)
    net = build_distributional_network(VECTOR, 16, "iqn", dueling=dueling, noisy=True)
    net.reset_noise()  # one shared sample, as the learner trains
    obs, obs2 = torch.randn(3, 4), torch.randn(5, 4)
    taus, taus2 = torch.rand(3, 6), torch.rand(5, 2)
    quant, quant2 = net.forward_pair(obs, taus, obs2, taus2)
    assert quant.shape == (3, 6, 2) and quant2.shape == (5, 2, 2)
    torch.testing.assert_close(quant, net(obs, taus))
    torch.testing.assert_close(quant2, net(obs2, taus2))
    assert quant.requires_grad and not quant2.requires_grad
    # Same gradients as the plain forward of the first batch.
    quant.sum().backward()
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net(obs, taus).sum().backward()
    for g, p in zip(got, net.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_build_rejects_unknown_algo() -> None:
    with pytest.raises(ValueError, match="algo"):
        build_distributional_network(VECTOR, 16, "dqn")
    assert not noisy_layers(build_distributional_network(VECTOR, 16, "rainbow", noisy=False))
    assert noisy_layers(build_distributional_network(VECTOR, 16, "iqn"))


# ----------------------------------------------------------------------------- priorities == losses


def _log_probs(rows: list[list[float]]) -> np.ndarray:
    p = np.array(rows, dtype=np.float64)
    return np.log(p / p.sum(-1, keepdims=True))


@pytest.mark.parametrize("ret,m", [
    (0.0, [0.0, 1.0, 0.0]),  # the return is an atom: one-atom target, H(m) = 0, KL = cross-entropy
    (0.25, [0.0, 0.75, 0.25]),  # between atoms 0 and 1: a diffuse target, KL = cross-entropy - H(m)
    (-0.5, [0.5, 0.5, 0.0]),
])
def test_rainbow_actor_priority_is_the_kl_divergence_by_hand(ret: float, m: list[float]) -> None:
    # Atoms -1, 0, 1; disc 0 (terminal): the target m is the return's projection, whatever is bootstrapped.
    support = np.array([-1.0, 0.0, 1.0], np.float32)
    p_a = [[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]]  # the prediction at (s, a) for a = 0, 1
    logp_obs = _log_probs(p_a)[None].astype(np.float32)
    logp_boot = _log_probs([[0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])[None].astype(np.float32)
    for action in (0, 1):
        ce = -sum(mi * math.log(pi) for mi, pi in zip(m, p_a[action]) if mi > 0)
        h = -sum(mi * math.log(mi) for mi in m if mi > 0)
        prio = rainbow_priorities_from_outputs(logp_obs, logp_boot, np.array([action]), np.array([ret], np.float32),
                                               np.zeros(1, np.float32), support)
        assert prio.dtype == np.float32
        assert prio[0] == pytest.approx(ce - h, rel=1e-5, abs=1e-6)
        if h > 0:  # the cross-entropy would be a different priority
            assert abs(prio[0] - ce) > 0.1


def test_rainbow_kl_priority_is_zero_not_negative_where_prediction_equals_target() -> None:
    support = np.linspace(-1.0, 1.0, 5, dtype=np.float32)
    m = np.array([0.0, 0.3, 0.7, 0.0, 0.0])  # ret -0.15, disc 0: 0.3 / 0.7 on atoms -0.5 / 0
    logp = np.log(np.clip(m, 1e-30, None))[None, None].astype(np.float32)  # the prediction is m itself
    prio = rainbow_priorities_from_outputs(logp, logp, np.array([0]), np.array([-0.15], np.float32),
                                           np.zeros(1, np.float32), support)
    assert prio[0] >= 0 and prio[0] < 1e-5


def test_rainbow_priorities_from_outputs_equal_the_loss_with_one_network() -> None:
    torch.manual_seed(10)
    g = torch.Generator().manual_seed(10)
    net = build_distributional_network(VECTOR, 16, "rainbow", atoms=21, vmin=-2, vmax=2)
    set_noise(net, False)
    m = 12
    obs, next_obs = torch.randn(m, 4, generator=g), torch.randn(m, 4, generator=g)
    action = torch.randint(0, 2, (m,), generator=g)
    ret = torch.randn(m, generator=g)
    disc = torch.where(torch.rand(m, generator=g) < 0.3, 0.0, 0.97)
    with torch.no_grad():
        loss, kl = rainbow_loss_and_priority(net, net, obs, action, ret, disc, next_obs)
        logp_obs, logp_boot = net(obs).numpy(), net(next_obs).numpy()
    prios = rainbow_priorities_from_outputs(logp_obs, logp_boot, action.numpy(), ret.numpy(), disc.numpy(),
                                            net.support.numpy())
    assert prios.dtype == np.float32 and prios.shape == (m,)
    np.testing.assert_allclose(prios, kl.numpy(), rtol=1e-5, atol=1e-6)
    # KL = cross-entropy - H(m) <= cross-entropy; below it wherever the target spreads over atoms.
    assert (prios <= loss.numpy() + 1e-6).all() and (prios < loss.numpy() - 1e-3).sum() >= m // 2
    torch_in = rainbow_priorities_from_outputs(torch.as_tensor(logp_obs), torch.as_tensor(logp_boot), action,
                                               ret, disc, net.support)
    np.testing.assert_array_equal(torch_in, prios)


def test_iqn_priorities_from_outputs_equal_the_loss_with_one_network() -> None:
    torch.manual_seed(11)
    g = torch.Generator().manual_seed(11)
    net = build_distributional_network(VECTOR, 16, "iqn")
    set_noise(net, False)
    m, n, n_prime = 10, 8, 6
    obs, next_obs = torch.randn(m, 4, generator=g), torch.randn(m, 4, generator=g)
    action = torch.randint(0, 2, (m,), generator=g)
    ret = torch.randn(m, generator=g)
    disc = torch.where(torch.rand(m, generator=g) < 0.3, 0.0, 0.97)
    taus, taus_boot = torch.rand(m, n, generator=g), torch.rand(m, n_prime, generator=g)
    with torch.no_grad():
        loss = iqn_loss(net, net, obs, action, ret, disc, next_obs, n=n, n_prime=n_prime, k=n_prime,
                        taus=taus, taus_prime=taus_boot, taus_k=taus_boot, kappa=1.0)
        quant_obs, quant_boot = net(obs, taus), net(next_obs, taus_boot)
    prios = iqn_priorities_from_outputs(quant_obs.numpy(), taus.numpy(), quant_boot.numpy(), action.numpy(),
                                        ret.numpy(), disc.numpy(), kappa=1.0)
    assert prios.dtype == np.float32 and prios.shape == (m,)
    np.testing.assert_allclose(prios, loss.numpy(), rtol=1e-5, atol=1e-6)
    scaled = iqn_priorities_from_outputs(quant_obs, taus, quant_boot, action, ret, disc, kappa=1.0, n=4 * n)
    np.testing.assert_allclose(scaled, 4 * prios, rtol=1e-6)


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize("algo", ["rainbow", "iqn"])
def test_a_few_adam_steps_lower_the_loss_on_a_fixed_batch(algo: str) -> None:
    torch.manual_seed(12)
    g = torch.Generator().manual_seed(12)
    net = build_distributional_network(VECTOR, 32, algo, atoms=21, vmin=-5, vmax=5)
    target = copy.deepcopy(net).requires_grad_(False)
    b = 32
    obs, next_obs = torch.randn(b, 4, generator=g), torch.randn(b, 4, generator=g)
    action = torch.randint(0, 2, (b,), generator=g)
    ret = torch.randn(b, generator=g)
    disc = torch.where(torch.arange(b) % 2 == 0, 0.0, 0.9)  # half terminal
    weight = torch.rand(b, generator=g) + 0.5  # IS weights, as the learner applies them
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def loss_now() -> torch.Tensor:
        net.reset_noise(generator=torch.Generator().manual_seed(0))  # the same noise and taus every step
        target.reset_noise(generator=torch.Generator().manual_seed(1))
        if algo == "iqn":
            return iqn_loss(net, target, obs, action, ret, disc, next_obs, n=16, n_prime=16, k=8,
                            generator=torch.Generator().manual_seed(2))
        loss = rainbow_loss(net, target, obs, action, ret, disc, next_obs)
        # The cross-entropy's floor is the target's entropy (~log(atoms) where it bootstraps at init):
        # measure what can fall, the KL divergence, the cross-entropy less that entropy.
        with torch.no_grad():
            best = net.q(next_obs).argmax(1)
            m = categorical_projection(target(next_obs)[torch.arange(b), best].exp(), ret, disc, net.support)
            entropy = -(m * m.clamp_min(1e-30).log()).sum(1)
        return loss - entropy

    first = float((weight * loss_now()).mean().detach())
    for _ in range(20):
        loss = (weight * loss_now()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is not None for p in net.parameters())
    assert all(p.grad is None for p in target.parameters())
    assert float((weight * loss_now()).mean().detach()) < 0.6 * first


def test_resample_shared_noise_draws_every_layer_once_from_the_factorised_distribution() -> None:
    net = build_distributional_network(VECTOR, 16, "rainbow", noisy=True)
    layers = noisy_layers(net)
    assert len(layers) == 4
    torch.manual_seed(13)
    resample_shared_noise(layers)
    first = [(m.eps_in.clone(), m.eps_out.clone()) for m in layers]
    for m, (e_in, e_out) in zip(layers, first):
        assert e_in.shape == (m.in_features,) and e_out.shape == (m.out_features,)  # shared: no batch dim
    torch.manual_seed(13)
    resample_shared_noise(layers)  # the same seed, the same noise
    for m, (e_in, e_out) in zip(layers, first):
        assert torch.equal(m.eps_in, e_in) and torch.equal(m.eps_out, e_out)
    # f(x) = sign(x) sqrt(|x|) of standard normals: mean 0, E f^2 = E|x| = sqrt(2 / pi); fresh each call.
    draws = []
    for _ in range(400):
        resample_shared_noise(layers)
        draws.append(torch.cat([t for m in layers for t in (m.eps_in, m.eps_out)]))
    x = torch.stack(draws)
    assert abs(float(x.mean())) < 0.01 and abs(float((x * x).mean()) - math.sqrt(2 / math.pi)) < 0.01
    assert not torch.equal(x[0], x[1])
    resample_shared_noise([])  # no noisy layers: nothing to do
