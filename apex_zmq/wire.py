"""Every message on every socket: encoder and strict decoder, with a schema version.

A message is a multipart ZeroMQ message: frame 0 is a msgpack header (a map with the schema
version ``v``, the type ``t``, the sender ``s``, a sequence number ``q`` and type-specific fields),
the other frames are raw little-endian arrays whose dtype and shape the header declares and the
decoder checks against the type's schema before any array is touched. Never pickle.

Observations travel as an lz4 "frame table": ``frame_data`` (the compressed blobs end to end) and
``frame_offsets`` ([m + 1] int64), referred to by index from ``obs_idx`` / ``next_idx``. The actor
compresses, the replay server stores and forwards the blobs untouched, the learner decompresses.

Stacked observations (Atari's [S, 84, 84]: the last S frames) may travel as single frames ("stack"
layout, header field ``stack`` = S): each blob is one frame [84, 84], ``obs_idx`` / ``next_idx`` are
[n, S] (oldest frame first), so a frame shared by S consecutive stacks is sent, stored and
decompressed once. Without the field a blob is a whole observation and the indices are [n].
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import lz4.block
import msgpack
import numpy as np

# 2: learner and replay incarnations ("inc") on weights, samples and priority updates; removals
# ("remove") in priority updates; "clipped_return" in training episodes.
SCHEMA_VERSION = 2
MAX_SHARDS = 1024  # replay shards a sample batch may name
MAX_INCARNATION = 1 << 53  # incarnations are random 48-bit ids; exact in float64 and JavaScript
# Fits a telemetry report with the most episodes the decoder takes (4096, ~64 bytes each): an actor
# stepping short episodes fast (CartPole at the start) filled 64 KiB in one report, which was dropped.
MAX_HEADER_BYTES = 1 << 20
MAX_ARRAYS = 4096
MAX_EPISODES = 4096  # finished episodes in one telemetry report
MAX_OBS_ELEMENTS = 1 << 24
_OBS_DTYPES = ("uint8", "float32")
_WEIGHT_DTYPES = ("float32", "float16", "int64")  # numpy has no bfloat16: np.dtype() would raise
# Gradients: float32, or bfloat16 carried as its raw 16 bits (numpy has no bfloat16; the receiver views
# them as torch.bfloat16). Names and shapes must be the learner's trainable parameters, in order.
GRADIENT_DTYPES = ("float32", "bfloat16")
MAX_GRADIENT_ELEMENTS = 1 << 28  # every array of one gradient message together (1 GiB of float32)


class WireError(ValueError):
    """A message that does not match its schema. The receiver drops it and counts it."""


Frames = Sequence[Any]  # bytes, memoryview or zmq.Frame


def _buf(frame: Any) -> memoryview:
    """The bytes of a received frame without copying."""
    b = getattr(frame, "buffer", frame)
    return memoryview(b).cast("B")


# --------------------------------------------------------------------------- frame tables


def compress_obs(obs: np.ndarray) -> list[bytes]:
    """lz4-compress each observation of a batch [m, *shape] separately."""
    obs = np.asarray(obs, dtype=np.asarray(obs).dtype.newbyteorder("<"))  # the wire is little-endian
    return [lz4.block.compress(o.tobytes(), store_size=False) for o in obs]


def frame_table(blobs: Sequence[bytes | memoryview]) -> tuple[bytes, np.ndarray]:
    """Concatenate compressed blobs; return (data, offsets [m + 1] int64)."""
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    return b"".join(blobs), offsets


def _literal_header(size: int) -> bytes:
    """The lz4 block header of a block that is one run of ``size`` literal bytes: what lz4 writes for
    an input it cannot shrink (a CartPole observation's 16 bytes always; an Atari frame never)."""
    if size < 15:
        return bytes([size << 4])
    rest = size - 15
    return b"\xf0" + b"\xff" * (rest // 255) + bytes([rest % 255])


# Observations up to this many bytes are taken out of all-literal blobs with numpy, without a call into
# lz4 per blob: a 128-item CartPole batch is ~256 blobs of 16 bytes, where the per-blob Python loop cost
# the learner's loader ~0.5 ms per batch, holding the GIL the training step needs between its kernels.
_LITERAL_MAX_BYTES = 1024


def _literal_frames(data: memoryview, offsets: np.ndarray, size: int, out: np.ndarray) -> np.ndarray:
    """Copy the observations of all-literal blobs into ``out`` [m, size] uint8; returns which they were.

    A blob that is exactly the literal header and ``size`` bytes decodes, under lz4's block format, to
    those bytes: the same result as ``lz4.block.decompress`` on it, without the call."""
    m = len(offsets) - 1
    if size > _LITERAL_MAX_BYTES:
        return np.zeros(m, dtype=bool)
    hdr = _literal_header(size)
    starts = np.asarray(offsets[:-1], dtype=np.int64)
    lit = np.diff(offsets) == len(hdr) + size
    if not lit.any():
        return lit
    buf = np.frombuffer(data, dtype=np.uint8)
    for k, h in enumerate(hdr):
        lit[lit] = buf[starts[lit] + k] == h
    if lit.all() and len(buf) == m * (len(hdr) + size):  # the usual case: one reshape, no gather
        out[:] = buf.reshape(m, len(hdr) + size)[:, len(hdr):]
    elif lit.any():
        out[lit] = buf[starts[lit][:, None] + len(hdr) + np.arange(size)]
    return lit


def frame_shape(obs_shape: Sequence[int], stack: int) -> tuple[int, ...]:
    """The shape of one blob: the observation, or with the stack layout one frame of it."""
    return tuple(obs_shape[1:]) if stack > 1 else tuple(obs_shape)


def stack_of(idx: np.ndarray) -> int:
    """The layout of a message's index arrays: S for [n, S] (stack layout), 1 for [n]."""
    return int(idx.shape[1]) if np.ndim(idx) == 2 else 1


def decompress_frames(data: memoryview | bytes, offsets: np.ndarray, shape: Sequence[int],
                      dtype: str) -> np.ndarray:
    """Decompress every blob of a frame table into one array [m, *shape]; WireError on a bad blob."""
    frames, bad = decompress_frames_tolerant(data, offsets, shape, dtype)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise WireError(f"observation blob {j} does not decompress to one {dtype}{list(shape)} observation")
    return frames


def decompress_frames_tolerant(data: memoryview | bytes, offsets: np.ndarray, shape: Sequence[int],
                               dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Like ``decompress_frames``, but a blob that does not decompress to one observation is zeroed
    and flagged instead of failing the table: returns (frames [m, *shape], bad [m] bool).

    The replay server never decompresses, so one corrupt blob from a buggy or rogue actor reaches
    the learner inside otherwise good batches; the learner trains on the rest and removes its items.
    """
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    view = memoryview(data).cast("B")
    m = len(offsets) - 1
    out = np.zeros((m, size), dtype=np.uint8)
    done = _literal_frames(view, offsets, size, out)
    bad = np.zeros(m, dtype=bool)
    for j in np.flatnonzero(~done).tolist():
        try:
            raw = lz4.block.decompress(view[offsets[j]:offsets[j + 1]], uncompressed_size=size)
        except lz4.block.LZ4BlockError:
            bad[j] = True
            continue
        if len(raw) != size:
            bad[j] = True
            continue
        out[j] = np.frombuffer(raw, dtype=np.uint8)
    return out.view(np.dtype(dtype).newbyteorder("<")).reshape(m, *shape), bad


# --------------------------------------------------------------------------- messages


@dataclass
class ExperienceChunk:
    """n-step transitions from one actor, with their initial priorities (actors -> replay)."""

    sender: str
    seq: int
    obs_shape: tuple[int, ...]
    obs_dtype: str
    frame_data: bytes | memoryview
    frame_offsets: np.ndarray  # [m + 1] int64
    obs_idx: np.ndarray        # [n] int32, index into the frame table ([n, S] with the stack layout)
    next_idx: np.ndarray       # [n] int32, observation to bootstrap from ([n, S] likewise)
    action: np.ndarray         # [n] int32
    ret: np.ndarray            # [n] float32, discounted n-step return
    disc: np.ndarray           # [n] float32, bootstrap discount (0 after termination)
    priority: np.ndarray       # [n] float32, initial |TD|
    # The sending process (a random 48-bit id; 0: not given): tells a restarted actor's chunks, whose seq
    # starts over, from its old process's still in flight (the replay server counts stored chunks per process).
    incarnation: int = 0


@dataclass
class SampleBatch:
    """A prioritized batch (replay -> learner). Frames deduplicated: obs and next obs share the table."""

    seq: int
    obs_shape: tuple[int, ...]
    obs_dtype: str
    frame_data: bytes | memoryview
    frame_offsets: np.ndarray
    obs_idx: np.ndarray        # [n] int32 ([n, S] with the stack layout)
    next_idx: np.ndarray
    action: np.ndarray
    ret: np.ndarray
    disc: np.ndarray
    ids: np.ndarray            # [n] int64 replay item ids
    weight: np.ndarray         # [n] float32 importance weights
    sender: str = "replay"
    incarnation: int = 0       # the replay server process the ids belong to
    # Sharded replay (--replay-shards > 1; optional on the wire, absent with one shard): which shard
    # sampled it, and that shard's total priority mass (sum of p^alpha) when it did, which the learner
    # draws shards by. None: not given (a lone replay server).
    shard: int = 0
    mass: float | None = None


@dataclass
class PriorityUpdate:
    """New priorities for replay items, keyed by id (learner -> replay)."""

    sender: str
    seq: int
    ids: np.ndarray       # [n] int64
    priority: np.ndarray  # [n] float32
    incarnation: int = 0  # the replay incarnation of the sample the ids came from (stale if not current)
    remove: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [r] int64: never sample again


@dataclass
class Weights:
    """Versioned network parameters (learner -> actors, evaluator)."""

    sender: str
    seq: int
    version: int                   # learner steps when the snapshot was taken
    names: list[str]
    arrays: list[np.ndarray]
    incarnation: int = 0           # the learner process: a restarted learner's weights are new ones


@dataclass
class Gradients:
    """The gradient of one actor-learner's loss on its last t_max x K steps (actor-learner -> learner).

    ``arrays`` are float32, or with ``dtype`` "bfloat16" uint16 arrays holding bfloat16 bit patterns.
    """

    sender: str
    seq: int
    version: int               # the weights version (learner updates) the gradient was computed at
    names: list[str]
    arrays: list[np.ndarray]
    dtype: str = "float32"     # one of GRADIENT_DTYPES, for every array
    incarnation: int = 0       # the learner process those weights came from
    steps: int = 0             # agent steps (transitions) the gradient was computed on
    loss: float = 0.0          # the loss at those weights (telemetry)
    entropy: float = 0.0       # a3c: mean policy entropy over the steps (0 for the Q algorithms)


@dataclass
class Telemetry:
    """Heartbeat, counters and finished episodes of one role (every role -> evaluator)."""

    sender: str
    seq: int
    role: str
    time: float
    metrics: dict[str, float] = field(default_factory=dict)
    episodes: list[dict[str, float]] = field(default_factory=list)


_TRANSITION_ARRAYS = {  # name -> dtype; every array has one entry per transition
    "obs_idx": "int32", "next_idx": "int32", "action": "int32", "ret": "float32", "disc": "float32",
}
_SCHEMAS: dict[str, dict[str, str]] = {
    "experience": {"frame_data": "uint8", "frame_offsets": "int64", **_TRANSITION_ARRAYS,
                   "priority": "float32"},
    "sample": {"frame_data": "uint8", "frame_offsets": "int64", **_TRANSITION_ARRAYS,
               "ids": "int64", "weight": "float32"},
    "priorities": {"ids": "int64", "priority": "float32", "remove": "int64"},
}
ROLES = ("actor", "replay", "learner", "evaluator", "launcher", "relay")
# One finished training episode in telemetry: a whole game, its unclipped score ("return") and the
# clipped one the learner trains on.
EPISODE_KEYS = ("slot", "epsilon", "return", "clipped_return", "length")


def new_incarnation() -> int:
    """A random id for one process lifetime of the learner or the replay server (48 bits)."""
    return int.from_bytes(os.urandom(6), "little")


def _header(t: str, sender: str, seq: int, **extra: Any) -> dict[str, Any]:
    return {"v": SCHEMA_VERSION, "t": t, "s": sender, "q": int(seq), **extra}


def _encode_arrays(t: str, header: dict[str, Any], arrays: dict[str, Any]) -> list[Any]:
    specs = []
    frames: list[Any] = [None]
    for name, dtype in _SCHEMAS[t].items():
        a = arrays[name]
        if isinstance(a, (bytes, bytearray, memoryview)):
            frames.append(a)
            specs.append([name, len(a)])
        else:
            # no copy on x86/ARM; flat: an [n, S] index array goes as its n x S entries
            a = np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<")).reshape(-1)
            frames.append(a.data)
            specs.append([name, int(a.size)])
    header["a"] = specs
    frames[0] = msgpack.packb(header, use_bin_type=True)
    return frames


def _layout(obs_idx: np.ndarray, obs_shape: Sequence[int]) -> dict[str, int]:
    """The header field of the stack layout (absent: whole observations, so old messages stay as they were)."""
    stack = stack_of(obs_idx)
    if stack == 1:
        return {}
    if stack != obs_shape[0]:
        raise ValueError(f"stacks of {stack} frames for observations {list(obs_shape)}")
    return {"stack": stack}


def encode(msg: ExperienceChunk | SampleBatch | PriorityUpdate | Weights | Gradients | Telemetry) -> list[Any]:
    """Encode a message into multipart frames (large arrays are referenced, not copied)."""
    if isinstance(msg, ExperienceChunk):
        h = _header("experience", msg.sender, msg.seq, shape=list(msg.obs_shape), dtype=msg.obs_dtype,
                    **({"inc": int(msg.incarnation)} if msg.incarnation else {}),  # optional: absent is 0
                    **_layout(msg.obs_idx, msg.obs_shape))
        return _encode_arrays("experience", h, vars(msg))
    if isinstance(msg, SampleBatch):
        # "shard" and "mass" are optional (absent: shard 0, mass unknown): a one-shard replay's
        # batches are byte for byte what they were before shards, so schema 2 readers take both.
        h = _header("sample", msg.sender, msg.seq, shape=list(msg.obs_shape), dtype=msg.obs_dtype,
                    inc=int(msg.incarnation), **({"shard": int(msg.shard)} if msg.shard else {}),
                    **({"mass": float(msg.mass)} if msg.mass is not None else {}),
                    **_layout(msg.obs_idx, msg.obs_shape))
        return _encode_arrays("sample", h, vars(msg))
    if isinstance(msg, PriorityUpdate):
        return _encode_arrays("priorities", _header("priorities", msg.sender, msg.seq, inc=int(msg.incarnation)),
                              vars(msg))
    if isinstance(msg, Weights):
        # Little-endian on the wire, named by kind and size ("float32", not "<f4"); 0-d stays 0-d (which
        # ascontiguousarray would make 1-d).
        arrays = [np.asarray(a, dtype=np.asarray(a).dtype.newbyteorder("<"), order="C") for a in msg.arrays]
        h = _header("weights", msg.sender, msg.seq, version=int(msg.version), inc=int(msg.incarnation),
                    a=[[n, a.dtype.name, list(a.shape)] for n, a in zip(msg.names, arrays)])
        return [msgpack.packb(h, use_bin_type=True)] + [a.data for a in arrays]
    if isinstance(msg, Gradients):
        if msg.dtype not in GRADIENT_DTYPES:
            raise ValueError(f"gradient dtype {msg.dtype!r}, expected one of {GRADIENT_DTYPES}")
        store = np.dtype("<f4") if msg.dtype == "float32" else np.dtype("<u2")
        arrays = [np.asarray(a, order="C").astype(store, copy=False) for a in msg.arrays]
        h = _header("gradients", msg.sender, msg.seq, version=int(msg.version), inc=int(msg.incarnation),
                    dtype=msg.dtype, steps=int(msg.steps), loss=float(msg.loss), entropy=float(msg.entropy),
                    a=[[n, list(a.shape)] for n, a in zip(msg.names, arrays)])
        return [msgpack.packb(h, use_bin_type=True)] + [a.data for a in arrays]
    if isinstance(msg, Telemetry):
        h = _header("telemetry", msg.sender, msg.seq, role=msg.role, time=float(msg.time),
                    m={k: float(v) for k, v in msg.metrics.items()}, e=list(msg.episodes))
        return [msgpack.packb(h, use_bin_type=True)]
    raise TypeError(f"not a message: {type(msg).__name__}")


# --------------------------------------------------------------------------- decoding


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise WireError(what)


def _is_number(x: Any) -> bool:
    """A finite int or float (not a bool)."""
    return (_is_int(x) or isinstance(x, float)) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    """An integer and not a bool (msgpack true is a Python bool, and bool is an int subclass)."""
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_header(frames: Frames, expected_type: str) -> dict[str, Any]:
    _need(len(frames) >= 1, "empty message")
    raw = _buf(frames[0])
    _need(len(raw) <= MAX_HEADER_BYTES, f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        h = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_array_len=MAX_ARRAYS,
                            max_map_len=4096, max_str_len=4096, max_bin_len=0, max_ext_len=0)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise WireError(f"header is not msgpack: {type(e).__name__}") from None
    _need(isinstance(h, dict), f"header must be a map, got {type(h).__name__}")
    # 1.0 == 1 and True == 1 in Python: the version must be the integer itself.
    _need(_is_int(h.get("v")) and h["v"] == SCHEMA_VERSION,
          f"schema version {h.get('v')!r}, expected {SCHEMA_VERSION}")
    _need(h.get("t") == expected_type, f"message type {h.get('t')!r}, expected {expected_type!r}")
    _need(isinstance(h.get("s"), str) and len(h["s"]) <= 256, "sender must be a short string")
    _need(_is_int(h.get("q")) and h["q"] >= 0, f"sequence number must be an int >= 0, got {h.get('q')!r}")
    return h


def _incarnation(h: dict[str, Any]) -> int:
    inc = h.get("inc")
    _need(_is_int(inc) and 0 <= inc < MAX_INCARNATION, f"incarnation must be an int in [0, 2^53), got {inc!r}")
    return inc


def _obs_spec(h: dict[str, Any]) -> tuple[tuple[int, ...], str]:
    shape, dtype = h.get("shape"), h.get("dtype")
    _need(isinstance(shape, list) and 1 <= len(shape) <= 4
          and all(_is_int(d) and 1 <= d <= 4096 for d in shape), f"bad obs shape {shape!r}")
    _need(math.prod(shape) <= MAX_OBS_ELEMENTS, "obs shape too large")
    _need(dtype in _OBS_DTYPES, f"obs dtype {dtype!r}, expected one of {_OBS_DTYPES}")
    return tuple(shape), dtype


def _decode_arrays(t: str, h: dict[str, Any], frames: Frames) -> dict[str, Any]:
    schema = _SCHEMAS[t]
    specs = h.get("a")
    _need(isinstance(specs, list) and [s[0] if isinstance(s, list) and s else None for s in specs]
          == list(schema), f"{t} arrays must be {list(schema)}")
    _need(len(frames) == 1 + len(schema), f"{t} needs {1 + len(schema)} frames, got {len(frames)}")
    out: dict[str, Any] = {}
    for (name, count), frame in zip(((s[0], s[1] if len(s) == 2 else None) for s in specs), frames[1:]):
        _need(_is_int(count) and count >= 0, f"{name}: bad element count {count!r}")
        buf = _buf(frame)
        dt = np.dtype(schema[name])
        _need(len(buf) == count * dt.itemsize,
              f"{name}: declared {count} x {dt.itemsize} bytes, frame has {len(buf)}")
        out[name] = buf if name == "frame_data" else np.frombuffer(buf, dtype=dt.newbyteorder("<"))
    return out


def _stack(h: dict[str, Any], shape: tuple[int, ...]) -> int:
    """S of the stack layout (1 without it): observations [S, *frame] sent as S single frames."""
    if "stack" not in h:
        return 1
    s = h["stack"]
    _need(_is_int(s) and 2 <= s <= 64, f"stack must be an int in [2, 64], got {s!r}")
    _need(len(shape) >= 2 and shape[0] == s, f"stack {s} does not match obs shape {list(shape)}")
    return s


def _check_transitions(a: dict[str, Any], h: dict[str, Any], stack: int = 1) -> int:
    n = len(a["action"])
    for name in _TRANSITION_ARRAYS:
        per = stack if name in ("obs_idx", "next_idx") else 1
        _need(len(a[name]) == n * per, f"{name} has {len(a[name])} entries, expected {n * per}")
    if stack > 1:
        a["obs_idx"], a["next_idx"] = a["obs_idx"].reshape(n, stack), a["next_idx"].reshape(n, stack)
    off = a["frame_offsets"]
    m = len(off) - 1
    _need(m >= 1, "frame table is empty")
    # Every offset inside [0, data length] first: np.diff of wild int64 offsets wraps around.
    _need(off[0] == 0 and off[-1] == len(a["frame_data"]) and bool(np.all((off >= 0) & (off <= off[-1])))
          and bool(np.all(np.diff(off) > 0)), "frame offsets must rise from 0 to the data length")
    for name in ("obs_idx", "next_idx"):
        _need(n == 0 or (a[name].min() >= 0 and a[name].max() < m), f"{name} outside the frame table")
    _need(n == 0 or a["action"].min() >= 0, "negative action")
    _need(bool(np.all(np.isfinite(a["ret"]))), "non-finite return")
    _need(bool(np.all((a["disc"] >= 0) & (a["disc"] <= 1))), "discount outside [0, 1]")
    return n


def _check_priorities(p: np.ndarray) -> None:
    _need(bool(np.all(np.isfinite(p))) and bool(np.all(p >= 0)), "priorities must be finite and >= 0")


def decode_experience(frames: Frames) -> ExperienceChunk:
    """Decode and validate an experience chunk; WireError if anything disagrees."""
    h = _parse_header(frames, "experience")
    shape, dtype = _obs_spec(h)
    a = _decode_arrays("experience", h, frames)
    n = _check_transitions(a, h, _stack(h, shape))
    _need(len(a["priority"]) == n, f"priority has {len(a['priority'])} entries, expected {n}")
    _check_priorities(a["priority"])
    inc = _incarnation(h) if "inc" in h else 0
    return ExperienceChunk(sender=h["s"], seq=h["q"], obs_shape=shape, obs_dtype=dtype, incarnation=inc, **a)


def decode_sample(frames: Frames) -> SampleBatch:
    """Decode and validate a sample batch; WireError if anything disagrees."""
    h = _parse_header(frames, "sample")
    shape, dtype = _obs_spec(h)
    a = _decode_arrays("sample", h, frames)
    n = _check_transitions(a, h, _stack(h, shape))
    _need(len(a["ids"]) == n and len(a["weight"]) == n, "ids/weight length differs from the batch")
    _need(n == 0 or a["ids"].min() >= 0, "negative item id")
    _need(bool(np.all(np.isfinite(a["weight"]))) and bool(np.all(a["weight"] >= 0)), "bad weights")
    shard = h.get("shard", 0)
    _need(_is_int(shard) and 0 <= shard < MAX_SHARDS, f"shard must be an int in [0, {MAX_SHARDS}), got {shard!r}")
    mass = h.get("mass")
    _need(mass is None or (isinstance(mass, float) and math.isfinite(mass) and mass >= 0),
          f"mass must be a finite float >= 0, got {mass!r}")
    return SampleBatch(seq=h["q"], obs_shape=shape, obs_dtype=dtype, sender=h["s"], incarnation=_incarnation(h),
                       shard=shard, mass=mass, **a)


def decode_priorities(frames: Frames) -> PriorityUpdate:
    """Decode and validate a priority update; WireError if anything disagrees."""
    h = _parse_header(frames, "priorities")
    a = _decode_arrays("priorities", h, frames)
    _need(len(a["ids"]) == len(a["priority"]), "ids and priorities differ in length")
    _need(len(a["ids"]) == 0 or a["ids"].min() >= 0, "negative item id")
    _need(len(a["remove"]) == 0 or a["remove"].min() >= 0, "negative item id to remove")
    _check_priorities(a["priority"])
    return PriorityUpdate(sender=h["s"], seq=h["q"], incarnation=_incarnation(h), **a)


def decode_weights(frames: Frames) -> Weights:
    """Decode and validate a weights message; WireError if anything disagrees."""
    h = _parse_header(frames, "weights")
    specs = h.get("a")
    _need(_is_int(h.get("version")) and h["version"] >= 0,
          f"weights version must be an int >= 0, got {h.get('version')!r}")
    inc = _incarnation(h)
    _need(isinstance(specs, list) and len(specs) == len(frames) - 1, "one array spec per frame expected")
    names, arrays = [], []
    for spec, frame in zip(specs, frames[1:]):
        _need(isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str), f"bad spec {spec!r}")
        name, dtype, shape = spec
        _need(dtype in _WEIGHT_DTYPES, f"{name}: dtype {dtype!r} not allowed")
        _need(isinstance(shape, list) and len(shape) <= 8
              and all(_is_int(d) and 0 <= d < 1 << 31 for d in shape), f"{name}: bad shape {shape!r}")
        buf = _buf(frame)
        _need(len(buf) == math.prod(shape) * np.dtype(dtype).itemsize, f"{name}: size disagrees with shape")
        names.append(name)
        arrays.append(np.frombuffer(buf, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape))
    return Weights(sender=h["s"], seq=h["q"], version=h["version"], names=names, arrays=arrays, incarnation=inc)


def decode_gradients(frames: Frames) -> Gradients:
    """Decode and validate a gradients message (every value finite); WireError if anything disagrees."""
    h = _parse_header(frames, "gradients")
    _need(_is_int(h.get("version")) and h["version"] >= 0,
          f"gradient version must be an int >= 0, got {h.get('version')!r}")
    inc = _incarnation(h)
    dtype = h.get("dtype")
    _need(dtype in GRADIENT_DTYPES, f"gradient dtype {dtype!r}, expected one of {GRADIENT_DTYPES}")
    _need(_is_int(h.get("steps")) and h["steps"] >= 0, f"steps must be an int >= 0, got {h.get('steps')!r}")
    for key in ("loss", "entropy"):
        _need(isinstance(h.get(key), float) and math.isfinite(h[key]), f"{key} must be a finite float, "
              f"got {h.get(key)!r}")
    specs = h.get("a")
    _need(isinstance(specs, list) and len(specs) >= 1 and len(specs) == len(frames) - 1,
          "one array spec per frame expected")
    store = np.dtype("<f4") if dtype == "float32" else np.dtype("<u2")
    names, arrays, total = [], [], 0
    for spec, frame in zip(specs, frames[1:]):
        _need(isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str) and len(spec[0]) <= 256,
              f"bad spec {spec!r:.100}")
        name, shape = spec
        _need(isinstance(shape, list) and len(shape) <= 8
              and all(_is_int(d) and 0 <= d < 1 << 31 for d in shape), f"{name}: bad shape {shape!r:.100}")
        total += math.prod(shape)
        _need(total <= MAX_GRADIENT_ELEMENTS, f"gradients exceed {MAX_GRADIENT_ELEMENTS} elements")
        buf = _buf(frame)
        _need(len(buf) == math.prod(shape) * store.itemsize, f"{name}: size disagrees with shape")
        a = np.frombuffer(buf, dtype=store).reshape(shape)
        # A NaN or inf gradient would poison the shared parameters and RMSProp statistics for good.
        finite = np.isfinite(a) if dtype == "float32" else (a & 0x7F80) != 0x7F80  # bf16: exponent all ones
        _need(bool(np.all(finite)), f"{name}: non-finite gradient")
        names.append(name)
        arrays.append(a)
    return Gradients(sender=h["s"], seq=h["q"], version=h["version"], names=names, arrays=arrays, dtype=dtype,
                     incarnation=inc, steps=h["steps"], loss=h["loss"], entropy=h["entropy"])


def decode_telemetry(frames: Frames) -> Telemetry:
    """Decode and validate a telemetry message; WireError if anything disagrees."""
    _need(len(frames) == 1, f"telemetry is one frame, got {len(frames)}")
    h = _parse_header(frames, "telemetry")
    _need(isinstance(h.get("role"), str) and h["role"] in ROLES, f"role {h.get('role')!r}, expected one of {ROLES}")
    _need(isinstance(h.get("time"), float) and math.isfinite(h["time"]), f"time must be a finite float, "
          f"got {h.get('time')!r}")
    m, e = h.get("m"), h.get("e")
    # Finite numbers only: the evaluator turns counters into ints and plots them (inf would crash it).
    _need(isinstance(m, dict) and all(isinstance(k, str) and _is_number(v) for k, v in m.items()),
          "metrics must map names to finite numbers")
    _need(isinstance(e, list) and len(e) <= MAX_EPISODES, f"episodes must be a list of at most {MAX_EPISODES}")
    for ep in e:
        # Exactly these keys: the evaluator reads each and the first episode fixes the CSV columns.
        _need(isinstance(ep, dict) and set(ep) == set(EPISODE_KEYS) and all(map(_is_number, ep.values())),
              f"an episode must map exactly {EPISODE_KEYS} to finite numbers, got {ep!r:.200}")
    return Telemetry(sender=h["s"], seq=h["q"], role=h["role"], time=h["time"], metrics=m, episodes=e)
