"""apex_zmq.optim makes torch.optim's updates, keeps its state-dict layout, and does not import dynamo."""

from __future__ import annotations

import copy
import subprocess
import sys

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
    ("rmsprop-centered", lambda p: optim.RMSprop(p, lr=1e-3, alpha=0.95, eps=1.5e-7, centered=True),
     lambda p, fe: torch.optim.RMSprop(p, lr=1e-3, alpha=0.95, eps=1.5e-7, centered=True, foreach=fe)),
    ("rmsprop", lambda p: optim.RMSprop(p, lr=1e-2, alpha=0.99, eps=1e-5),
     lambda p, fe: torch.optim.RMSprop(p, lr=1e-2, alpha=0.99, eps=1e-5, foreach=fe)),
]


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


@pytest.mark.parametrize("name,ours,theirs", CASES, ids=[c[0] for c in CASES])
def test_state_dict_round_trip_and_torch_optim_checkpoints_load(name, ours, theirs) -> None:
    a, b, c = _net(0), _net(0), _net(0)
    oa, ob = ours(a.parameters()), theirs(b.parameters(), True)
    for step in range(5):
        for net, opt in ((a, oa), (b, ob)):
            _grads(net, step)
            opt.step()
    # our state dict has torch's layout: the same keys and tensors as torch.optim's after the same steps
    sa, sb = copy.deepcopy(oa.state_dict()), copy.deepcopy(ob.state_dict())  # state_dict gives live tensors
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        for k in sa["state"][i]:
            torch.testing.assert_close(sa["state"][i][k], sb["state"][i][k])
    # a torch.optim checkpoint, and our own, resumes: the next step is the uninterrupted run's
    at5 = {k: v.clone() for k, v in b.state_dict().items()}
    _grads(b, 5)
    ob.step()
    for saved in (sb, sa):
        c.load_state_dict(at5)
        oc = ours(c.parameters())
        oc.load_state_dict(saved)
        assert oc.steps == 5
        _grads(c, 5)
        oc.step()
        for pc, pb in zip(c.parameters(), b.parameters()):
            torch.testing.assert_close(pc, pb, rtol=0, atol=0)


def test_state_of_another_optimizer_or_network_is_refused() -> None:
    net = _net(0)
    adam = optim.Adam(net.parameters(), lr=1e-3)
    _grads(net, 0)
    adam.step()
    with pytest.raises(ValueError, match="without"):
        optim.RMSprop(net.parameters(), lr=1e-3).load_state_dict(adam.state_dict())
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
