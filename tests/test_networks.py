"""Networks: the acting copy computes the same Q values as the trained network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apex_zmq.envs import EnvSpec
from apex_zmq.networks import ActingNetwork, build_network, load_arrays, state_arrays

ATARI = EnvSpec("ALE/Pong-v5", (4, 84, 84), "uint8", 6, True)
VECTOR = EnvSpec("CartPole-v1", (4,), "float32", 2, False)


def _obs(spec: EnvSpec, n: int, rng: np.random.Generator) -> torch.Tensor:
    if spec.obs_dtype == "uint8":
        return torch.as_tensor(rng.integers(0, 256, (n, *spec.obs_shape), dtype=np.uint8))
    return torch.as_tensor(rng.normal(size=(n, *spec.obs_shape)).astype(np.float32))


@pytest.mark.parametrize("spec,hidden", [(ATARI, 512), (VECTOR, 64)])
def test_acting_network_matches_and_follows_sync(spec: EnvSpec, hidden: int) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = build_network(spec, hidden).eval()
    acting = ActingNetwork(net)
    x = _obs(spec, 8, rng)
    with torch.no_grad():
        torch.testing.assert_close(acting(x), net(x), rtol=1e-4, atol=1e-5)
        # New weights: stale until synced, equal after.
        other = build_network(spec, hidden)
        names, arrays = state_arrays(other)
        load_arrays(net, names, arrays)
        assert not torch.allclose(acting(x), net(x))
        acting.sync(net)
        torch.testing.assert_close(acting(x), net(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec,hidden", [(ATARI, 512), (VECTOR, 64)])
def test_bf16_acting_network_is_close_to_float32(spec: EnvSpec, hidden: int) -> None:
    torch.manual_seed(1)
    net = build_network(spec, hidden).eval()
    acting = ActingNetwork(net, dtype=torch.bfloat16)
    x = _obs(spec, 64, np.random.default_rng(1))
    with torch.no_grad():
        q, ref = acting(x), net(x)
    assert q.dtype == torch.float32 and acting.head.weight.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: errors of a few 1e-3 of the Q scale, not more.
    scale = ref.abs().max()
    assert (q - ref).abs().max() <= 0.03 * scale
    assert not torch.equal(q, ref)  # really ran in bf16


def test_load_arrays_rejects_wrong_shapes() -> None:
    net = build_network(VECTOR, 64)
    names, arrays = state_arrays(build_network(VECTOR, 32))
    with pytest.raises(ValueError, match="shape"):
        load_arrays(net, names, arrays)


def test_weights_mismatch_names_the_reason_and_accepts_matching_weights() -> None:
    from apex_zmq.networks import weights_mismatch
    net = build_network(VECTOR, 64)
    assert weights_mismatch(net, *state_arrays(build_network(VECTOR, 64))) is None
    assert "shape" in weights_mismatch(net, *state_arrays(build_network(VECTOR, 32)))
    names, arrays = state_arrays(build_network(ATARI, 64))
    assert "parameters" in weights_mismatch(net, names, arrays)
