"""The actors of each learning rule: acting on expected values, initial priorities equal to the learner's
priority (rainbow: the KL divergence; dqn, iqn: the loss) with the actor's network as online and target, exploration by the ladder, noisy layers or both."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actor.acting import IQNActing, RainbowActing, make_acting
from actor.main import ActorCore
from actor.nstep import SegmentBuffer
from apex_zmq import config as C
from apex_zmq.distributional import iqn_loss, rainbow_loss_and_priority, set_noise
from apex_zmq.envs import env_spec
from apex_zmq.models import build_network
from apex_zmq.networks import q_values

SPEC = env_spec("CartPole-v1")
K, STEPS, N_STEP, GAMMA = 3, 4, 2, 0.9


def _net(algo: str, **opts) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network(SPEC, 16, algo, **opts).eval()


def _run_segment(acting, rng: np.random.Generator) -> tuple[dict, np.ndarray, list]:
    """Feed a SegmentBuffer one full segment of random CartPole-like observations; returns the emitted
    chunk fields, every observation [T+1, K, 4] and the outputs stored per step."""
    seg = SegmentBuffer(K, STEPS, N_STEP, GAMMA, SPEC.num_actions, acting.out_shape, acting.priority_fn)
    obs_all = rng.normal(size=(seg.L + 1, K, 4)).astype(np.float32)
    for t in range(seg.L + 1):
        q, out = acting.outputs(torch.as_tensor(obs_all[t]))
        assert q.shape == (K, SPEC.num_actions) and out.shape == (K, *acting.out_shape)
        seg.add_obs([b"x"] * K, out)
        if t < seg.L:
            term = rng.random(K) < 0.2
            seg.add_step(rng.integers(0, 2, K), rng.normal(size=K).astype(np.float32), term,
                         np.zeros(K, bool), np.ones(K, bool))
    return seg.emit(), obs_all.reshape(-1, 4), seg


def test_rainbow_actor_priorities_are_the_learner_priority_with_its_own_network() -> None:
    net = _net("rainbow", atoms=11, vmin=-5.0, vmax=5.0, noisy=True)
    acting = RainbowActing(net, SPEC.num_actions, 11, noisy_exploration=False, generator=torch.Generator())
    f, obs, _ = _run_segment(acting, np.random.default_rng(1))
    assert len(f["priority"]) > 0
    with torch.no_grad():
        _, kl = rainbow_loss_and_priority(net, net, torch.as_tensor(obs[f["obs_idx"]]),
                                          torch.as_tensor(f["action"]).long(), torch.as_tensor(f["ret"]),
                                          torch.as_tensor(f["disc"]), torch.as_tensor(obs[f["next_idx"]]))
    np.testing.assert_allclose(f["priority"], kl.numpy(), rtol=1e-5, atol=1e-6)


def test_iqn_actor_priorities_are_the_learner_loss_on_its_taus_rescaled_to_n() -> None:
    net = _net("iqn", n_cos=8, dueling=True, noisy=False)
    k, learner_n = 4, 16
    # Keep every observation's outputs: the taus it was evaluated at are their last column.
    acting = IQNActing(net, SPEC.num_actions, k, learner_n, 1.0, noisy_exploration=False,
                       generator=torch.Generator().manual_seed(3))
    outs = []
    original = acting.outputs

    def keep(o: torch.Tensor):
        q, out = original(o)
        outs.append(out)
        return q, out
    acting.outputs = keep  # type: ignore[method-assign]
    f, obs, _ = _run_segment(acting, np.random.default_rng(2))
    assert len(f["priority"]) > 0
    out = np.stack(outs).reshape(-1, k, SPEC.num_actions + 1)
    taus = torch.as_tensor(out[..., -1])
    oi, ni = f["obs_idx"], f["next_idx"]
    with torch.no_grad():
        loss = iqn_loss(net, net, torch.as_tensor(obs[oi]), torch.as_tensor(f["action"]).long(),
                        torch.as_tensor(f["ret"]), torch.as_tensor(f["disc"]), torch.as_tensor(obs[ni]),
                        taus=taus[oi], taus_prime=taus[ni], taus_k=taus[ni])
    np.testing.assert_allclose(f["priority"], loss.numpy() * learner_n / k, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("algo", ["rainbow", "iqn"])
def test_noisy_exploration_draws_noise_per_env_slot_and_ladder_acts_on_the_mean(algo: str) -> None:
    cfg = C.ActorConfig(env="CartPole-v1", algo=algo, noisy="on", hidden=16, iqn_k=4)
    same = torch.ones(4, 4)  # four env slots seeing the same observation
    noisy = make_acting(C.ActorConfig(**{**cfg.__dict__, "exploration": "noisy"}), _net(algo, noisy=True),
                        None, 2, seed=0)
    q, _ = noisy.outputs(same)
    assert not torch.allclose(q[0], q[1])  # each slot its own noise
    calm = make_acting(C.ActorConfig(**{**cfg.__dict__, "exploration": "ladder"}), _net(algo, noisy=True),
                       None, 2, seed=0)
    if algo == "rainbow":  # deterministic without noise (IQN still samples taus)
        q1, _ = calm.outputs(same)
        q2, _ = calm.outputs(same)
        assert torch.equal(q1, q2) and torch.allclose(q1[0], q1[1])


@pytest.mark.parametrize("exploration,ladder", [("noisy", False), ("both", True), ("ladder", True),
                                                ("auto", True)])
def test_actor_epsilons_follow_the_exploration(exploration: str, ladder: bool) -> None:
    cfg = C.ActorConfig(env="CartPole-v1", algo="rainbow", hidden=16, envs_per_actor=4, num_actors=1,
                        exploration=exploration)
    core = ActorCore(cfg)
    try:
        assert (core.eps > 0).all() == ladder and (core.eps == 0).all() == (not ladder)
        assert core.exploration == C.exploration_of(cfg)
        for _ in range(3):
            core.step()  # acts with the distributional network
    finally:
        core.close()


def test_evaluation_q_values_are_expected_values_without_noise() -> None:
    net = _net("rainbow", atoms=11, vmin=-5.0, vmax=5.0, noisy=True)
    set_noise(net, False)
    obs = torch.randn(5, 4)
    q = q_values(net, obs)
    np.testing.assert_allclose(q.detach().numpy(), (net(obs).exp() * net.support).sum(-1).detach().numpy(),
                               rtol=1e-5)
    assert torch.equal(q, q_values(net, obs))


@pytest.mark.parametrize("flags,flag", [
    (["--algo", "rainbow", "--acting-dtype", "int8"], "--acting-dtype"),
    (["--algo", "iqn", "--acting-dtype", "bfloat16"], "--acting-dtype"),
    (["--algo", "dqn", "--exploration", "noisy"], "--exploration"),
    (["--algo", "iqn", "--exploration", "both"], "--exploration"),  # iqn is not noisy unless --noisy on
    (["--algo", "dqn", "--noisy", "on"], "--noisy"),
])
def test_settings_the_algorithm_cannot_honour_are_refused_naming_the_flag(flags: list[str], flag: str) -> None:
    with pytest.raises(SystemExit) as e:
        C.parse(C.ActorConfig, ["--env", "CartPole-v1", *flags], "actor")
    assert e.value.code == C.CONFIG_ERROR_EXIT and str(e.value).startswith(flag + ":"), str(e.value)


def test_rainbow_iqn_preset_is_the_seeds() -> None:
    cfg = C.parse(C.LearnerConfig, ["--env", "ALE/Pong-v5", "--preset", "rainbow-iqn"], "learner")
    assert (cfg.algo, cfg.noisy, cfg.dueling, cfg.lr, cfg.adam_eps, cfg.target_update) == \
        ("iqn", "on", True, 5e-5, 3.125e-4, 2500)
    replay = C.parse(C.ReplayConfig, ["--env", "ALE/Pong-v5", "--preset", "rainbow-iqn"], "replay_server")
    assert (replay.alpha, replay.beta) == (0.2, 0.4)
    flags_win = C.parse(C.LearnerConfig, ["--preset", "rainbow-iqn", "--lr", "1e-4"], "learner")
    assert flags_win.lr == 1e-4


def test_weights_of_another_c51_support_do_not_fit() -> None:
    from apex_zmq.networks import state_arrays, weights_mismatch
    ours = _net("rainbow", atoms=11, vmin=0.0, vmax=110.0)
    names, arrays = state_arrays(_net("rainbow", atoms=11, vmin=-10.0, vmax=10.0))
    why = weights_mismatch(ours, names, arrays)
    assert why is not None and "support spans [-10, 10], this network's [0, 110]" in why
    assert weights_mismatch(ours, *state_arrays(_net("rainbow", atoms=11, vmin=0.0, vmax=110.0))) is None
