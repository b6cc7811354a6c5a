"""apex_zmq.optim: Adam makes torch.optim's updates, RMSprop TensorFlow's (epsilon inside the square root,
checked against the formula written out), both keep torch.optim's state-dict layout, and neither imports
dynamo."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from apex_zmq import optim


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def _grads(net: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(32, 4, generator=g)
    net.zero_grad(set_to_none=True)
    (net(x) ** 2).mean().backward()


CASES = [
    ("adam", lambda p: optim.Adam(p, lr=3e-3, eps=1.5e-4),
     lambda p, fe: torch.optim.Adam(p, lr=3e-3, eps=1.5e-4, foreach=fe)),
    ("adam-betas", lambda p: optim.Adam(p, lr=1e-2, betas=(0.8, 0.99), eps=1e-8),
     lambda p, fe: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99), eps=1e-8, foreach=fe)),
]
# RMSprop's statistics and state-dict layout are torch's (only the step differs): for the layout checks.
LAYOUT_CASES = CASES + [
    ("rmsprop-centered", lambda p: optim.RMSprop(p, lr=1e-3, alpha=0.95, eps=1.5e-7, centered=True),
     lambda p, fe: torch.optim.RMSprop(p, lr=1e-3, alpha=0.95, eps=1.5e-7, centered=True, foreach=fe)),
    ("rmsprop", lambda p: optim.RMSprop(p, lr=1e-2, alpha=0.99, eps=1e-5),
     lambda p, fe: torch.optim.RMSprop(p, lr=1e-2, alpha=0.99, eps=1e-5, foreach=fe)),
]


def _tf_rmsprop(params: list[np.ndarray], grads: list[list[np.ndarray]], lr: float, rho: float, eps: float,
                centered: bool) -> list[list[np.ndarray]]:
    """TensorFlow's RMSProp (``ApplyRMSProp`` / ``ApplyCenteredRMSProp``, no momentum) one element at a
    time in float64: the parameters after each step of ``grads``."""
    p = [x.astype(np.float64).ravel().tolist() for x in params]
    ms = [[0.0] * len(x) for x in p]
    mg = [[0.0] * len(x) for x in p]
    out = []
    for step in grads:
        for t, g_t in enumerate(step):
            for j, g in enumerate(g_t.astype(np.float64).ravel().tolist()):
                ms[t][j] = rho * ms[t][j] + (1 - rho) * g * g
                if centered:
                    mg[t][j] = rho * mg[t][j] + (1 - rho) * g
                    denom = ms[t][j] - mg[t][j] * mg[t][j] + eps
                else:
                    denom = ms[t][j] + eps
                p[t][j] -= lr * g / denom ** 0.5
        out.append([np.array(x).reshape(params[i].shape) for i, x in enumerate(p)])
    return out


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("centered,lr,rho,eps", [(True, 1e-3, 0.95, 1.5e-7), (False, 1e-2, 0.99, 1e-5),
                                                 (True, 1e-2, 0.9, 0.1)])
def test_rmsprop_is_tensorflows_with_epsilon_inside_the_root(centered, lr, rho, eps, flat: bool) -> None:
    net = _net(4)
    if not flat:  # two dtypes: the per-tensor path
        net[2].double()
    opt = optim.RMSprop(net.parameters(), lr=lr, alpha=rho, eps=eps, centered=centered)
    assert (opt.flat is not None) == flat
    rng = np.random.default_rng(7)
    start = [p.detach().numpy().copy() for p in net.parameters()]
    # Gradients of a few scales (steady ones too), set by hand so the reference needs no network.
    grads = [[rng.standard_normal(p.shape) * 10.0 ** rng.integers(-4, 1) + (0.3 if step % 2 else 0.0)
              for p in start] for step in range(30)]
    expected = _tf_rmsprop(start, grads, lr, rho, eps, centered)
    for step, (g, want) in enumerate(zip(grads, expected)):
        for p, gt in zip(net.parameters(), g):
            p.grad = torch.from_numpy(gt).to(p.dtype)
        opt.step()
        for p, w in zip(net.parameters(), want):
            np.testing.assert_allclose(p.detach().double().numpy(), w, rtol=2e-5, atol=1e-6,
                                       err_msg=f"step {step + 1}")


def test_centered_rmsprop_step_stays_bounded_when_the_gradient_is_steady() -> None:
    """A steady gradient drives the centred variance to zero: with epsilon inside the root a step is at
    most ~lr * |g| / sqrt(eps); torch's convention (outside) allows lr * |g| / eps, 2,600x more here."""
    lr, eps, g = 1e-4, 1.5e-7, 1e-3
    w = torch.zeros(1)
    opt = optim.RMSprop([w], lr=lr, alpha=0.95, eps=eps, centered=True)
    for _ in range(400):
        before = float(w)
        w.grad = torch.full((1,), g)
        opt.step()
    step = before - float(w)
    assert step <= 1.01 * lr * g / eps ** 0.5
    assert step > 0.5 * lr * g / eps ** 0.5  # the variance did vanish: the bound is what limits it


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("name,ours,theirs", CASES, ids=[c[0] for c in CASES])
def test_same_updates_as_torch_optim(name, ours, theirs, foreach: bool) -> None:
    a, b = _net(0), _net(0)
    oa, ob = ours(a.parameters()), theirs(b.parameters(), foreach)
    for step in range(40):
        _grads(a, step)
        _grads(b, step)
        oa.step()
        ob.step()
        for pa, pb in zip(a.parameters(), b.parameters()):
            # foreach: the same kernels in the same order, so the same floats; the per-tensor loop may
            # differ in the last bit of a fused multiply-add
            torch.testing.assert_close(pa, pb, rtol=0 if foreach else 1e-6, atol=0 if foreach else 1e-7)
    assert oa.steps == 40


