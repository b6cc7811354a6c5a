"""The asynchronous family's maths, wire message, parameter server and actor-learner core, in process.

References are written plainly here: returns with per-env loops, the A3C loss element by element, a
shared RMSProp written out (Mnih et al. 2016: epsilon inside the square root) for the parameter server.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from actor.actor_learner import ActorLearnerCore
from apex_zmq import config as C
from apex_zmq import wire
from apex_zmq.asyncrl import (
    ActorCritic,
    QWithTarget,
    a3c_loss,
    gradient_arrays,
    gradient_mismatch,
    gradient_tensors,
    nstep_cut,
    q_loss,
    q_targets,
    segment_returns,
    trainable,
)
from apex_zmq.envs import EnvSpec, env_spec
from apex_zmq.exploration import PAPER_FINAL_EPSILONS, annealed_epsilon, draw_final_epsilons
from apex_zmq.models import build_network
from apex_zmq.networks import state_arrays
from learner.param_server import ParameterServer

SPEC = EnvSpec("CartPole-v1", (4,), "float32", 2, False)
GAMMA = 0.9


# --------------------------------------------------------------------------- returns and targets


def plain_nstep_returns(r, term, trunc, boot, gamma):
    """Per env, backwards: a terminated step bootstraps from nothing, a truncated one and the segment's
    last step from boot (the value of s_{t+1}); otherwise the return runs on into the next step."""
    T, K = r.shape
    out = np.zeros((T, K))
    for k in range(K):
        for t in range(T):
            total, discount, s = 0.0, 1.0, t
            while True:
                total += discount * r[s, k]
                discount *= gamma
                if term[s, k]:
                    break
                if trunc[s, k] or s == T - 1:
                    total += discount * boot[s, k]
                    break
                s += 1
            out[t, k] = total
    return out


def _segment(seed: int, T: int = 7, K: int = 3):
    rng = np.random.default_rng(seed)
    r = rng.standard_normal((T, K)).astype(np.float32)
    ends = rng.random((T, K))
    term, trunc = ends < 0.15, (ends >= 0.15) & (ends < 0.25)
    boot = rng.standard_normal((T, K)).astype(np.float32)
    return r, term, trunc, boot


@pytest.mark.parametrize("seed", range(20))
def test_nstep_returns_match_a_plain_loop_with_episode_ends(seed: int) -> None:
    r, term, trunc, boot = _segment(seed)
    got = segment_returns(torch.tensor(r), torch.tensor(term), nstep_cut(torch.tensor(trunc)), torch.tensor(boot),
                          GAMMA)
    np.testing.assert_allclose(got.numpy(), plain_nstep_returns(r, term, trunc, boot, GAMMA), rtol=1e-5, atol=1e-5)


def test_nstep_returns_by_hand() -> None:
    """One env, 4 steps: a terminal at step 1, a truncation at step 2, bootstrap 10 at the end."""
    r = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    term = torch.tensor([[False], [True], [False], [False]])
    trunc = torch.tensor([[False], [False], [True], [False]])
    boot = torch.tensor([[100.0], [100.0], [5.0], [10.0]])
    got = segment_returns(r, term, nstep_cut(trunc), boot, 0.5)[:, 0].tolist()
    assert got == [1 + 0.5 * 2, 2.0, 3 + 0.5 * 5, 4 + 0.5 * 10]


def test_advantages_are_nstep_returns_minus_values() -> None:
    """A3C's advantage of step t: R_t - V(s_t), with R the n-step return to the segment's end."""
    r, term, trunc, boot = _segment(3, T=5, K=2)
    values = np.random.default_rng(4).standard_normal((5, 2)).astype(np.float32)
    R = plain_nstep_returns(r, term, trunc, boot, GAMMA)
    got = segment_returns(torch.tensor(r), torch.tensor(term), nstep_cut(torch.tensor(trunc)), torch.tensor(boot),
                          GAMMA) - torch.tensor(values)
    np.testing.assert_allclose(got.numpy(), R - values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("algo", ["nstep_q", "onestep_q", "onestep_sarsa"])
def test_q_targets_match_the_papers_definitions(algo: str) -> None:
    r, term, trunc, _ = _segment(11, T=6, K=3)
    rng = np.random.default_rng(12)
    next_q = rng.standard_normal((6, 3, 4)).astype(np.float32)  # Q_target(s_{t+1}, .)
    next_a = rng.integers(0, 4, (6, 3))
    got = q_targets(algo, torch.tensor(r), torch.tensor(term), torch.tensor(trunc), torch.tensor(next_q),
                    torch.tensor(next_a), GAMMA).numpy()
    want = np.zeros((6, 3))
    for t in range(6):
        for k in range(3):
            if algo == "onestep_q":
                want[t, k] = r[t, k] + (0.0 if term[t, k] else GAMMA * next_q[t, k].max())
            elif algo == "onestep_sarsa":
                want[t, k] = r[t, k] + (0.0 if term[t, k] else GAMMA * next_q[t, k, next_a[t, k]])
    if algo == "nstep_q":
        want = plain_nstep_returns(r, term, trunc, next_q.max(axis=2), GAMMA)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- losses


def test_a3c_loss_gradient_equals_autograd_of_the_loss_written_out() -> None:
    torch.manual_seed(0)
    net = ActorCritic(SPEC, 16)
    obs = torch.randn(12, 4)
    actions = torch.randint(0, 2, (12,))
    returns = torch.randn(12)
    mask = torch.tensor([True] * 9 + [False, True, True])
    beta, c = 0.01, 0.5

    logits, values = net(obs)
    loss, entropy = a3c_loss(logits, values, actions, returns, mask, beta, c)
    ours = torch.autograd.grad(loss, list(net.parameters()))

    # The same loss, one step at a time, from the formula.
    total, ent, n = 0.0, 0.0, 0
    for i in range(12):
        if not mask[i]:
            continue
        lg, v = net(obs[i:i + 1])
        logp_all = lg[0] - torch.log(torch.exp(lg[0]).sum())
        h = -(torch.exp(logp_all) * logp_all).sum()
        adv = float((returns[i] - v[0]).detach())  # held constant in the policy term
        total = total - logp_all[actions[i]] * adv + c * (returns[i] - v[0]) ** 2 - beta * h
        ent += float(h.detach())
        n += 1
    reference = total / n
    theirs = torch.autograd.grad(reference, list(net.parameters()))
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    assert float(entropy) == pytest.approx(ent / n, rel=1e-5)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_q_loss_is_the_mean_squared_error_of_valid_steps() -> None:
    q = torch.tensor([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]], requires_grad=True)
    loss = q_loss(q, torch.tensor([1, 0, 1]), torch.tensor([3.0, 0.0, 9.0]), torch.tensor([True, True, False]))
    assert float(loss.detach()) == pytest.approx(((3 - 2) ** 2 + (0 - 0.5) ** 2) / 2)
    loss.backward()
    assert q.grad.tolist() == [[0.0, -1.0], [0.5, 0.0], [0.0, 0.0]]


# --------------------------------------------------------------------------- exploration


def test_final_epsilons_are_drawn_with_the_papers_probabilities() -> None:
    eps = draw_final_epsilons(np.random.default_rng(1), 20_000)
    assert set(np.unique(eps)) == set(PAPER_FINAL_EPSILONS)
    for value, p in zip(PAPER_FINAL_EPSILONS, (0.4, 0.3, 0.3)):
        assert abs(np.mean(eps == value) - p) < 0.015  # 20,000 draws: ~4.5 standard deviations


def test_epsilon_anneals_linearly_from_one() -> None:
    final = np.array([0.1, 0.01, 0.5])
    np.testing.assert_allclose(annealed_epsilon(final, 0, 1000), [1, 1, 1])
    np.testing.assert_allclose(annealed_epsilon(final, 500, 1000), 1 - 0.5 * (1 - final))
    np.testing.assert_allclose(annealed_epsilon(final, 1000, 1000), final)
    np.testing.assert_allclose(annealed_epsilon(final, 10**9, 1000), final)
    np.testing.assert_allclose(annealed_epsilon(final, 10, 0), final)


# --------------------------------------------------------------------------- gradients on the wire


def _net_with_grads(seed: int = 0, algo: str = "a3c") -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build_network(SPEC, 16, algo)
    for _, p in trainable(net):
        p.grad = torch.randn_like(p)
    return net


def test_gradients_round_trip_float32_exactly_and_bf16_to_bf16_precision() -> None:
    net = _net_with_grads()
    want = [p.grad for _, p in trainable(net)]
    for dtype in ("float32", "bfloat16"):
        names, arrays = gradient_arrays(net, dtype)
        msg = wire.Gradients(sender="actor-0", seq=1, version=3, names=names, arrays=arrays, dtype=dtype,
                             incarnation=9, steps=40, loss=0.5, entropy=0.25)
        got = wire.decode_gradients([bytes(memoryview(f).cast("B")) for f in wire.encode(msg)])
        assert (got.version, got.incarnation, got.steps, got.dtype, got.names) == (3, 9, 40, dtype, names)
        for g, w in zip(gradient_tensors(got.arrays, dtype), want):
            if dtype == "float32":
                assert torch.equal(g, w)
            else:
                assert torch.equal(g, w.to(torch.bfloat16).float())  # round to nearest, bit exact after


def test_q_networks_send_gradients_of_the_online_network_only() -> None:
    net = _net_with_grads(algo="nstep_q")
    names, _ = gradient_arrays(net)
    assert names and all(n.startswith("online.") for n in names)
    assert any(n.startswith("target.") for n in state_arrays(net)[0])  # the target travels with the weights


def _gradients(names, arrays, **kw) -> list[bytes]:
    msg = wire.Gradients(sender="x", seq=1, version=kw.pop("version", 0), names=names, arrays=arrays, **kw)
    return [bytes(memoryview(f).cast("B")) for f in wire.encode(msg)]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gradients_are_refused(bad: float) -> None:
    a = np.zeros((3, 2), np.float32)
    a[1, 1] = bad
    with pytest.raises(wire.WireError, match="non-finite"):
        wire.decode_gradients(_gradients(["w"], [a]))
    bits = np.zeros(6, np.uint16)
    bits[2] = np.array([bad], np.float32).view(np.uint32)[0] >> 16  # the bfloat16 of it
    with pytest.raises(wire.WireError, match="non-finite"):
        wire.decode_gradients(_gradients(["w"], [bits], dtype="bfloat16"))


def test_gradient_decoder_checks_every_field() -> None:
    import msgpack
    good = _gradients(["w"], [np.ones(4, np.float32)], loss=1.0)
    wire.decode_gradients(good)
    h = msgpack.unpackb(good[0])
    for key, value in [("version", -1), ("version", 1.5), ("inc", -1), ("dtype", "float16"), ("steps", -3),
                       ("loss", 1), ("loss", float("nan")), ("entropy", None), ("a", []), ("a", [["w", [5]]]),
                       ("a", [["w", [4], "float32"]]), ("a", [[3, [4]]]), ("a", [["w", [2 ** 29, 2 ** 29]]])]:
        frames = [msgpack.packb({**h, key: value}), *good[1:]]
        with pytest.raises(wire.WireError):
            wire.decode_gradients(frames)
    with pytest.raises(wire.WireError):
        wire.decode_gradients([good[0]])  # a frame missing


# --------------------------------------------------------------------------- the parameter server


def _server(net: torch.nn.Module, **kw) -> ParameterServer:
    args = dict(lr=1e-2, alpha=0.99, eps=1e-5, grad_clip=1.0, target_update=3, max_staleness=2)
    args.update(kw)
    return ParameterServer(net, **args)


def _grad_msgs(net: torch.nn.Module, count: int, seed: int, dtype: str = "float32") -> list[wire.Gradients]:
    rng = np.random.default_rng(seed)
    names = [n for n, _ in trainable(net)]
    out = []
    for i in range(count):
        arrays = [rng.standard_normal(tuple(p.shape)).astype(np.float32) for _, p in trainable(net)]
        if dtype == "bfloat16":
            arrays = [torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16) for a in arrays]
        out.append(wire.Gradients(sender="a", seq=i, version=0, names=names, arrays=arrays, dtype=dtype))
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_server_equals_a_plain_optimizer_given_the_same_gradients(dtype: str) -> None:
    torch.manual_seed(5)
    net = ActorCritic(SPEC, 16)
    reference = ActorCritic(SPEC, 16)
    reference.load_state_dict(net.state_dict())
    server = _server(net, max_staleness=1000)
    ms = [torch.zeros_like(p) for p in reference.parameters()]

    def rmsprop_step() -> None:  # g / sqrt(ms + eps), as TensorFlow's RMSProp (not torch's, eps outside)
        with torch.no_grad():
            for p, m in zip(reference.parameters(), ms):
                m.mul_(0.99).add_(p.grad * p.grad * (1 - 0.99))
                p.sub_(1e-2 * p.grad / torch.sqrt(m + 1e-5))
    for g in _grad_msgs(net, 30, seed=6, dtype=dtype):
        g.version = server.steps - 1 if server.steps else 0  # one update old: applied
        frames = [bytes(memoryview(f).cast("B")) for f in wire.encode(g)]
        assert server.apply(wire.decode_gradients(frames)) == "applied"
        for p, t in zip(reference.parameters(), gradient_tensors(g.arrays, dtype)):
            p.grad = t.clone()
        torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 1.0)
        rmsprop_step()
    assert server.steps == 30 and server.stats.applied == 30
    for a, b in zip(net.state_dict().values(), reference.state_dict().values()):
        # The server clips with one norm over all its gradients (a flat buffer), torch with the norm of the
        # per-tensor norms: the same global norm, rounded differently in the last bits.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_stale_and_foreign_gradients_are_dropped_and_counted() -> None:
    net = ActorCritic(SPEC, 16)
    server = _server(net, max_staleness=2)
    server.incarnation = 77
    msgs = _grad_msgs(net, 12, seed=1)
    for g in msgs:
        g.incarnation = 77
    for i in range(4):  # versions 0..3: each at the newest weights
        msgs[i].version = server.steps
        assert server.apply(msgs[i]) == "applied"
    before = {k: v.clone() for k, v in net.state_dict().items()}
    msgs[4].version = 1   # 3 updates behind: staler than 2
    msgs[5].version = 9   # ahead of the server: not weights it published
    msgs[6].incarnation = 78  # another learner process's weights
    msgs[6].version = 4
    for g in msgs[4:7]:
        assert server.apply(g) == "stale"
    msgs[7].names = list(reversed(msgs[7].names))  # another network
    msgs[7].version = 4
    assert server.apply(msgs[7]) == "mismatch"
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "a dropped gradient changed weights"
    msgs[8].version = 2   # 2 behind: still taken
    assert server.apply(msgs[8]) == "applied"
    s = server.stats
    assert (s.applied, s.stale, s.mismatched, s.staleness_max, s.staleness_sum) == (5, 3, 1, 2, 2)


def test_target_network_follows_every_target_update_updates() -> None:
    net = QWithTarget(SPEC, 16)
    server = _server(net, target_update=3, max_staleness=100)
    for i, g in enumerate(_grad_msgs(net, 7, seed=2)):
        g.version = server.steps
        server.apply(g)
        synced = all(torch.equal(a, b) for a, b in zip(net.online.state_dict().values(),
                                                        net.target.state_dict().values()))
        assert synced == (server.steps % 3 == 0), f"after {server.steps} updates"


def test_server_state_round_trips() -> None:
    net = ActorCritic(SPEC, 16)
    server = _server(net, max_staleness=100)
    for g in _grad_msgs(net, 3, seed=3):
        g.version = server.steps
        server.apply(g)
    other = _server(ActorCritic(SPEC, 16))
    other.load_state_dict(copy.deepcopy(server.state_dict()))  # as through a checkpoint file: no shared tensors
    assert other.steps == 3
    g = _grad_msgs(net, 1, seed=4)[0]
    g.version = 3
    server.apply(g)
    other.apply(g)
    for a, b in zip(server.net.state_dict().values(), other.net.state_dict().values()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- the actor-learner core


@pytest.mark.parametrize("algo", C.ASYNC_ALGOS)
def test_actor_learner_segments_give_gradients_the_server_takes(tmp_path, algo: str) -> None:
    cfg = C.parse(C.ActorConfig, ["--env", "CartPole-v1", "--algo", algo, "--run-dir", str(tmp_path),
                                  "--envs-per-actor", "4", "--t-max", "5"], "actor")
    core = ActorLearnerCore(cfg)
    server_net = build_network(env_spec("CartPole-v1"), cfg.hidden, algo)
    server = _server(server_net, max_staleness=100)
    server.incarnation = 41
    names, arrays = state_arrays(server_net)
    core.set_weights(names, arrays, version=0, incarnation=41)
    try:
        steps = 0
        for i in range(60):  # 1,200 CartPole steps: episodes end (most random ones within ~20 steps)
            g = core.segment()
            steps += g.steps
            assert gradient_mismatch(server_net, g.names, g.arrays) is None
            assert server.apply(wire.decode_gradients([bytes(memoryview(f).cast("B")) for f in wire.encode(g)])) \
                == "applied"
            names, arrays = state_arrays(server_net)
            core.set_weights(names, arrays, version=server.steps, incarnation=41)
        assert core.agent_steps == 60 * 5 * 4
        # Each episode's end is followed by one reset step of that env, which is not a transition.
        # ... so that transitions = steps taken - episodes ended + ends whose reset step is still to come.
        assert steps == core.agent_steps - len(core.episodes) + int((~core.valid).sum())
        assert len(core.episodes) > 10 and all(e["length"] >= 1 for e in core.episodes)
        eps = {e["epsilon"] for e in core.episodes}
        if algo == "a3c":
            assert eps == {0.0} and 0 < core.entropy <= math.log(2) + 1e-6
        else:
            assert all(0 < x <= 1 for x in eps)
    finally:
        core.close()
