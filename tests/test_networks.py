"""Networks: the acting copy computes the same Q values as the trained network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apex_zmq import cpu
from apex_zmq.cpu import CpuCaps
from apex_zmq.envs import EnvSpec
from apex_zmq.models import build_network
from apex_zmq.networks import (
    ActingChoice,
    ActingNetwork,
    Int8ActingNetwork,
    choose_acting,
    greedy_agreement,
    int8_engine,
    load_arrays,
    make_acting_network,
    state_arrays,
)

ATARI = EnvSpec("ALE/Pong-v5", (4, 84, 84), "uint8", 6, True)
VECTOR = EnvSpec("CartPole-v1", (4,), "float32", 2, False)
MINATAR = EnvSpec("MinAtar/Breakout-v0", (4, 10, 10), "uint8", 6, False, pixel_max=1)


def _obs(spec: EnvSpec, n: int, rng: np.random.Generator) -> torch.Tensor:
    if spec.obs_dtype == "uint8":
        return torch.as_tensor(rng.integers(0, 256, (n, *spec.obs_shape), dtype=np.uint8))
    return torch.as_tensor(rng.normal(size=(n, *spec.obs_shape)).astype(np.float32))


@pytest.mark.parametrize("dueling", [True, False])
@pytest.mark.parametrize("spec,hidden", [(ATARI, 512), (VECTOR, 64), (MINATAR, 128)])
def test_acting_network_matches_and_follows_sync(spec: EnvSpec, hidden: int, dueling: bool) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = build_network(spec, hidden, dueling=dueling).eval()
    assert (net.value is not None) == dueling  # one head: Q straight from the advantage stream's layers
    acting = ActingNetwork(net)
    x = _obs(spec, 8, rng)
    with torch.no_grad():
        torch.testing.assert_close(acting(x), net(x), rtol=1e-4, atol=1e-5)
        # New weights: stale until synced, equal after.
        other = build_network(spec, hidden, dueling=dueling)
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


def _int8_pair(seed: int, levels: int) -> tuple[torch.nn.Module, Int8ActingNetwork]:
    """A seeded Atari network and its int8 acting copy."""
    torch.manual_seed(seed)
    net = build_network(ATARI, 512).eval()
    return net, Int8ActingNetwork(net, levels=levels)


def _int8_levels_here() -> list[int]:
    """The int8 ranges that are sound on this CPU: 7 bits everywhere, 8 bits only with VNNI."""
    return [127, 255] if cpu.detect().vnni else [127]


@needs_int8
@pytest.mark.parametrize("levels", _int8_levels_here())
@pytest.mark.parametrize("seed", [2, 4])
def test_int8_acting_network_is_close_to_float32_and_really_int8(pong_frames: torch.Tensor, seed: int,
                                                                  levels: int) -> None:
    net, acting = _int8_pair(seed, levels)
    x = pong_frames
    with torch.no_grad():
        q, ref = acting(x), net(x)
    assert q.dtype == torch.float32 and q.shape == ref.shape
    assert all(c.weight().dtype == torch.qint8 for c in acting.convs)  # int8 kernels ran
    assert not torch.equal(q, ref)
    # 8-bit weights and activations: errors of ~1% of the Q scale, as bf16's. (8-bit activations on
    # a CPU without VNNI saturate fbgemm's 16-bit pair sums: 2-5% here, 5-13% seen in the field.)
    assert (q - ref).abs().max() <= 0.03 * ref.abs().max()


@needs_int8
def test_the_acting_copy_auto_picks_here_is_close_to_float32(pong_frames: torch.Tensor) -> None:
    choice = choose_acting("auto", True, cpu.detect(), int8_engine())
    torch.manual_seed(5)
    net = build_network(ATARI, 512).eval()
    acting = make_acting_network(net, choice)
    with torch.no_grad():
        q, ref = acting(pong_frames), net(pong_frames)
    assert (q - ref).abs().max() <= 0.03 * ref.abs().max(), choice


@needs_int8
@pytest.mark.parametrize("levels", _int8_levels_here())
def test_int8_acting_network_requantizes_after_sync_with_scales_from_its_batch(
        pong_frames: torch.Tensor, levels: int) -> None:
    net, acting = _int8_pair(3, levels)
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
def test_int8_agreement_is_measured_on_the_calibration_batch(pong_frames: torch.Tensor) -> None:
    net, acting = _int8_pair(6, 127)
    with torch.no_grad():
        q = acting(pong_frames)  # calibrates on frames 0, 2, 4, ... (16 of 32)
        sample = pong_frames[::2]
        expected = (acting(sample).argmax(1) == net(sample).argmax(1)).float().mean().item()
    assert acting.agreement == pytest.approx(expected)
    assert q.shape == (32, 6)
    # The pure function it uses: rows whose greedy actions agree.
    assert greedy_agreement(np.array([[1, 0], [0, 1], [2, 3]]), np.array([[1, 0], [1, 0], [0, 5]])) == pytest.approx(2 / 3)


@needs_int8
def test_int8_acting_network_wants_frames() -> None:
    acting = Int8ActingNetwork(build_network(ATARI, 512))
    with pytest.raises(TypeError, match="uint8"):
        acting(torch.zeros(2, *ATARI.obs_shape))


# CPUs seen in the field, faked: what each one is, not what this machine is.
ZEN4 = CpuCaps("AMD EPYC 9R14", 2, x86=True, avx2=True, avx512=True, vnni=True, bf16=True, amx=False)
ZEN3 = CpuCaps("AMD EPYC 7R13", 2, x86=True, avx2=True, avx512=False, vnni=False, bf16=False, amx=False)
SAPPHIRE = CpuCaps("Intel Xeon Platinum 8488C", 64, x86=True, avx2=True, avx512=True, vnni=True, bf16=True,
                   amx=True)
ALDER = CpuCaps("12th Gen Intel Core i7", 8, x86=True, avx2=True, avx512=False, vnni=True, bf16=False, amx=False)
GRAVITON3 = CpuCaps("Neoverse-V1", 64, x86=False, avx2=False, avx512=False, vnni=False, bf16=True, amx=False)
GRAVITON2 = CpuCaps("Neoverse-N1", 64, x86=False, avx2=False, avx512=False, vnni=False, bf16=False, amx=False)


@pytest.mark.parametrize("name,conv,caps,engine,dtype,levels,bits", [
    ("auto", True, ZEN4, "x86", "int8", 255, 8),
    ("auto", True, SAPPHIRE, "x86", "int8", 255, 8),
    ("auto", True, ALDER, "x86", "int8", 255, 8),        # AVX-VNNI without AVX-512
    ("auto", True, ZEN3, "x86", "int8", 127, 7),         # no VNNI: 7-bit activations
    ("auto", True, ZEN3, "fbgemm", "int8", 127, 7),
    ("auto", False, ZEN4, "x86", "bfloat16", 0, 16),     # the MLP never goes int8
    ("auto", False, ZEN3, "x86", "float32", 0, 32),
    ("auto", True, GRAVITON3, None, "bfloat16", 0, 16),  # no x86 int8 kernels
    ("auto", True, GRAVITON2, None, "float32", 0, 32),
    ("auto", True, ZEN4, None, "bfloat16", 0, 16),       # a torch without int8 kernels
    ("int8", True, ZEN3, "x86", "int8", 127, 7),
    ("int8", True, ZEN4, "onednn", "int8", 255, 8),
    ("float32", True, ZEN4, "x86", "float32", 0, 32),
    ("bfloat16", False, ZEN3, "x86", "bfloat16", 0, 16),
])
def test_acting_choice_per_cpu(name: str, conv: bool, caps: CpuCaps, engine, dtype: str, levels: int,
                               bits: int) -> None:
    choice = choose_acting(name, conv, caps, engine)
    assert (choice.dtype, choice.levels, choice.bits) == (dtype, levels, bits)
    assert choice.why


def test_acting_choice_refusals_name_the_reason() -> None:
    with pytest.raises(ValueError, match="Nature CNN"):
        choose_acting("int8", False, ZEN4, "x86")
    with pytest.raises(ValueError, match="int8 kernels"):
        choose_acting("int8", True, GRAVITON3, None)
    with pytest.raises(ValueError, match="one of"):
        choose_acting("fp8", True, ZEN4, "x86")
    assert "emulated" in choose_acting("bfloat16", True, ZEN3, "x86").why


def test_make_acting_network_builds_the_chosen_copy() -> None:
    assert isinstance(make_acting_network(build_network(VECTOR, 64), ActingChoice("float32")), ActingNetwork)
    bf16 = make_acting_network(build_network(VECTOR, 64), ActingChoice("bfloat16"))
    assert bf16.head.weight.dtype == torch.bfloat16
    if int8_engine():
        int8 = make_acting_network(build_network(ATARI, 512), ActingChoice("int8", 127))
        assert isinstance(int8, Int8ActingNetwork) and int8.levels == 127


def test_cpu_description_names_model_extensions_and_cores() -> None:
    assert ZEN4.describe() == "AMD EPYC 9R14 [AVX2 AVX-512 VNNI BF16] 2 cores"
    assert ZEN3.describe() == "AMD EPYC 7R13 [AVX2] 2 cores"
    here = cpu.detect()
    assert here.cores >= 1 and str(here.cores) in here.describe()


def test_heads_stay_float32_under_bf16_autocast() -> None:
    """The torso runs in bf16 under autocast; the heads, Q and the TD error in float32."""
    from learner.dqn import Batch, double_dqn_td
    torch.manual_seed(7)
    net = build_network(ATARI, 512).eval()
    target = build_network(ATARI, 512).eval()
    x = _obs(ATARI, 16, np.random.default_rng(7))
    seen = {}
    net.value[0].register_forward_hook(lambda m, i, o: seen.update(value_in=i[0].dtype, value_out=o.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = net.torso(x)
        q = net(x)
    assert h.dtype == torch.bfloat16  # the convolutions did run in bf16
    assert seen == {"value_in": torch.float32, "value_out": torch.float32}
    # The heads in float32 on the bf16 features: exactly what float32 heads give on those features.
    with torch.no_grad():
        hf = h.float()
        a = net.advantage(hf)
        torch.testing.assert_close(q, net.value(hf) + a - a.mean(1, keepdim=True), rtol=0, atol=0)
    # TD errors: float32, and close to the all-float32 ones (only the torso's rounding remains).
    b = Batch(obs=x, action=torch.randint(0, 6, (16,)), ret=torch.full((16,), 10.0), disc=torch.full((16,), 0.97),
              next_obs=x.flip(0), weight=torch.ones(16), ids=np.arange(16))
    with torch.no_grad():
        td32 = double_dqn_td(net, target, b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            td_amp = double_dqn_td(net, target, b)
    assert td_amp.dtype == torch.float32
    assert (td_amp - td32).abs().max() <= 0.02 * (td32.abs().max() + 1)


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