def test_a_parameter_without_gradient_is_left_alone() -> None:
    net = _net(1)
    opt = optim.Adam(net.parameters(), lr=1e-2)
    frozen = net[2].weight.detach().clone()
    _grads(net, 0)
    net[2].weight.grad = None
    opt.step()
    assert torch.equal(net[2].weight, frozen)
    assert not torch.equal(net[0].weight, _net(1)[0].weight)
    assert torch.count_nonzero(opt.state["exp_avg"][2]) == 0


@pytest.mark.parametrize("name,ours,theirs", LAYOUT_CASES, ids=[c[0] for c in LAYOUT_CASES])
def test_state_dict_round_trip_and_torch_optim_checkpoints_load(name, ours, theirs) -> None:
    a, b, c = _net(0), _net(0), _net(0)
    oa, ob = ours(a.parameters()), theirs(b.parameters(), True)
    for step in range(5):
        for net, opt in ((a, oa), (b, ob)):
            _grads(net, step)
            opt.step()
    # our state dict has torch's layout: the same keys and shapes as torch.optim's after the same steps, and
    # for Adam (torch's update) the same tensors; RMSprop's parameters took other steps from the second on
    sa, sb = copy.deepcopy(oa.state_dict()), copy.deepcopy(ob.state_dict())  # state_dict gives live tensors
    same_updates = name.startswith("adam")
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        for k in sa["state"][i]:
            assert sa["state"][i][k].shape == sb["state"][i][k].shape
            if same_updates or k == "step":
                torch.testing.assert_close(sa["state"][i][k], sb["state"][i][k])
    # a torch.optim checkpoint loads as it is; ours resumes: the next step is the uninterrupted run's
    c.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    oc = ours(c.parameters())
    oc.load_state_dict(sb)
    assert oc.steps == 5
    for i, st in sb["state"].items():
        for k in oc.slots:
            assert torch.equal(oc.state[k][i], st[k])
    oc.load_state_dict(sa)
    _grads(a, 5)
    oa.step()
    _grads(c, 5)
    oc.step()
    for pc, pa in zip(c.parameters(), a.parameters()):
        torch.testing.assert_close(pc, pa, rtol=0, atol=0)


