"""The gradient an actor-learner pushes equals the gradient of its rule's loss recomputed from the recorded
segment by a plain reference: per step and env, one observation at a time, with the returns and targets
of Mnih et al. 2016 written out as loops (Algorithm S3 for a3c, S2 for nstep_q, S1 for onestep_q, and
one-step Sarsa bootstrapping from the next action actually taken), differentiated by torch.autograd.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from actor.actor_learner import ActorLearnerCore, segment_loss
from apex_zmq import config as C
from apex_zmq.asyncrl import build_async_network, trainable
from apex_zmq.envs import EnvSpec

SPEC = EnvSpec("CartPole-v1", (4,), "float32", 2, False)


def _one(o: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(o)[None]


def reference_loss(algo: str, net: torch.nn.Module, obs, actions, rewards, term, trunc, valid, gamma: float,
                   entropy_beta: float, value_coef: float) -> torch.Tensor:
    """The mean over valid steps of each step's loss, every quantity computed on its own."""
    T, K = rewards.shape
    per_step = []
    for k in range(K):
        for t in range(T):
            if not valid[t, k]:  # an env's reset step: not a transition
                continue
            s, a = obs[t, k], int(actions[t, k])
            if algo in ("a3c", "nstep_q"):
                # R accumulates rewards forward until the episode terminates (R ends there), is truncated
                # or the segment ends (R bootstraps from V(s') for a3c, max_a Q_target(s', a) for nstep_q).
                ret, discount, u = 0.0, 1.0, t
                while True:
                    ret += discount * float(rewards[u, k])
                    discount *= gamma
                    if term[u, k]:
                        break
                    if trunc[u, k] or u == T - 1:
                        with torch.no_grad():
                            nxt = _one(obs[u + 1, k])
                            boot = net(nxt)[1][0] if algo == "a3c" else net.target(nxt)[0].max()
                        ret += discount * float(boot)
                        break
                    u += 1
            else:
                ret = float(rewards[t, k])
                if not term[t, k]:
                    with torch.no_grad():
                        q_next = net.target(_one(obs[t + 1, k]))[0]
                    # Sarsa: the action taken at s_{t+1} (at a segment's end, the next segment's first).
                    boot = q_next[int(actions[t + 1, k])] if algo == "onestep_sarsa" else q_next.max()
                    ret += gamma * float(boot)
            if algo == "a3c":
                logits, value = net(_one(s))
                logp = F.log_softmax(logits[0], dim=0)
                entropy = -(logp.exp() * logp).sum()
                advantage = ret - value[0]
                per_step.append(-logp[a] * advantage.detach() + value_coef * advantage ** 2
                                - entropy_beta * entropy)
            else:
                per_step.append((ret - net.online(_one(s))[0, a]) ** 2)
    return sum(per_step) / len(per_step)


def _reference_grads(algo: str, net, seg: dict, cfg) -> list[torch.Tensor]:
    loss = reference_loss(algo, net, seg["obs"], seg["actions"], seg["rewards"], seg["term"], seg["trunc"],
                          seg["valid"], cfg.gamma, cfg.entropy_beta, cfg.value_coef)
    params = [p for _, p in trainable(net)]
    return [torch.zeros_like(p) if g is None else g
            for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]


def _core(algo: str, tmp_path, t_max: int) -> ActorLearnerCore:
    cfg = C.parse(C.ActorConfig, ["--env", "CartPole-v1", "--algo", algo, "--run-dir", str(tmp_path),
                                  "--envs-per-actor", "4", "--t-max", str(t_max), "--hidden", "16"], "actor")
    core = ActorLearnerCore(cfg)
    if algo != "a3c":  # a target network unlike the online one: using the wrong one changes the gradient
        with torch.no_grad():
            for p in core.net.target.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return core


