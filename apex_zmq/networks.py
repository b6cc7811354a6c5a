"""dqn's dueling Q network (on ``torsos``' MLP or CNN), the actors' acting copies of it (float32, bfloat16,
int8) and weights as arrays. ``models.build_network`` maps ``--algo`` to its network."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .cpu import CpuCaps
from .envs import EnvSpec
# The torsos live in the leaf module every network builder imports; their names stay importable from here.
from .torsos import (  # noqa: F401
    NATURE_CONVS,
    NATURE_MIN_SIDE,
    SMALL_CONVS,
    TINY_CONVS,
    NatureTorso,
    build_torso,
    conv_layers_for,
)


class Dueling(nn.Module):
    """Q(s, a) = V(s) + A(s, a) - mean_a A(s, a) on top of a feature torso; with ``dueling=False`` one
    head, Q(s, a) = A(s, a) (Mnih et al. 2015's, and Young & Tian's for MinAtar: half the head's cost)."""

    def __init__(self, torso: nn.Module, features: int, hidden: int, num_actions: int,
                 dueling: bool = True) -> None:
        super().__init__()
        self.torso = torso
        self.value = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 1)) if dueling else None
        self.advantage = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(),
                                       nn.Linear(hidden, num_actions))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        h = self.torso(obs)  # bf16 under autocast: the convolutions are where mixed precision pays
        # The heads, and so Q, the TD error, the loss and the priorities, stay float32 under
        # autocast: bf16 rounds Q ~ 10 to ~0.05, as large as the TD errors the learner must resolve.
        with torch.autocast(h.device.type, enabled=False):
            h = h.float()
            a = self.advantage(h)
            if self.value is None:
                return a
            return self.value(h) + a - a.mean(dim=1, keepdim=True)


def build_dqn_network(spec: EnvSpec, hidden: int, dueling: bool = True) -> Dueling:
    """dqn's network: the dueling (or, ``dueling=False``, single-head) Q network on ``torsos.build_torso``
    (a CNN for [C, H, W] uint8 images, Atari's frame stacks and other image envs at their own size; else
    one hidden layer)."""
    torso, features = build_torso(spec, hidden)
    return Dueling(torso, features, hidden, spec.num_actions, dueling)


def int8_engine() -> str | None:
    """torch's int8 kernel engine for x86 CPUs (fbgemm / oneDNN, VNNI where present), or None."""
    engines = torch.backends.quantized.supported_engines
    return next((e for e in ("x86", "onednn", "fbgemm") if e in engines), None)


ACTING_DTYPES = ("auto", "float32", "bfloat16", "int8")


@dataclass(frozen=True)
class ActingChoice:
    """The acting copy's number format, and why it was chosen (for the actor's log)."""

    dtype: str       # "float32", "bfloat16" or "int8"
    levels: int = 0  # int8 only: activation levels, 255 (8 bits) or 127 (7 bits: no VNNI, see below)
    why: str = ""

    @property
    def bits(self) -> int:
        """Bits per activation: 32, 16, 8 or 7 (``actor/acting_bits`` on telemetry)."""
        return {"float32": 32, "bfloat16": 16}.get(self.dtype, 8 if self.levels == 255 else 7)

    @property
    def label(self) -> str:
        return "int8 (7-bit activations)" if self.bits == 7 else self.dtype


def choose_acting(name: str, conv: bool, caps: CpuCaps, engine: str | None) -> ActingChoice:
    """The acting copy for ``--acting-dtype name`` on a CPU with ``caps`` and int8 ``engine``.

    ``auto``: int8 for the Nature CNN on x86 CPUs (about 2x faster than float32), else bfloat16
    where the CPU has it natively, else float32. Without VNNI, fbgemm's u8 x s8 kernels add pairs of
    products in 16 bits (``vpmaddubsw``), which saturates for 8-bit activations (255 x 127 x 2 >
    32767) and put Q values off by 5-13% of their scale; 7-bit activations (127 x 127 x 2 < 32767)
    cannot saturate, so int8 uses them there.
    """
    if name not in ACTING_DTYPES:
        raise ValueError(f"acting dtype must be one of {ACTING_DTYPES}, got {name!r}")
    if name == "int8" and not conv:
        raise ValueError("int8 acting needs the Nature CNN (an Atari env); use float32 or bfloat16")
    if name == "int8" and engine is None:
        raise ValueError("int8 acting needs torch's x86 int8 kernels (fbgemm/oneDNN), absent on this CPU")
    if name == "float32":
        return ActingChoice("float32", why="asked for")
    if name == "bfloat16":
        return ActingChoice("bfloat16", why="asked for" + ("" if caps.bf16 else
                                                            " (emulated on this CPU: slow)"))
    if name == "int8" or (conv and caps.x86 and engine is not None):
        origin = "asked for" if name == "int8" else "auto: Nature CNN on x86"
        if caps.vnni:
            return ActingChoice("int8", 255, f"{origin}; VNNI accumulates in 32 bits")
        return ActingChoice("int8", 127, f"{origin}; no VNNI: 7-bit activations cannot saturate")
    if caps.bf16:
        return ActingChoice("bfloat16", why="auto: native bfloat16")
    return ActingChoice("float32", why="auto: " + ("an MLP" if not conv else "no int8 kernels")
                        + ", no native bfloat16")


