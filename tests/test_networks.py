"""Networks: the acting copy computes the same Q values as the trained network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apex_zmq.envs import EnvSpec
from apex_zmq.networks import (ActingNetwork, Int8ActingNetwork, bf16_supported, build_network, int8_engine,
                               load_arrays, make_acting_network, resolve_acting_dtype, state_arrays)

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


needs_int8 = pytest.mark.skipif(int8_engine() is None, reason="no x86 int8 kernels in this torch")


@pytest.fixture(scope="module")
def pong_frames() -> torch.Tensor:
    """32 real Pong observations after some random play (what the actor's network sees)."""
    from apex_zmq.envs import make_vector_env
    n = 32
    env = make_vector_env("ALE/Pong-v5", n, seed=3, num_threads=1)
    try:
        rng = np.random.default_rng(3)
        for _ in range(60):
            obs = env.step(rng.integers(0, 6, n))[0]
        return torch.as_tensor(obs)
    finally:
        env.close()


def _int8_pair(seed: int) -> tuple[torch.nn.Module, Int8ActingNetwork]:
    """A seeded Atari network and its int8 acting copy."""
    torch.manual_seed(seed)
    net = build_network(ATARI, 512).eval()
    return net, Int8ActingNetwork(net)


@needs_int8
def test_int8_acting_network_is_close_to_float32_and_really_int8(pong_frames: torch.Tensor) -> None:
    net, acting = _int8_pair(2)
    x = pong_frames
    with torch.no_grad():
        q, ref = acting(x), net(x)
    assert q.dtype == torch.float32 and q.shape == ref.shape
    assert all(c.weight().dtype == torch.qint8 for c in acting.convs)  # int8 kernels ran
    assert not torch.equal(q, ref)
    # 8-bit weights and activations: errors of ~1% of the Q scale, as bf16's.
    assert (q - ref).abs().max() <= 0.03 * ref.abs().max()


@needs_int8
def test_int8_acting_network_requantizes_after_sync_with_scales_from_its_batch(
        pong_frames: torch.Tensor) -> None:
    net, acting = _int8_pair(3)
    x = pong_frames[:8]
    with torch.no_grad():
        acting(x)
        scales = [c.scale for c in acting.convs] + [acting.head.scale]
        # The learner doubles every weight: stale until synced, then equal to the new net's Q again.
        for p in net.parameters():
            p.mul_(2.0)
        stale = acting(x)
        assert (stale - net(x)).abs().max() > 0.1 * net(x).abs().max()
        acting.sync(net)
        assert acting.stale
        q = acting(x)
        assert not acting.stale
        assert (q - net(x)).abs().max() <= 0.03 * net(x).abs().max()
    # Calibrated on the batch: conv1's outputs doubled (weights and bias x2), so did its scale.
    assert acting.convs[0].scale == pytest.approx(2 * scales[0], rel=1e-4)
    assert all(c.scale > s for c, s in zip([*acting.convs, acting.head], scales))


@needs_int8
def test_int8_acting_network_wants_frames() -> None:
    acting = Int8ActingNetwork(build_network(ATARI, 512))
    with pytest.raises(TypeError, match="uint8"):
        acting(torch.zeros(2, *ATARI.obs_shape))


def test_acting_dtype_resolution() -> None:
    assert resolve_acting_dtype("float32", True) == "float32"
    assert resolve_acting_dtype("bfloat16", False) == "bfloat16"
    native = "bfloat16" if bf16_supported() else "float32"
    assert resolve_acting_dtype("auto", False) == native  # the MLP never goes int8
    assert resolve_acting_dtype("auto", True) == ("int8" if int8_engine() else native)
    with pytest.raises(ValueError, match="Nature CNN"):
        resolve_acting_dtype("int8", False)
    with pytest.raises(ValueError, match="one of"):
        resolve_acting_dtype("fp8", True)
    kinds = {"float32": ActingNetwork, "bfloat16": ActingNetwork, "auto": ActingNetwork}
    for name, cls in kinds.items():
        assert isinstance(make_acting_network(build_network(VECTOR, 64), name), cls)
    if int8_engine():
        assert isinstance(make_acting_network(build_network(ATARI, 512), "auto"), Int8ActingNetwork)


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
