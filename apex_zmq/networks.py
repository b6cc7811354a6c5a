"""Dueling Q networks: an MLP for vector observations, the Nature CNN for Atari."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from .envs import EnvSpec


class Dueling(nn.Module):
    """Q(s, a) = V(s) + A(s, a) - mean_a A(s, a) on top of a feature torso."""

    def __init__(self, torso: nn.Module, features: int, hidden: int, num_actions: int) -> None:
        super().__init__()
        self.torso = torso
        self.value = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.advantage = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(),
                                       nn.Linear(hidden, num_actions))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        h = self.torso(obs)
        a = self.advantage(h)
        return self.value(h) + a - a.mean(dim=1, keepdim=True)


class NatureTorso(nn.Module):
    """Mnih et al. 2015 convolutions over uint8 [B, 4, 84, 84] frames (scaled to [0, 1] here)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs.float() / 255.0)


def build_network(spec: EnvSpec, hidden: int) -> Dueling:
    """The dueling network for ``spec``: Nature CNN for image stacks, else a 2-layer MLP."""
    if len(spec.obs_shape) == 3:
        torso = NatureTorso(spec.obs_shape[0])
        with torch.no_grad():
            features = torso(torch.zeros(1, *spec.obs_shape, dtype=torch.uint8)).shape[1]
        return Dueling(torso, features, hidden, spec.num_actions)
    obs_dim = int(np.prod(spec.obs_shape))
    torso = nn.Sequential(nn.Flatten(), nn.Linear(obs_dim, hidden), nn.ReLU())
    return Dueling(torso, hidden, hidden, spec.num_actions)


def bf16_supported() -> bool:
    """True where the CPU runs bfloat16 convolutions and matmuls natively (AVX512-BF16, AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def int8_engine() -> str | None:
    """torch's int8 kernel engine for x86 CPUs (fbgemm / oneDNN, VNNI where present), or None."""
    engines = torch.backends.quantized.supported_engines
    return next((e for e in ("x86", "onednn", "fbgemm") if e in engines), None)


ACTING_DTYPES = ("auto", "float32", "bfloat16", "int8")


def resolve_acting_dtype(name: str, conv: bool) -> str:
    """The acting copy's number format for the ``--acting-dtype`` setting.

    ``auto``: int8 for the Nature CNN on x86 CPUs (about 1.8x faster than bf16 here, Q values as
    close to float32 as bf16's), else bfloat16 where the CPU has it natively, else float32.
    """
    if name not in ACTING_DTYPES:
        raise ValueError(f"acting dtype must be one of {ACTING_DTYPES}, got {name!r}")
    if name == "int8" and not conv:
        raise ValueError("int8 acting needs the Nature CNN (an Atari env); use float32 or bfloat16")
    if name == "int8" and int8_engine() is None:
        raise ValueError("int8 acting needs torch's x86 int8 kernels (fbgemm/oneDNN), absent on this CPU")
    if name != "auto":
        return name
    if conv and int8_engine() is not None:
        return "int8"
    return "bfloat16" if bf16_supported() else "float32"


def make_acting_network(net: Dueling, name: str = "auto") -> nn.Module:
    """The inference-only acting copy of ``net`` in the format ``--acting-dtype`` asks for."""
    kind = resolve_acting_dtype(name, isinstance(net.torso, NatureTorso))
    if kind == "int8":
        return Int8ActingNetwork(net)
    return ActingNetwork(net, torch.bfloat16 if kind == "bfloat16" else torch.float32)