def test_state_of_another_optimizer_or_network_is_refused() -> None:
    net = _net(0)
    adam = optim.Adam(net.parameters(), lr=1e-3)
    _grads(net, 0)
    adam.step()
    with pytest.raises(ValueError, match="optimizer state of adam, this optimizer is rmsprop"):
        optim.RMSprop(net.parameters(), lr=1e-3).load_state_dict(adam.state_dict())
    plain = optim.RMSprop(net.parameters(), lr=1e-3)
    _grads(net, 1)
    plain.step()
    with pytest.raises(ValueError, match="without \\['grad_avg'\\]"):
        optim.RMSprop(net.parameters(), lr=1e-3, centered=True).load_state_dict(plain.state_dict())
    for change, what in ((lambda t: t.double(), "torch.float64 \\[16, 4\\], this parameter is torch.float32"),
                         (lambda t: t[:, :1].clone(),
                          "torch.float32 \\[16, 1\\], this parameter is torch.float32 \\[16, 4\\]")):
        sd = copy.deepcopy(adam.state_dict())
        sd["state"][0]["exp_avg"] = change(sd["state"][0]["exp_avg"])  # [16, 1] would broadcast into copy_
        fresh = optim.Adam(net.parameters(), lr=1e-3)
        with pytest.raises(ValueError, match="'exp_avg' of parameter 0 is " + what):
            fresh.load_state_dict(sd)
        assert fresh.steps == 0 and not fresh.flat_state["exp_avg_sq"].any()  # nothing was loaded
    with pytest.raises(ValueError, match="4 parameters, this network has 2"):
        optim.Adam(nn.Linear(4, 2).parameters(), lr=1e-3).load_state_dict(adam.state_dict())


def test_learner_steps_without_importing_dynamo() -> None:
    """torch.optim imports torch._dynamo (~800 modules, seconds on a loaded 2-core machine) on the
    learner's path to its first step; the learning rules' optimizers must not."""
    code = """
import sys
import numpy as np, torch
from torch import nn
from learner.dqn import Batch, DQNLearner
from learner.param_server import ParameterServer
for opt in ("adam", "rmsprop"):
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    rule = DQNLearner(net, opt, 1e-3, 10, 10.0)
    z = torch.zeros(4)
    rule.step(Batch(obs=torch.randn(4, 4), action=torch.zeros(4, dtype=torch.long), ret=z, disc=z,
                    next_obs=torch.randn(4, 4), weight=torch.ones(4), ids=np.arange(4)))
    rule.load_state_dict(rule.state_dict())
ParameterServer(nn.Linear(4, 2), 1e-3, 0.99, 1e-5, 40.0, 100, 32).opt.step()
print("torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]


@pytest.mark.parametrize("name,ours,theirs", CASES, ids=[c[0] for c in CASES])
def test_flat_buffer_path_with_clipping_matches_torch(name, ours, theirs) -> None:
    """Parameters, gradients and state live in one flat buffer; zero_grad keeps the gradients views of
    it, so backward adds into it; clipping with one norm matches torch's per-tensor one to rounding."""
    a, b = _net(2), _net(2)
    oa, ob = ours(a.parameters()), theirs(b.parameters(), True)
    assert oa.flat is not None
    for step in range(25):
        x = torch.randn(32, 4, generator=torch.Generator().manual_seed(step))
        oa.zero_grad()
        ob.zero_grad()
        (a(x) ** 2).mean().backward()
        (b(x) ** 2).mean().backward()
        for p in a.parameters():  # backward added into the flat buffer: no per-tensor copies
            assert p.grad.untyped_storage().data_ptr() == oa.flat_grad.untyped_storage().data_ptr()
        na = oa.clip_grad_norm_(1e-3)  # small enough to clip every step
        nb = torch.nn.utils.clip_grad_norm_(list(b.parameters()), 1e-3)
        torch.testing.assert_close(na, nb, rtol=1e-5, atol=0)  # rounding, compounded over the steps
        assert float(nb) > 1e-3
        oa.step()
        ob.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert pa.untyped_storage().data_ptr() == oa.flat.untyped_storage().data_ptr()
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    # the network's own state dict and a load into it go through the views
    sd = {k: v.clone() for k, v in a.state_dict().items()}
    with torch.no_grad():
        oa.flat.zero_()
    a.load_state_dict(sd)
    torch.testing.assert_close(oa.flat, torch.cat([v.reshape(-1) for v in sd.values()]))