def make_acting_network(net: Dueling, choice: ActingChoice) -> nn.Module:
    """The inference-only acting copy of ``net`` in the format ``choice`` says."""
    if choice.dtype == "int8":
        return Int8ActingNetwork(net, levels=choice.levels)
    return ActingNetwork(net, torch.bfloat16 if choice.dtype == "bfloat16" else torch.float32)


def q_values(net: nn.Module, obs: torch.Tensor) -> torch.Tensor:
    """Q(s, .) [B, A] of any algorithm's network: dqn's outputs Q; the distributional ones give their
    expected values (C51: sum of atoms times probabilities; IQN: mean over sampled quantiles)."""
    q = getattr(net, "q", None)
    return q(obs) if callable(q) else net(obs)


def greedy_agreement(q: torch.Tensor | np.ndarray, q_ref: torch.Tensor | np.ndarray) -> float:
    """Fraction of rows whose greedy action under ``q`` is the one under the float32 ``q_ref``."""
    a, b = np.asarray(q).argmax(axis=1), np.asarray(q_ref).argmax(axis=1)
    return float((a == b).mean()) if len(a) else 1.0


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
        self.dueling = net.value is not None
        a0 = net.advantage[0]
        # The value head's units first, then the advantage's (none without a value head).
        self.hidden = net.value[0].out_features if self.dueling else 0
        self.head = nn.Linear(a0.in_features, self.hidden + a0.out_features)
        self.value_out = copy.deepcopy(net.value[2]) if self.dueling else None
        self.advantage_out = copy.deepcopy(net.advantage[2])
        self.to(dtype)
        self.sync(net)
        self.eval()

    @torch.no_grad()
    def sync(self, net: Dueling) -> None:
        """Copy (and rearrange) the weights of ``net``."""
        self.torso.load_state_dict(net.torso.state_dict())
        if self.folded:
            self.torso.net[0].weight.mul_(self.torso.scale)
        firsts = ([net.value[0]] if self.dueling else []) + [net.advantage[0]]
        self.head.weight.copy_(torch.cat([layer.weight for layer in firsts]))
        self.head.bias.copy_(torch.cat([layer.bias for layer in firsts]))
        if self.dueling:
            self.value_out.load_state_dict(net.value[2].state_dict())
        self.advantage_out.load_state_dict(net.advantage[2].state_dict())

    def q_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """Q [B, A] from the fused first head layer's activations (value units, then advantage units)."""
        a = self.advantage_out(h[:, self.hidden:])
        if not self.dueling:
            return a
        return self.value_out(h[:, :self.hidden]) + a - a.mean(dim=1, keepdim=True)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        h = self.torso.net(obs.to(self.dtype)) if self.folded else self.torso(obs.to(self.dtype))
        return self.q_from_hidden(torch.relu(self.head(h))).float()