class ActingNetwork(nn.Module):
    """An inference-only copy of a ``Dueling`` network arranged for fast batched acting on CPU.

    Same outputs (to float rounding): the 1/255 input scaling is folded into the first conv's
    weights (saves a pass over the input) and the first layers of the value and advantage heads
    run as one matmul. With ``dtype=torch.bfloat16`` the copy runs in bf16 (about 2.5x faster on
    CPUs with native bf16; Q values then agree to ~1%, plenty for epsilon-greedy acting and initial
    priorities, while the learner keeps training in float32). Returns float32 Q values either way.
    Call ``sync`` after the source network's weights change.
    """

    def __init__(self, net: Dueling, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.dtype = dtype
        self.torso = copy.deepcopy(net.torso)
        self.folded = isinstance(self.torso, NatureTorso)
        v0, a0 = net.value[0], net.advantage[0]
        self.hidden = v0.out_features
        self.head = nn.Linear(v0.in_features, v0.out_features + a0.out_features)
        self.value_out = copy.deepcopy(net.value[2])
        self.advantage_out = copy.deepcopy(net.advantage[2])
        self.to(dtype)
        self.sync(net)
        self.eval()

    @torch.no_grad()
    def sync(self, net: Dueling) -> None:
        """Copy (and rearrange) the weights of ``net``."""
        self.torso.load_state_dict(net.torso.state_dict())
        if self.folded:
            self.torso.net[0].weight.mul_(1.0 / 255.0)
        v0, a0 = net.value[0], net.advantage[0]
        self.head.weight.copy_(torch.cat([v0.weight, a0.weight]))
        self.head.bias.copy_(torch.cat([v0.bias, a0.bias]))
        self.value_out.load_state_dict(net.value[2].state_dict())
        self.advantage_out.load_state_dict(net.advantage[2].state_dict())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        h = self.torso.net(obs.to(self.dtype)) if self.folded else self.torso(obs.to(self.dtype))
        h = torch.relu(self.head(h))
        a = self.advantage_out(h[:, self.hidden:])
        return (self.value_out(h[:, :self.hidden]) + a - a.mean(dim=1, keepdim=True)).float()


class Int8ActingNetwork(nn.Module):
    """An int8 acting copy of a Nature-CNN ``Dueling`` network for CPUs (fbgemm/oneDNN kernels).

    Weights are quantized per output channel (symmetric int8), each ReLU's output per tensor
    (uint8, zero point 0) with a scale calibrated on the observations the copy acts on: ``sync``
    marks the copy stale and its next call re-quantizes, running the float copy over up to
    ``calibration`` observations spread over that call's own batch first (~40 ms, once per
    weights update), so the scales follow the network as it trains. Observations enter as a zero-copy
    quint8 view of the uint8 frames (scale 1: the 1/255 is folded into the first conv); the two
    small output layers of the dueling heads run in float32. Q values agree with float32 about as
    closely as bf16's do; returns float32 Q values.
    """

    calibration = 16  # observations per re-quantization pass

    def __init__(self, net: Dueling) -> None:
        super().__init__()
        from torch.ao.nn.intrinsic import quantized as nniq  # only this path needs torch.ao

        engine = int8_engine()
        if engine is None or not isinstance(net.torso, NatureTorso):
            raise ValueError("int8 acting needs the Nature CNN and torch's x86 int8 kernels")
        torch.backends.quantized.engine = engine
        self.ref = ActingNetwork(net, torch.float32)  # float weights: calibration and the output layers
        # A tuple, not a ModuleList: these are the float copy's own layers, registered under ref.
        self._float_convs = tuple(m for m in self.ref.torso.net if isinstance(m, nn.Conv2d))
        with _quiet_int8():
            self.convs = nn.ModuleList(nniq.ConvReLU2d(c.in_channels, c.out_channels, c.kernel_size,
                                                       c.stride) for c in self._float_convs)
            self.head = nniq.LinearReLU(self.ref.head.in_features, self.ref.head.out_features)
        self.hidden = self.ref.hidden
        self.stale = True

    def sync(self, net: Dueling) -> None:
        """Copy the weights of ``net``; quantized at the next call, calibrated on its batch."""
        self.ref.sync(net)
        self.stale = True

    @torch.no_grad()
    def _quantize(self, obs: torch.Tensor) -> None:
        with _quiet_int8():
            step = -(-len(obs) // self.calibration)  # spread over the batch's envs
            x = obs[::step].float()
            for conv, q in zip(self._float_convs, self.convs):
                x = torch.relu(conv(x))
                q.set_weight_bias(_int8_per_channel(conv.weight), conv.bias)
                q.scale, q.zero_point = _relu_scale(x), 0
            h = torch.relu(self.ref.head(x.flatten(1)))
            self.head.set_weight_bias(_int8_per_channel(self.ref.head.weight), self.ref.head.bias)
            self.head.scale, self.head.zero_point = _relu_scale(h), 0
        self.stale = False

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if obs.dtype != torch.uint8:
            raise TypeError(f"int8 acting expects uint8 frames, got {obs.dtype}")
        if self.stale:
            self._quantize(obs)
        # Pixel values 0..255 are exactly quint8 with scale 1, zero point 0: a view, no conversion.
        x = torch._make_per_tensor_quantized_tensor(obs.contiguous(), 1.0, 0)
        for conv in self.convs:
            x = conv(x)
        h = self.head(x.flatten(1)).dequantize()
        a = self.ref.advantage_out(h[:, self.hidden:])
        return self.ref.value_out(h[:, :self.hidden]) + a - a.mean(dim=1, keepdim=True)


@contextlib.contextmanager
def _quiet_int8() -> Iterator[None]:
    """Silence torch 2.13's notice that its eager int8 kernels are deprecated.

    Their successor (torchao's compile-based flow) would recompile at every weights update; the
    pinned torch keeps these kernels working.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
        yield


def _int8_per_channel(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-channel qint8 copy of a weight tensor."""
    scale = w.abs().amax(dim=tuple(range(1, w.dim()))).clamp_min(1e-12) / 127.0
    zero = torch.zeros(len(scale), dtype=torch.long)
    return torch.quantize_per_channel(w, scale.double(), zero, 0, torch.qint8)


def _relu_scale(x: torch.Tensor) -> float:
    """quint8 scale that spans a ReLU output's observed range [0, max]."""
    return float(x.max().clamp_min(1e-6)) / 255.0


def state_arrays(net: nn.Module) -> tuple[list[str], list[np.ndarray]]:
    """Parameter and buffer names with CPU numpy copies, for the weights message."""
    names, arrays = [], []
    for name, t in net.state_dict().items():
        names.append(name)
        arrays.append(t.detach().to("cpu", copy=True).contiguous().numpy())
    return names, arrays


def weights_mismatch(net: nn.Module, names: list[str], arrays: list[np.ndarray]) -> str | None:
    """Why a weights message does not fit ``net`` (other env or --hidden), or None if it does."""
    own = net.state_dict()
    if list(own) != list(names):
        return f"weights have parameters {names[:4]}..., the network expects {list(own)[:4]}..."
    for (name, t), a in zip(own.items(), arrays):
        if tuple(t.shape) != tuple(a.shape):
            return f"{name}: weights shape {a.shape}, network expects {tuple(t.shape)}"
    return None


def load_arrays(net: nn.Module, names: list[str], arrays: list[np.ndarray]) -> None:
    """Load a weights message into ``net``; ValueError if names or shapes differ from the net's."""
    why = weights_mismatch(net, names, arrays)
    if why is not None:
        raise ValueError(why)
    net.load_state_dict({n: torch.from_numpy(np.array(a)) for n, a in zip(names, arrays)})