def _record(core: ActorLearnerCore) -> list[dict]:
    """Keep a copy of each segment the core turns into a gradient."""
    segments = []
    original = core._gradients

    def keep(obs, actions, rewards, term, trunc, valid):
        segments.append({k: v.copy() for k, v in dict(obs=obs, actions=actions, rewards=rewards, term=term,
                                                      trunc=trunc, valid=valid).items()})
        return original(obs, actions, rewards, term, trunc, valid)
    core._gradients = keep  # type: ignore[method-assign]
    return segments


@pytest.mark.parametrize("algo", C.ASYNC_ALGOS)
def test_pushed_gradient_is_the_reference_gradient_of_the_recorded_segment(tmp_path, algo: str) -> None:
    torch.manual_seed(0)
    core = _core(algo, tmp_path, t_max=40)
    segments = _record(core)
    try:
        for _ in range(2):
            g = core.segment()
            seg = segments[-1]
            # 4 random CartPole episodes over 40 steps each: episodes end, and reset steps follow.
            assert seg["term"].any() and not seg["valid"].all()
            assert g.dtype == "float32" and g.steps == int(seg["valid"].sum())
            want = _reference_grads(algo, core.net, seg, core.cfg)
            assert len(want) == len(g.arrays) and any(float(w.abs().max()) > 1e-3 for w in want)
            for name, got, w in zip(g.names, g.arrays, want):
                np.testing.assert_allclose(got, w.numpy(), rtol=2e-4, atol=2e-6, err_msg=f"{algo} {name}")
    finally:
        core.close()


def test_sarsa_bootstraps_from_the_action_the_next_segment_takes_first(tmp_path) -> None:
    core = _core("onestep_sarsa", tmp_path, t_max=3)
    segments = _record(core)
    stepped = []
    env_step = core.env.step

    def step(actions):
        stepped.append(np.array(actions))
        return env_step(actions)
    core.env.step = step  # type: ignore[method-assign]
    try:
        for _ in range(4):
            core.segment()
        for i in range(3):
            chosen = segments[i]["actions"][-1]  # chosen at s_T, Sarsa's a' for the last step
            assert np.array_equal(segments[i + 1]["actions"][0], chosen)
            assert np.array_equal(stepped[3 * (i + 1)], chosen)  # and the env is stepped with it
    finally:
        core.close()


@pytest.mark.parametrize("algo", C.ASYNC_ALGOS)
def test_segment_loss_with_truncations_equals_the_reference(algo: str) -> None:
    """A synthetic segment with terminations, truncations (bootstrapped) and the reset step after each end."""
    torch.manual_seed(1)
    net = build_async_network(SPEC, 8, algo)
    if algo != "a3c":
        with torch.no_grad():
            for p in net.target.parameters():
                p.add_(0.3 * torch.randn_like(p))
    rng = np.random.default_rng(2)
    T, K, gamma = 9, 3, 0.9
    term, trunc, valid = (np.zeros((T, K), bool) for _ in range(3))
    valid[0] = True
    for t in range(T):
        if t:
            valid[t] = ~(term[t - 1] | trunc[t - 1])
        u = rng.random(K)
        term[t], trunc[t] = valid[t] & (u < 0.2), valid[t] & (u >= 0.2) & (u < 0.35)
    rewards = np.where(valid, rng.standard_normal((T, K)), 0.0).astype(np.float32)
    assert term.any() and trunc.any() and not valid.all()
    seg = dict(obs=rng.standard_normal((T + 1, K, 4)).astype(np.float32), actions=rng.integers(0, 2, (T + 1, K)),
               rewards=rewards, term=term, trunc=trunc, valid=valid)
    loss, _ = segment_loss(algo, net, seg["obs"], seg["actions"], rewards, term, trunc, valid, gamma, 0.02, 0.5)
    params = [p for _, p in trainable(net)]
    got = torch.autograd.grad(loss, params)
    want = reference_loss(algo, net, seg["obs"], seg["actions"], rewards, term, trunc, valid, gamma, 0.02, 0.5)
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    for g, w in zip(got, torch.autograd.grad(want, params)):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-4, atol=1e-6)