class Int8ActingNetwork(nn.Module):
    """An int8 acting copy of a Nature-CNN ``Dueling`` network for CPUs (fbgemm/oneDNN kernels).

    Weights are quantized per output channel (symmetric int8), each ReLU's output per tensor
    (uint8, zero point 0, ``levels`` steps from 0 to its max) with a scale calibrated on the
    observations the copy acts on: ``sync`` marks the copy stale and its next call re-quantizes,
    running the float copy over up to ``calibration`` observations spread over that call's own batch
    first (~40 ms, once per weights update), so the scales follow the network as it trains. Frames
    enter as a zero-copy quint8 view (scale 1; the 1/255 is folded into the first conv), or halved
    (scale 2) with 7-bit activations (``levels=127``, for CPUs without VNNI: see ``choose_acting``).
    The small output layers of the head(s) run in float32. Returns float32 Q values.
    ``agreement``: how often the greedy action matched float32's on the last calibration batch.
    """

    calibration = 16  # observations per re-quantization pass

    def __init__(self, net: Dueling, levels: int = 255) -> None:
        super().__init__()
        from torch.ao.nn.intrinsic import quantized as nniq  # only this path needs torch.ao

        engine = int8_engine()
        if engine is None or not isinstance(net.torso, NatureTorso) or net.torso.scale != 1.0 / 255:
            raise ValueError("int8 acting needs the Nature CNN over 0..255 frames and torch's x86 int8 kernels")
        if levels not in (127, 255):
            raise ValueError(f"int8 activation levels must be 127 or 255, got {levels}")
        torch.backends.quantized.engine = engine
        self.levels = levels
        self.ref = ActingNetwork(net, torch.float32)  # float weights: calibration and the output layers
        # A tuple, not a ModuleList: these are the float copy's own layers, registered under ref.
        self._float_convs = tuple(m for m in self.ref.torso.net if isinstance(m, nn.Conv2d))
        with _quiet_int8():
            self.convs = nn.ModuleList(nniq.ConvReLU2d(c.in_channels, c.out_channels, c.kernel_size,
                                                       c.stride) for c in self._float_convs)
            self.head = nniq.LinearReLU(self.ref.head.in_features, self.ref.head.out_features)
        self.stale = True
        self.agreement = 1.0

    def sync(self, net: Dueling) -> None:
        """Copy the weights of ``net``; quantized at the next call, calibrated on its batch."""
        self.ref.sync(net)
        self.stale = True

    @torch.no_grad()
    def _quantize(self, obs: torch.Tensor) -> None:
        with _quiet_int8():
            step = -(-len(obs) // self.calibration)  # spread over the batch's envs
            sample = obs[::step]
            x = sample.float()
            for conv, q in zip(self._float_convs, self.convs):
                x = torch.relu(conv(x))
                q.set_weight_bias(_int8_per_channel(conv.weight), conv.bias)
                q.scale, q.zero_point = _relu_scale(x, self.levels), 0
            h = torch.relu(self.ref.head(x.flatten(1)))
            self.head.set_weight_bias(_int8_per_channel(self.ref.head.weight), self.ref.head.bias)
            self.head.scale, self.head.zero_point = _relu_scale(h, self.levels), 0
            self.stale = False
            self.agreement = greedy_agreement(self._int8_q(sample), self.ref.q_from_hidden(h))

    def _int8_q(self, obs: torch.Tensor) -> torch.Tensor:
        if self.levels == 255:
            # Pixel values 0..255 are exactly quint8 with scale 1, zero point 0: a view, no conversion.
            x = torch._make_per_tensor_quantized_tensor(obs.contiguous(), 1.0, 0)
        else:  # 7 bits: pixels halved (one pass over uint8), scale 2
            x = torch._make_per_tensor_quantized_tensor(torch.bitwise_right_shift(obs, 1).contiguous(), 2.0, 0)
        for conv in self.convs:
            x = conv(x)
        return self.ref.q_from_hidden(self.head(x.flatten(1)).dequantize())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if obs.dtype != torch.uint8:
            raise TypeError(f"int8 acting expects uint8 frames, got {obs.dtype}")
        if self.stale:
            self._quantize(obs)
        return self._int8_q(obs)


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


def _relu_scale(x: torch.Tensor, levels: int) -> float:
    """quint8 scale that spans a ReLU output's observed range [0, max] in ``levels`` steps."""
    return float(x.max().clamp_min(1e-6)) / levels


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
        # A C51 support is a setting, not a learnt weight: another --v-min/--v-max is a misconfiguration
        # that would make actors act on one value range and compute priorities on another.
        if name.split(".")[-1] == "support" and not np.allclose(t.detach().cpu().numpy(), a):
            return (f"{name}: the weights' C51 support spans [{float(a[0]):g}, {float(a[-1]):g}], this "
                    f"network's [{float(t[0]):g}, {float(t[-1]):g}] (--v-min / --v-max differ)")
    return None


def load_arrays(net: nn.Module, names: list[str], arrays: list[np.ndarray]) -> None:
    """Load a weights message into ``net``; ValueError if names or shapes differ from the net's."""
    why = weights_mismatch(net, names, arrays)
    if why is not None:
        raise ValueError(why)
    net.load_state_dict({n: torch.from_numpy(np.array(a)) for n, a in zip(names, arrays)})