def test_parameters_of_two_dtypes_take_the_per_tensor_path() -> None:
    net = _net(3)
    net[2].double()
    opt = optim.Adam(net.parameters(), lr=1e-2)
    assert opt.flat is None
    x = torch.randn(8, 4)
    opt.zero_grad()
    net[2](net[1](net[0](x)).double()).sum().backward()
    before = [p.detach().clone() for p in net.parameters()]
    opt.clip_grad_norm_(1.0)
    opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(net.parameters(), before))


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("max_norm", [0.0, -1.0])
def test_a_clip_of_zero_or_below_does_not_clip(max_norm: float, flat: bool) -> None:
    """--grad-clip 0 means no clipping (as the parameter server reads it), not a zero gradient."""
    net = _net(5)
    if not flat:
        net[2].double()
    opt = optim.Adam(net.parameters(), lr=1e-2)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    opt.zero_grad()
    out = net[2](net[1](net[0](x)).to(net[2].weight.dtype))
    (out ** 2).sum().backward()
    before = [p.grad.detach().clone() for p in net.parameters()]
    norm = opt.clip_grad_norm_(max_norm)
    want = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in before]))
    torch.testing.assert_close(float(norm), float(want), rtol=1e-5, atol=0)
    for p, g in zip(net.parameters(), before):
        assert torch.equal(p.grad, g)
    start = [p.detach().clone() for p in net.parameters()]
    opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(net.parameters(), start))


def test_rmsprop_flags_reach_the_replay_learners() -> None:
    from apex_zmq import config as C
    from apex_zmq.envs import env_spec
    from learner.algos import make_rule
    for algo in ("dqn", "rainbow", "iqn"):
        cfg = C.LearnerConfig(env="CartPole-v1", algo=algo, optimizer="rmsprop", rmsprop_alpha=0.9,
                              rmsprop_eps=1e-6, hidden=16, device="cpu")
        opt = make_rule(env_spec(cfg.env), cfg, torch.device("cpu")).opt
        assert isinstance(opt, optim.RMSprop)
        assert (opt.hyper["alpha"], opt.hyper["eps"], opt.hyper["centered"]) == (0.9, 1e-6, True)


def _conv_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


@pytest.mark.parametrize("make", [lambda p: optim.Adam(p, lr=1e-2, eps=1e-8),
                                  lambda p: optim.RMSprop(p, lr=1e-3, alpha=0.95, eps=1.5e-7, centered=True)],
                         ids=["adam", "rmsprop-centered"])
def test_channels_last_parameters_keep_their_layout_and_the_flat_update(make) -> None:
    """Re-seating a channels-last conv weight as a view of the flat buffer would drop its layout: such a
    network takes the per-tensor path, with the same update as the flat one."""
    flat_net, cl_net = _conv_net(6), _conv_net(6).to(memory_format=torch.channels_last)
    conv_weights = [cl_net[0].weight, cl_net[2].weight]
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in conv_weights)
    flat_opt, cl_opt = make(flat_net.parameters()), make(cl_net.parameters())
    assert flat_opt.flat is not None and cl_opt.flat is None
    rng = torch.Generator().manual_seed(3)
    for step in range(10):
        for p, q in zip(flat_net.parameters(), cl_net.parameters()):
            g = torch.randn(p.shape, generator=rng)
            p.grad = g.clone()
            q.grad = g.clone().contiguous(memory_format=torch.preserve_format if q.dim() != 4
                                          else torch.channels_last)
        flat_opt.clip_grad_norm_(5.0)
        cl_opt.clip_grad_norm_(5.0)
        flat_opt.step()
        cl_opt.step()
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights)
    assert all(s.is_contiguous(memory_format=torch.channels_last)
               for slot in cl_opt.state.values() for s, p in zip(slot, cl_net.parameters()) if p.dim() == 4)
    for p, q in zip(flat_net.parameters(), cl_net.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("move", ["to", "data", "assign"])
def test_a_parameter_moved_off_the_flat_buffer_is_an_error(move: str) -> None:
    net = _net(7)
    opt = optim.Adam(net.parameters(), lr=1e-2, module=net)
    _grads(net, 0)
    opt.step()
    if move == "to":  # what .to(device) does to every parameter (here a dtype, on CPU)
        net.to(torch.float64)
    elif move == "data":
        net[0].weight.data = net[0].weight.detach().clone()
    else:  # new Parameter objects in the module: the optimizer's own ones stay views, unread
        net.load_state_dict({k: v.clone() for k, v in net.state_dict().items()}, assign=True)
    if move != "to":
        _grads(net, 1)
    with pytest.raises(RuntimeError, match="no longer shares|is not the one this optimizer updates"):
        opt.step()
    with pytest.raises(RuntimeError, match="no longer shares|is not the one this optimizer updates"):
        opt.clip_grad_norm_(1.0)
