"""wire: encode / strict decode round trips, the msgpack header, and every rejection path.

Malformed messages are built by re-packing the header of a valid message (``reheader``) or by
swapping / dropping frames, so each test breaks exactly one thing. Every rejection must be a
``WireError`` (the receivers catch only that type); the hypothesis test checks that no single-byte
corruption or truncation of a valid message can raise anything else.
"""

from __future__ import annotations

import math

import lz4.block
import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apex_zmq.wire import (
    MAX_HEADER_BYTES,
    SCHEMA_VERSION,
    ExperienceChunk,
    PriorityUpdate,
    SampleBatch,
    Telemetry,
    Weights,
    WireError,
    compress_obs,
    decode_experience,
    decode_priorities,
    decode_sample,
    decode_telemetry,
    decode_weights,
    decompress_frames,
    encode,
    frame_table,
)
from replay_server.replay import PrioritizedReplay

ATARI = (4, 84, 84)
CARTPOLE = (4,)


# --------------------------------------------------------------------------- message builders


def atari_obs(m: int, seed: int = 0) -> np.ndarray:
    """m stacked uint8 frames with some structure (compressible) and some noise (not trivially)."""
    rng = np.random.default_rng(seed)
    obs = np.zeros((m, *ATARI), dtype=np.uint8)
    for j in range(m):
        obs[j, :, 10 + j:30 + j, 20:40] = 200
        obs[j, :, 60:64, :] = rng.integers(0, 256, size=(4, 4, 84), dtype=np.uint8)
        obs[j, 0, 0, 0] = j  # identity of the observation
    return obs


def cartpole_obs(m: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(m, *CARTPOLE)).astype(np.float32)


def make_chunk(obs: np.ndarray, n_step: int = 3, seed: int = 0, sender: str = "actor-3",
               seq: int = 17) -> ExperienceChunk:
    """Transition t goes from observation t to observation t + n_step, like one env of an actor."""
    m = len(obs)
    n = m - n_step
    rng = np.random.default_rng(seed)
    data, offsets = frame_table(compress_obs(obs))
    return ExperienceChunk(
        sender=sender, seq=seq, obs_shape=tuple(obs.shape[1:]), obs_dtype=str(obs.dtype),
        frame_data=data, frame_offsets=offsets,
        obs_idx=np.arange(n, dtype=np.int32), next_idx=np.arange(n_step, m, dtype=np.int32),
        action=rng.integers(0, 6, n).astype(np.int32), ret=rng.normal(size=n).astype(np.float32),
        disc=np.where(np.arange(n) == n - 1, 0.0, 0.99 ** n_step).astype(np.float32),
        priority=rng.random(n).astype(np.float32) * 3)


def make_sample(obs: np.ndarray, seed: int = 1) -> SampleBatch:
    m = len(obs)
    rng = np.random.default_rng(seed)
    n = 2 * m
    data, offsets = frame_table(compress_obs(obs))
    return SampleBatch(
        seq=5, obs_shape=tuple(obs.shape[1:]), obs_dtype=str(obs.dtype), frame_data=data,
        frame_offsets=offsets, obs_idx=rng.integers(0, m, n).astype(np.int32),
        next_idx=rng.integers(0, m, n).astype(np.int32), action=rng.integers(0, 2, n).astype(np.int32),
        ret=rng.normal(size=n).astype(np.float32), disc=rng.random(n).astype(np.float32),
        ids=rng.integers(0, 10**12, n).astype(np.int64), weight=rng.random(n).astype(np.float32))


def make_update(n: int = 7) -> PriorityUpdate:
    rng = np.random.default_rng(2)
    return PriorityUpdate(sender="learner", seq=9, ids=rng.integers(0, 10**9, n).astype(np.int64),
                          priority=(rng.random(n) * 5).astype(np.float32))


def make_weights() -> Weights:
    rng = np.random.default_rng(3)
    arrays = [rng.normal(size=(32, 4, 8, 8)).astype(np.float32), rng.normal(size=32).astype(np.float32),
              rng.normal(size=(6, 512)).astype(np.float16), np.array(12345, dtype=np.int64),
              np.zeros(0, dtype=np.float32)]
    return Weights(sender="learner", seq=4, version=777,
                   names=["conv.weight", "conv.bias", "head.weight", "bn.num_batches_tracked", "empty"],
                   arrays=arrays)


def make_telemetry() -> Telemetry:
    return Telemetry(sender="actor-0", seq=3, role="actor", time=1700000000.25,
                     metrics={"actor/steps_per_s": 1234.5, "actor/frames": 10.0},
                     episodes=[{"slot": 3, "epsilon": 0.4, "return": 21.0, "clipped_return": 5.0, "length": 800},
                               {"slot": 4, "epsilon": 0.01, "return": -3.5, "clipped_return": -2.0, "length": 12}])


DECODERS = {"experience": decode_experience, "sample": decode_sample, "priorities": decode_priorities,
            "weights": decode_weights, "telemetry": decode_telemetry}


def valid_messages() -> dict[str, object]:
    return {"experience": make_chunk(cartpole_obs(9)), "sample": make_sample(cartpole_obs(5)),
            "priorities": make_update(), "weights": make_weights(), "telemetry": make_telemetry()}


def as_bytes(frames) -> list[bytes]:
    return [bytes(f) for f in frames]


def header(frames) -> dict:
    return msgpack.unpackb(bytes(frames[0]), raw=False)


def reheader(frames, drop: tuple[str, ...] = (), **changes) -> list[bytes]:
    """The same message with header fields changed / dropped (array frames untouched)."""
    h = header(frames)
    h.update(changes)
    for k in drop:
        del h[k]
    return [msgpack.packb(h, use_bin_type=True)] + as_bytes(frames[1:])


def set_spec(frames, name: str, spec) -> list[bytes]:
    """Replace the array spec ``[name, count]`` of ``name`` in the header."""
    h = header(frames)
    h["a"] = [spec if s[0] == name else s for s in h["a"]]
    return reheader(frames, a=h["a"])


def frame_index(frames, name: str) -> int:
    return 1 + [s[0] for s in header(frames)["a"]].index(name)


def replace_frame(frames, name: str, data: bytes) -> list[bytes]:
    out = as_bytes(frames)
    out[frame_index(frames, name)] = data
    return out


def assert_arrays_equal(a, b, dtype) -> None:
    a = np.asarray(a)
    assert a.dtype == np.dtype(dtype), (a.dtype, dtype)
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", ["cartpole", "atari"])
def test_experience_round_trip(kind):
    obs = cartpole_obs(11) if kind == "cartpole" else atari_obs(7)
    c = make_chunk(obs)
    d = decode_experience(encode(c))
    assert isinstance(d, ExperienceChunk)
    assert (d.sender, d.seq, d.obs_shape, d.obs_dtype) == (c.sender, c.seq, obs.shape[1:], str(obs.dtype))
    assert bytes(d.frame_data) == c.frame_data
    for name, dtype in [("frame_offsets", "int64"), ("obs_idx", "int32"), ("next_idx", "int32"),
                        ("action", "int32"), ("ret", "float32"), ("disc", "float32"),
                        ("priority", "float32")]:
        assert_arrays_equal(getattr(d, name), getattr(c, name), dtype)
    frames = decompress_frames(d.frame_data, d.frame_offsets, d.obs_shape, d.obs_dtype)
    assert frames.dtype == obs.dtype and frames.shape == obs.shape
    np.testing.assert_array_equal(frames, obs)
    # The transition's bootstrap observation is the one n steps later.
    np.testing.assert_array_equal(frames[d.next_idx], obs[np.arange(len(d.action)) + 3])


def test_experience_round_trip_through_zmq_frames():
    """Receivers get zmq.Frame objects (recv_multipart(copy=False)), decoded without copies."""
    c = make_chunk(atari_obs(5))
    d = decode_experience([zmq.Frame(bytes(f)) for f in encode(c)])
    assert bytes(d.frame_data) == c.frame_data
    np.testing.assert_array_equal(d.priority, c.priority)


def test_experience_carries_the_sending_process_only_when_given():
    """``inc`` (the actor process) is optional: absent (a foreign actor, the PROTOCOL.md example) is 0."""
    c = make_chunk(cartpole_obs(6))
    assert "inc" not in msgpack.unpackb(bytes(encode(c)[0])) and decode_experience(encode(c)).incarnation == 0
    c.incarnation = (1 << 48) - 1
    assert decode_experience(encode(c)).incarnation == (1 << 48) - 1
    for bad in (-1, 1.5, True, 1 << 53):
        frames = encode(c)
        h = msgpack.unpackb(bytes(frames[0]))
        h["inc"] = bad
        with pytest.raises(WireError, match="incarnation"):
            decode_experience([msgpack.packb(h), *frames[1:]])


def test_encode_accepts_int64_and_float64_inputs_and_converts():
    """Arrays are cast to the schema dtype on encode (the actor builds int64 / float64 intermediates)."""
    c = make_chunk(cartpole_obs(6))
    c.action, c.ret = c.action.astype(np.int64), c.ret.astype(np.float64)
    d = decode_experience(encode(c))
    assert_arrays_equal(d.action, c.action, "int32")
    assert_arrays_equal(d.ret, c.ret.astype(np.float32), "float32")


@pytest.mark.parametrize("kind", ["cartpole", "atari"])
def test_sample_round_trip(kind):
    obs = cartpole_obs(6) if kind == "cartpole" else atari_obs(4)
    s = make_sample(obs)
    d = decode_sample(encode(s))
    assert isinstance(d, SampleBatch)
    assert (d.seq, d.sender, d.obs_shape, d.obs_dtype) == (5, "replay", obs.shape[1:], str(obs.dtype))
    assert bytes(d.frame_data) == s.frame_data
    for name, dtype in [("frame_offsets", "int64"), ("obs_idx", "int32"), ("next_idx", "int32"),
                        ("action", "int32"), ("ret", "float32"), ("disc", "float32"), ("ids", "int64"),
                        ("weight", "float32")]:
        assert_arrays_equal(getattr(d, name), getattr(s, name), dtype)
    frames = decompress_frames(d.frame_data, d.frame_offsets, d.obs_shape, d.obs_dtype)
    np.testing.assert_array_equal(frames, obs)
    np.testing.assert_array_equal(frames[d.obs_idx], obs[s.obs_idx])


def test_priorities_round_trip():
    u = make_update()
    d = decode_priorities(encode(u))
    assert isinstance(d, PriorityUpdate) and (d.sender, d.seq) == ("learner", 9)
    assert_arrays_equal(d.ids, u.ids, "int64")
    assert_arrays_equal(d.priority, u.priority, "float32")


def test_empty_priority_update_round_trips():
    d = decode_priorities(encode(PriorityUpdate("learner", 0, np.zeros(0, np.int64), np.zeros(0, np.float32))))
    assert len(d.ids) == 0 and len(d.priority) == 0


def test_weights_round_trip():
    w = make_weights()
    d = decode_weights(encode(w))
    assert isinstance(d, Weights)
    assert (d.sender, d.seq, d.version, d.names) == (w.sender, w.seq, w.version, w.names)
    assert len(d.arrays) == len(w.arrays)
    for got, want in zip(d.arrays, w.arrays):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_weights_zero_size_matrix_round_trips_over_the_wire():
    """Frames arrive from zmq as flat buffers (an in-process multi-dim empty memoryview cannot be cast)."""
    w = Weights("learner", 0, 1, ["e", "x"], [np.zeros((0, 3), np.float32), np.ones((2, 3), np.float16)])
    d = decode_weights([zmq.Frame(bytes(f)) for f in encode(w)])
    assert d.arrays[0].shape == (0, 3) and d.arrays[0].dtype == np.float32
    np.testing.assert_array_equal(d.arrays[1], w.arrays[1])


def test_weights_non_contiguous_array_round_trips():
    a = np.arange(24, dtype=np.float32).reshape(4, 6).T  # Fortran order
    d = decode_weights(encode(Weights("learner", 0, 1, ["t"], [a])))
    np.testing.assert_array_equal(d.arrays[0], a)


def test_telemetry_round_trip():
    t = make_telemetry()
    d = decode_telemetry(encode(t))
    assert d == t  # dataclass equality: every field, metrics and episodes included


def test_decompress_frames_rejects_a_blob_of_the_wrong_size():
    obs = cartpole_obs(3)
    data, off = frame_table(compress_obs(obs))
    with pytest.raises(WireError):
        decompress_frames(data, off, (5,), "float32")  # blobs hold 16 bytes, 20 expected
    with pytest.raises(WireError):
        decompress_frames(data, off, (3,), "float32")  # 12 expected: the blob does not fit
    bad = bytearray(data)
    bad[off[1]:off[2]] = b"\xff" * int(off[2] - off[1])
    with pytest.raises(WireError):
        decompress_frames(bytes(bad), off, (4,), "float32")


# --------------------------------------------------------------------------- header: msgpack, no pickle


@pytest.mark.parametrize("kind", list(DECODERS))
def test_header_is_msgpack_with_schema_version(kind):
    msg = valid_messages()[kind]
    frames = encode(msg)
    raw = bytes(frames[0])
    assert not raw.startswith(b"\x80"), "looks like a pickle"
    h = msgpack.unpackb(raw, raw=False)
    assert isinstance(h, dict)
    assert h["v"] == SCHEMA_VERSION
    assert h["t"] == kind
    assert h["s"] == msg.sender and h["q"] == msg.seq


def test_array_frames_are_raw_little_endian_bytes():
    c = make_chunk(cartpole_obs(8))
    frames = encode(c)
    h = header(frames)
    assert [s[0] for s in h["a"]] == ["frame_data", "frame_offsets", "obs_idx", "next_idx", "action",
                                      "ret", "disc", "priority"]
    assert bytes(frames[frame_index(frames, "frame_data")]) == c.frame_data
    assert bytes(frames[frame_index(frames, "action")]) == c.action.astype("<i4").tobytes()
    assert bytes(frames[frame_index(frames, "priority")]) == c.priority.astype("<f4").tobytes()
    assert bytes(frames[frame_index(frames, "frame_offsets")]) == c.frame_offsets.astype("<i8").tobytes()


def test_encode_rejects_non_messages():
    with pytest.raises(TypeError):
        encode({"t": "experience"})


# --------------------------------------------------------------------------- rejections: framing


@pytest.mark.parametrize("kind", list(DECODERS))
def test_rejects_empty_message(kind):
    with pytest.raises(WireError):
        DECODERS[kind]([])


@pytest.mark.parametrize("kind", list(DECODERS))
@pytest.mark.parametrize("seed", range(5))
def test_rejects_random_bytes(kind, seed):
    rng = np.random.default_rng(seed)
    junk = rng.integers(0, 256, int(rng.integers(1, 300)), dtype=np.uint8).tobytes()
    with pytest.raises(WireError):
        DECODERS[kind]([junk])
    with pytest.raises(WireError):
        DECODERS[kind]([junk] + as_bytes(encode(valid_messages()[kind]))[1:])


@pytest.mark.parametrize("kind", list(DECODERS))
@pytest.mark.parametrize("first", [b"", b"\xc0", b"\x01", msgpack.packb([1, 2, 3]), b"\x80\x04\x95"])
def test_rejects_headers_that_are_not_a_map(kind, first):
    with pytest.raises(WireError):
        DECODERS[kind]([first])


@pytest.mark.parametrize("kind", list(DECODERS))
@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0, "1", None, 1.0 + 1e-9])
def test_rejects_wrong_schema_version(kind, version):
    frames = reheader(encode(valid_messages()[kind]), v=version)
    with pytest.raises(WireError, match="schema version"):
        DECODERS[kind](frames)


@pytest.mark.parametrize("kind", list(DECODERS))
def test_rejects_missing_schema_version(kind):
    with pytest.raises(WireError, match="schema version"):
        DECODERS[kind](reheader(encode(valid_messages()[kind]), drop=("v",)))


@pytest.mark.parametrize("sent", list(DECODERS))
@pytest.mark.parametrize("decoder", list(DECODERS))
def test_rejects_wrong_message_type(sent, decoder):
    frames = encode(valid_messages()[sent])
    if sent == decoder:
        assert DECODERS[decoder](frames) is not None
    else:
        with pytest.raises(WireError):
            DECODERS[decoder](frames)


@pytest.mark.parametrize("kind", list(DECODERS))
@pytest.mark.parametrize("change", [dict(s=7), dict(s="x" * 257), dict(q=-1), dict(q="3"), dict(q=1.5)])
def test_rejects_bad_sender_or_seq(kind, change):
    with pytest.raises(WireError):
        DECODERS[kind](reheader(encode(valid_messages()[kind]), **change))


@pytest.mark.parametrize("kind", list(DECODERS))
def test_rejects_oversized_header(kind):
    frames = reheader(encode(valid_messages()[kind]), pad="x" * 4000)  # fine: under the limit
    DECODERS[kind](frames)
    big = {f"k{i}": "x" * 4000 for i in range(MAX_HEADER_BYTES // 4000 + 1)}
    with pytest.raises(WireError):
        DECODERS[kind](reheader(encode(valid_messages()[kind]), **big))


@pytest.mark.parametrize("kind", ["experience", "sample", "priorities", "weights"])
def test_rejects_missing_truncated_and_extra_frames(kind):
    frames = as_bytes(encode(valid_messages()[kind]))
    dec = DECODERS[kind]
    with pytest.raises(WireError):
        dec(frames[:-1])  # last frame missing
    with pytest.raises(WireError):
        dec(frames[:1])  # header only
    with pytest.raises(WireError):
        dec(frames[:1] + frames[2:])  # a middle frame missing: everything shifts
    with pytest.raises(WireError):
        dec(frames + [b"\x00" * 8])  # an extra frame
    for i in range(1, len(frames)):
        if len(frames[i]) == 0:
            continue
        with pytest.raises(WireError):
            dec(frames[:i] + [frames[i][:-1]] + frames[i + 1:])  # one frame truncated by a byte
        with pytest.raises(WireError):
            dec(frames[:i] + [frames[i] + b"\x00"] + frames[i + 1:])  # one frame a byte too long


def test_telemetry_rejects_extra_frame():
    frames = as_bytes(encode(make_telemetry()))
    with pytest.raises(WireError):
        decode_telemetry(frames + [b""])


# --------------------------------------------------------------------------- rejections: array specs


@pytest.mark.parametrize("kind", ["experience", "sample", "priorities"])
def test_rejects_array_size_disagreeing_with_spec(kind):
    frames = encode(valid_messages()[kind])
    for spec in header(frames)["a"]:
        name, count = spec
        for bad in (count + 1, count - 1) if count else (1,):
            with pytest.raises(WireError, match=name):
                DECODERS[kind](set_spec(frames, name, [name, bad]))


@pytest.mark.parametrize("kind", ["experience", "sample", "priorities"])
@pytest.mark.parametrize("count", [10**12, 2**63 - 1, 2**64 - 1, -1, -(2**63), 1.5, "4", None, True + 10**9])
def test_rejects_absurd_or_malformed_counts(kind, count):
    frames = encode(valid_messages()[kind])
    name = header(frames)["a"][-1][0]
    with pytest.raises(WireError):
        DECODERS[kind](set_spec(frames, name, [name, count]))


@pytest.mark.parametrize("kind", ["experience", "sample", "priorities"])
def test_rejects_malformed_spec_lists(kind):
    frames = encode(valid_messages()[kind])
    specs = header(frames)["a"]
    for bad in (specs[:-1], specs + [["extra", 0]], list(reversed(specs)), "frame_data",
                [s[0] for s in specs], [[s[0], s[1], 0] for s in specs], [[s[0]] for s in specs],
                [[] for _ in specs], None, {"frame_data": 1}):
        with pytest.raises(WireError):
            DECODERS[kind](reheader(frames, a=bad))
    with pytest.raises(WireError):
        DECODERS[kind](reheader(frames, drop=("a",)))


@pytest.mark.parametrize("kind", ["experience", "sample"])
@pytest.mark.parametrize("shape", [[10**12], [4096, 4096, 4096], [2**24 + 1], [0], [-4], [4, 0], [],
                                   [1, 1, 1, 1, 1], [4.0], ["4"], "4", None, [True, 2**40]])
def test_rejects_bad_or_absurd_obs_shapes(kind, shape):
    with pytest.raises(WireError):
        DECODERS[kind](reheader(encode(valid_messages()[kind]), shape=shape))


@pytest.mark.parametrize("kind", ["experience", "sample"])
@pytest.mark.parametrize("dtype", ["float64", "int64", "object", "O", "<f4", "bfloat16", "", None, 5])
def test_rejects_disallowed_obs_dtype(kind, dtype):
    with pytest.raises(WireError, match="dtype"):
        DECODERS[kind](reheader(encode(valid_messages()[kind]), dtype=dtype))


@pytest.mark.parametrize("kind", ["experience", "sample"])
def test_rejects_offset_table_problems(kind):
    msg = valid_messages()[kind]
    frames = encode(msg)
    off = np.asarray(msg.frame_offsets, dtype=np.int64)
    L = int(off[-1])
    cases = {
        "not monotone": np.array([0, off[2], off[1], *off[3:]], dtype=np.int64),
        "repeated offset (empty blob)": np.array([0, off[1], off[1], *off[3:]], dtype=np.int64),
        "past the data end": np.array([*off[:-1], L + 5], dtype=np.int64),
        "short of the data end": np.array([*off[:-1], L - 1], dtype=np.int64),
        "not starting at 0": np.array([1, *off[1:]], dtype=np.int64),
        "negative": np.array([0, -3, *off[2:]], dtype=np.int64),
        # int64 wrap-around: np.diff of these is positive everywhere although the table is garbage.
        "diff overflow": np.array([0, 2**63 - 1, -2, *off[3:]], dtype=np.int64),
        "single offset": np.array([0], dtype=np.int64),
        "no offsets": np.zeros(0, dtype=np.int64),
    }
    for what, bad in cases.items():
        f = replace_frame(frames, "frame_offsets", bad.tobytes())
        f = set_spec(f, "frame_offsets", ["frame_offsets", len(bad)])
        with pytest.raises(WireError):
            DECODERS[kind](f)
            pytest.fail(what)


@pytest.mark.parametrize("kind", ["experience", "sample"])
@pytest.mark.parametrize("field_name", ["obs_idx", "next_idx"])
def test_rejects_frame_indices_outside_the_table(kind, field_name):
    msg = valid_messages()[kind]
    m = len(msg.frame_offsets) - 1
    for bad_value in (m, m + 1000, -1, -(2**31)):
        idx = np.array(getattr(msg, field_name), dtype=np.int32)
        idx[len(idx) // 2] = bad_value
        setattr(msg, field_name, idx)
        with pytest.raises(WireError, match=field_name):
            DECODERS[kind](encode(msg))
    # the largest valid index is accepted
    idx[len(idx) // 2] = m - 1
    DECODERS[kind](encode(msg))


@pytest.mark.parametrize("kind", ["experience", "sample"])
def test_rejects_bad_transition_values(kind):
    for name, bad in [("action", -1), ("ret", np.nan), ("ret", np.inf), ("ret", -np.inf),
                      ("disc", -0.01), ("disc", 1.5), ("disc", np.nan)]:
        msg = valid_messages()[kind]
        a = np.array(getattr(msg, name))
        a[0] = bad
        setattr(msg, name, a)
        with pytest.raises(WireError):
            DECODERS[kind](encode(msg))


@pytest.mark.parametrize("kind", ["experience", "sample"])
@pytest.mark.parametrize("field_name", ["obs_idx", "next_idx", "action", "ret", "disc"])
def test_rejects_transition_arrays_of_different_lengths(kind, field_name):
    for delta in (-1, 1):
        msg = valid_messages()[kind]
        a = getattr(msg, field_name)
        a = a[:-1] if delta < 0 else np.concatenate([a, a[:1]])
        setattr(msg, field_name, a)
        with pytest.raises(WireError):
            DECODERS[kind](encode(msg))


@pytest.mark.parametrize("bad", [np.nan, -1.0, -1e-30, np.inf, -np.inf])
def test_experience_rejects_bad_initial_priorities(bad):
    c = make_chunk(cartpole_obs(9))
    c.priority = c.priority.copy()
    c.priority[2] = bad
    with pytest.raises(WireError, match="priorit"):
        decode_experience(encode(c))


def test_experience_rejects_priority_length_mismatch():
    c = make_chunk(cartpole_obs(9))
    c.priority = c.priority[:-1]
    with pytest.raises(WireError):
        decode_experience(encode(c))


def test_experience_with_no_transitions_is_valid():
    c = make_chunk(cartpole_obs(3), n_step=3)
    assert len(c.action) == 0
    d = decode_experience(encode(c))
    assert len(d.action) == 0 and len(d.frame_offsets) == 4


def test_sample_rejects_bad_ids_and_weights():
    for name, bad in [("ids", -1), ("weight", np.nan), ("weight", -0.5), ("weight", np.inf)]:
        s = make_sample(cartpole_obs(5))
        a = np.array(getattr(s, name))
        a[1] = bad
        setattr(s, name, a)
        with pytest.raises(WireError):
            decode_sample(encode(s))
    for name in ("ids", "weight"):
        s = make_sample(cartpole_obs(5))
        setattr(s, name, getattr(s, name)[:-1])
        with pytest.raises(WireError):
            decode_sample(encode(s))


@pytest.mark.parametrize("bad", [np.nan, -1.0, np.inf, -np.inf, -1e-30])
def test_priorities_reject_non_finite_or_negative(bad):
    u = make_update()
    u.priority = u.priority.copy()
    u.priority[3] = bad
    with pytest.raises(WireError, match="priorit"):
        decode_priorities(encode(u))


def test_priorities_accept_zero_and_reject_negative_ids_and_length_mismatch():
    u = make_update()
    u.priority = u.priority.copy()
    u.priority[0] = 0.0
    assert decode_priorities(encode(u)).priority[0] == 0.0
    u.ids = u.ids.copy()
    u.ids[0] = -5
    with pytest.raises(WireError, match="id"):
        decode_priorities(encode(u))
    for ids, prio in [(np.arange(3), np.ones(2)), (np.arange(2), np.ones(3))]:
        with pytest.raises(WireError, match="length"):
            decode_priorities(encode(PriorityUpdate("learner", 1, ids.astype(np.int64),
                                                    prio.astype(np.float32))))


# --------------------------------------------------------------------------- rejections: weights


def _weights_frames_with_spec(spec, frame: bytes) -> list[bytes]:
    h = header(encode(make_weights()))
    h["a"] = [spec]
    return [msgpack.packb(h, use_bin_type=True), frame]


@pytest.mark.parametrize("dtype", ["float64", "object", "O", "bfloat16", "uint8", "<f4", "V8", None, 3])
def test_weights_reject_disallowed_dtype(dtype):
    frames = _weights_frames_with_spec(["w", dtype, [2]], b"\x00" * 8)
    with pytest.raises(WireError, match="dtype"):
        decode_weights(frames)


@pytest.mark.parametrize("shape", [[10**12], [2**31], [-1], [2**30, 2**30], [1] * 9, [2.0], "2", None,
                                   [2**31 - 1] * 8])
def test_weights_reject_bad_or_absurd_shape(shape):
    with pytest.raises(WireError):
        decode_weights(_weights_frames_with_spec(["w", "float32", shape], b"\x00" * 8))


def test_weights_reject_size_mismatch_and_frame_count():
    frames = as_bytes(encode(make_weights()))
    with pytest.raises(WireError, match="size"):
        decode_weights(frames[:1] + [frames[1][:-4]] + frames[2:])
    with pytest.raises(WireError):
        decode_weights(frames[:-1])
    with pytest.raises(WireError):
        decode_weights(frames + [b""])
    with pytest.raises(WireError):
        decode_weights(reheader(frames, drop=("a",)))


@pytest.mark.parametrize("spec", [["w", "float32"], ["w", "float32", [2], 1], [3, "float32", [2]], "w",
                                  None, {"w": 1}])
def test_weights_reject_malformed_spec(spec):
    with pytest.raises(WireError):
        decode_weights(_weights_frames_with_spec(spec, b"\x00" * 8))


@pytest.mark.parametrize("version", [-1, 1.5, "7", None])
def test_weights_reject_bad_version(version):
    with pytest.raises(WireError, match="version"):
        decode_weights(reheader(encode(make_weights()), version=version))


# --------------------------------------------------------------------------- rejections: telemetry


@pytest.mark.parametrize("change", [
    dict(role="hacker"), dict(role=None), dict(time=5), dict(time="now"), dict(m=[1]),
    dict(m={"a": "b"}), dict(m={"a": [1.0]}), dict(e={"a": 1}), dict(e=[{"a": "x"}]), dict(e=[1]),
    dict(e=[{}] * 4097),
])
def test_telemetry_rejects_bad_fields(change):
    with pytest.raises(WireError):
        decode_telemetry(reheader(encode(make_telemetry()), **change))


# --------------------------------------------------------------------------- fuzzing


_VALID = {k: as_bytes(encode(v)) for k, v in valid_messages().items()}
_VALID["experience_atari"] = as_bytes(encode(make_chunk(atari_obs(4), n_step=1)))
_TYPES = {"experience": ExperienceChunk, "experience_atari": ExperienceChunk, "sample": SampleBatch,
          "priorities": PriorityUpdate, "weights": Weights, "telemetry": Telemetry}


def _decoder(kind: str):
    return DECODERS["experience" if kind.startswith("experience") else kind]


def _check_decodes_or_wire_error(kind: str, frames: list[bytes]) -> None:
    try:
        msg = _decoder(kind)(frames)
    except WireError:
        return
    assert isinstance(msg, _TYPES[kind])
    if isinstance(msg, ExperienceChunk):
        # What the decoder accepts, the replay server must be able to store and serve: the batch it
        # builds from the chunk must itself pass the learner's decoder.
        replay = PrioritizedReplay(64)
        replay.add(msg)
        decode_sample(encode(replay.sample(8, 0.4)))


@st.composite
def mutation(draw):
    kind = draw(st.sampled_from(sorted(_VALID)))
    frames = _VALID[kind]
    i = draw(st.integers(0, len(frames) - 1))
    if len(frames[i]) == 0:
        return kind, frames, i, None, None
    op = draw(st.sampled_from(["flip", "truncate"]))
    if op == "flip":
        pos = draw(st.integers(0, len(frames[i]) - 1))
        new = draw(st.integers(0, 255).filter(lambda b: b != frames[i][pos]))
        return kind, frames, i, pos, new
    return kind, frames, i, draw(st.integers(0, len(frames[i]) - 1)), None


@settings(max_examples=600, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(mutation())
def test_fuzz_one_byte_or_one_truncation_never_raises_anything_but_wire_error(m):
    kind, frames, i, pos, new = m
    frames = list(frames)
    if pos is None:
        frames = frames[:i] + frames[i + 1:]  # an empty frame: drop it instead
    elif new is None:
        frames[i] = frames[i][:pos]
    else:
        b = bytearray(frames[i])
        b[pos] = new
        frames[i] = bytes(b)
    _check_decodes_or_wire_error(kind, frames)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.sampled_from(sorted(_VALID)), st.data())
def test_fuzz_header_bytes_only(kind, data):
    """Corrupt several header bytes at once (the header is where the structure lives)."""
    frames = list(_VALID[kind])
    b = bytearray(frames[0])
    for _ in range(data.draw(st.integers(1, 4))):
        b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
    frames[0] = bytes(b)
    _check_decodes_or_wire_error(kind, frames)


def test_fuzz_baseline_messages_decode():
    """The fuzzers start from messages that really are valid (otherwise they prove nothing)."""
    for kind, frames in _VALID.items():
        assert isinstance(_decoder(kind)(frames), _TYPES[kind])


def test_lz4_blob_compression_is_per_observation():
    obs = atari_obs(3)
    blobs = compress_obs(obs)
    assert len(blobs) == 3
    assert lz4.block.decompress(blobs[1], uncompressed_size=math.prod(ATARI)) == obs[1].tobytes()
    data, off = frame_table(blobs)
    assert off.dtype == np.int64 and off.tolist() == [0, len(blobs[0]), len(blobs[0]) + len(blobs[1]),
                                                      sum(map(len, blobs))]
    assert data == b"".join(blobs)


# --------------------------------------------------------------------------- holes found by tests/test_fuzz.py


@pytest.mark.parametrize("kind", ["experience", "priorities", "telemetry", "weights"])
@pytest.mark.parametrize("field_name,value", [("v", True), ("v", 1.0), ("q", True), ("q", False)])
def test_rejects_bools_and_floats_posing_as_integers(kind, field_name, value):
    # msgpack true decodes to Python True, and True == 1 == 1.0: the version check let them through.
    frames = encode(valid_messages()[kind])
    with pytest.raises(WireError):
        DECODERS[kind](reheader(frames, **{field_name: value}))


def test_rejects_bool_counts_and_dims():
    frames = encode(make_update(n=1))  # one element: a count of True used to equal it
    with pytest.raises(WireError, match="count"):
        decode_priorities(set_spec(frames, "ids", ["ids", True]))
    with pytest.raises(WireError, match="shape"):
        decode_experience(reheader(encode(make_chunk(cartpole_obs(5))), shape=[True, 4]))
    w = Weights(sender="learner", seq=1, version=1, names=["b"], arrays=[np.zeros(1, np.float32)])
    with pytest.raises(WireError, match="shape"):
        decode_weights(reheader(encode(w), a=[["b", "float32", [True]]]))
    with pytest.raises(WireError, match="version"):
        decode_weights(reheader(encode(w), version=True))


@pytest.mark.parametrize("change", [
    # the evaluator read e["return"] of every episode: a missing key raised KeyError and ended it
    dict(e=[{}]), dict(e=[{"slot": 1, "epsilon": 0.1, "clipped_return": 1.0, "length": 3}]),
    # extra keys would become columns of actor_episodes.csv when first
    dict(e=[{"slot": 1, "epsilon": 0.1, "return": 2.0, "clipped_return": 1.0, "length": 3, "extra": 1}]),
    # non-finite numbers: int(inf) in the evaluator raised OverflowError
    dict(m={"learner/steps": math.inf}), dict(m={"learner/steps": -math.inf}), dict(m={"actor/x": math.nan}),
    dict(m={"actor/x": True}), dict(e=[{"slot": 1, "epsilon": math.nan, "return": 2.0, "clipped_return": 1.0, "length": 3}]),
    dict(time=math.inf), dict(time=math.nan), dict(role=["actor"]),
])
def test_telemetry_rejects_what_crashed_or_polluted_the_evaluator(change):
    with pytest.raises(WireError):
        decode_telemetry(reheader(encode(make_telemetry()), **change))


def test_telemetry_without_episodes_and_with_int_metrics_is_valid():
    t = make_telemetry()
    t.episodes, t.metrics = [], {"learner/steps": 12, "replay/size": 3.5}
    assert decode_telemetry(encode(t)).metrics == {"learner/steps": 12, "replay/size": 3.5}


def test_telemetry_with_the_most_episodes_allowed_fits_the_header_limit():
    # An actor on CartPole reported ~1,300 short episodes in one period (88 KB): over the old 64 KiB
    # limit, the evaluator dropped the whole report.
    t = make_telemetry()
    t.episodes = [{"slot": 1000 + i, "epsilon": 0.4 ** (1 + 7 * i / 4095), "return": 123.456 + i, "clipped_return": 12.0 + i, "length": 100000 + i}
                  for i in range(4096)]
    frames = encode(t)
    assert len(frames[0]) > 1 << 16
    assert len(decode_telemetry(frames).episodes) == 4096


# --------------------------------------------------------------------------- schema 2: incarnations, removals


from apex_zmq.wire import MAX_INCARNATION, decompress_frames_tolerant, new_incarnation  # noqa: E402

INCARNATIONS = [0, 1, 0x1234_5678_9ABC, (1 << 53) - 1]


def test_schema_version_is_2_and_max_incarnation_is_2_to_the_53():
    assert SCHEMA_VERSION == 2
    assert MAX_INCARNATION == 9007199254740992


@pytest.mark.parametrize("inc", INCARNATIONS)
def test_weights_incarnation_round_trips(inc):
    w = make_weights()
    w.incarnation = inc
    frames = encode(w)
    assert header(frames)["inc"] == inc
    d = decode_weights([zmq.Frame(bytes(f)) for f in frames])
    assert d.incarnation == inc and type(d.incarnation) is int
    assert d.version == 777  # the incarnation is its own field, not mixed into the version


@pytest.mark.parametrize("inc", INCARNATIONS)
def test_sample_incarnation_round_trips(inc):
    s = make_sample(cartpole_obs(5))
    s.incarnation = inc
    frames = encode(s)
    assert header(frames)["inc"] == inc
    d = decode_sample(frames)
    assert d.incarnation == inc
    np.testing.assert_array_equal(d.ids, s.ids)


@pytest.mark.parametrize("inc", INCARNATIONS)
def test_priorities_incarnation_and_remove_round_trip(inc):
    u = make_update()
    u.incarnation = inc
    u.remove = np.array([0, 5, 10**12, (1 << 62) + 3], dtype=np.int64)
    frames = encode(u)
    h = header(frames)
    assert h["inc"] == inc
    assert [s[0] for s in h["a"]] == ["ids", "priority", "remove"]
    assert bytes(frames[frame_index(frames, "remove")]) == u.remove.astype("<i8").tobytes()
    d = decode_priorities([zmq.Frame(bytes(f)) for f in frames])
    assert d.incarnation == inc
    assert_arrays_equal(d.remove, [0, 5, 10**12, (1 << 62) + 3], "int64")
    assert_arrays_equal(d.ids, u.ids, "int64")
    assert_arrays_equal(d.priority, u.priority, "float32")


def test_priorities_remove_defaults_to_empty_and_may_come_alone():
    u = make_update()
    assert len(u.remove) == 0 and u.remove.dtype == np.int64 and u.incarnation == 0
    d = decode_priorities(encode(u))
    assert_arrays_equal(d.remove, np.zeros(0), "int64")
    # A batch whose every item was bad: no priorities, only removals (int32 input is widened).
    only = PriorityUpdate("learner", 3, np.zeros(0, np.int64), np.zeros(0, np.float32), incarnation=42,
                          remove=np.array([7, 9], dtype=np.int32))
    d = decode_priorities(encode(only))
    assert len(d.ids) == 0 and d.incarnation == 42
    assert_arrays_equal(d.remove, [7, 9], "int64")


def test_default_instances_do_not_share_the_remove_array():
    a, b = make_update(), make_update()
    assert a.remove is not b.remove


BAD_INCARNATIONS = [-1, -(1 << 53), True, False, 1.0, 0.0, 5.5, 1 << 53, (1 << 53) + 1, 1 << 63, "7", None,
                    [1], {"inc": 1}]


@pytest.mark.parametrize("kind", ["sample", "priorities", "weights"])
@pytest.mark.parametrize("inc", BAD_INCARNATIONS, ids=repr)
def test_rejects_a_bad_incarnation(kind, inc):
    msg = valid_messages()[kind]
    msg.incarnation = 12345
    frames = encode(msg)
    DECODERS[kind](frames)  # valid as built
    with pytest.raises(WireError, match="incarnation"):
        DECODERS[kind](reheader(frames, inc=inc))


@pytest.mark.parametrize("kind", ["sample", "priorities", "weights"])
def test_rejects_a_missing_incarnation(kind):
    # A schema-1 sender never sends "inc"; the version check catches it first, so a
    # version-2 header without the key must be refused on its own.
    with pytest.raises(WireError, match="incarnation"):
        DECODERS[kind](reheader(encode(valid_messages()[kind]), drop=("inc",)))


@pytest.mark.parametrize("kind", ["sample", "priorities", "weights"])
def test_schema_1_messages_are_refused(kind):
    frames = reheader(encode(valid_messages()[kind]), drop=("inc",), v=1)
    with pytest.raises(WireError, match="schema version"):
        DECODERS[kind](frames)


@pytest.mark.parametrize("remove", [[-1], [3, -1], [-(1 << 63)], [0, 1, 2, -5]])
def test_rejects_negative_ids_to_remove(remove):
    u = make_update()
    u.remove = np.array(remove, dtype=np.int64)
    with pytest.raises(WireError, match="remove"):
        decode_priorities(encode(u))


def test_rejects_a_remove_frame_that_disagrees_with_its_count():
    u = make_update()
    u.remove = np.arange(4, dtype=np.int64)
    frames = encode(u)
    with pytest.raises(WireError):
        decode_priorities(set_spec(frames, "remove", ["remove", 3]))
    with pytest.raises(WireError):
        decode_priorities(replace_frame(frames, "remove", np.arange(4, dtype=np.int64).tobytes()[:-4]))
    with pytest.raises(WireError):  # a schema-1 update: no remove frame at all
        decode_priorities(reheader(frames[:-1], a=header(frames)["a"][:2]))


def test_new_incarnation_is_random_48_bit_and_valid_on_the_wire():
    seen = {new_incarnation() for _ in range(200)}
    assert len(seen) == 200  # 48 random bits: a collision in 200 draws has odds ~1e-10
    assert all(type(i) is int and 0 <= i < 1 << 48 for i in seen)
    assert max(seen) >= 1 << 40  # really 48 bits wide, not a small counter
    for inc in list(seen)[:5]:
        u = make_update()
        u.incarnation = inc
        assert decode_priorities(encode(u)).incarnation == inc


def test_telemetry_episode_needs_clipped_return():
    t = make_telemetry()
    t.episodes = [{"slot": 1, "epsilon": 0.1, "return": 2.0, "length": 3}]  # a schema-1 episode
    with pytest.raises(WireError):
        decode_telemetry(encode(t))
    t.episodes = [{"slot": 1, "epsilon": 0.1, "return": 2.0, "clipped_return": 1.0, "length": 3}]
    assert decode_telemetry(encode(t)).episodes == t.episodes


# --------------------------------------------------------------------------- decompress_frames_tolerant


def _lz4(raw: bytes) -> bytes:
    return lz4.block.compress(raw, store_size=False)


@pytest.mark.parametrize("kind", ["cartpole", "atari"])
@pytest.mark.parametrize("bad_at", [0, 2, 4])
def test_tolerant_decompress_flags_exactly_the_corrupt_blob(kind, bad_at):
    obs = cartpole_obs(5) if kind == "cartpole" else atari_obs(5)
    blobs = compress_obs(obs)
    blobs[bad_at] = b"\xff" * 24 + blobs[bad_at]  # an lz4 token run that overflows the output
    data, off = frame_table(blobs)
    with pytest.raises(WireError):  # the strict decoder refuses the whole table
        decompress_frames(data, off, obs.shape[1:], str(obs.dtype))
    frames, bad = decompress_frames_tolerant(data, off, obs.shape[1:], str(obs.dtype))
    assert bad.dtype == np.bool_ and bad.tolist() == [j == bad_at for j in range(5)]
    assert frames.shape == obs.shape and frames.dtype == obs.dtype
    good = [j for j in range(5) if j != bad_at]
    np.testing.assert_array_equal(frames[good], obs[good])
    assert not frames[bad_at].any()  # zeroed, not stale bytes


@pytest.mark.parametrize("raw_len", [12, 15, 20, 32, 0])
def test_tolerant_decompress_flags_a_blob_of_the_wrong_size(raw_len):
    """CartPole observations are 16 bytes: a blob holding fewer or more bytes is bad, alone."""
    obs = cartpole_obs(3)
    blobs = compress_obs(obs)
    blobs.insert(1, _lz4(bytes(range(raw_len))))
    data, off = frame_table(blobs)
    frames, bad = decompress_frames_tolerant(data, off, (4,), "float32")
    assert bad.tolist() == [False, True, False, False]
    np.testing.assert_array_equal(frames[[0, 2, 3]], obs)
    assert not frames[1].any()


def test_tolerant_decompress_of_a_good_table_equals_the_strict_one():
    for obs in (cartpole_obs(7), atari_obs(3)):
        data, off = frame_table(compress_obs(obs))
        frames, bad = decompress_frames_tolerant(memoryview(data), off, obs.shape[1:], str(obs.dtype))
        assert not bad.any() and bad.shape == (len(obs),)
        np.testing.assert_array_equal(frames, decompress_frames(data, off, obs.shape[1:], str(obs.dtype)))
        np.testing.assert_array_equal(frames, obs)


def test_tolerant_decompress_every_blob_bad():
    obs = cartpole_obs(3)
    data, off = frame_table([b"\xff" * 24 + b for b in compress_obs(obs)])
    frames, bad = decompress_frames_tolerant(data, off, (4,), "float32")
    assert bad.all() and frames.shape == (3, 4) and not frames.any()


def test_arrays_travel_little_endian_whatever_the_sender_holds() -> None:
    # A big-endian sender (or a byte-swapped array) must put the same bytes on the wire as a little-endian
    # one: PROTOCOL.md promises little-endian, and the names stay "float32" (a ">f4" would be refused).
    from apex_zmq.wire import Weights, compress_obs, decode_weights, encode
    le = np.arange(6, dtype="<f4").reshape(2, 3)
    be = le.astype(">f4")
    frames = [bytes(f) for f in encode(Weights(sender="learner", seq=0, version=1, names=["w"], arrays=[be]))]
    again = [bytes(f) for f in encode(Weights(sender="learner", seq=0, version=1, names=["w"], arrays=[le]))]
    assert frames == again
    w = decode_weights(frames)
    np.testing.assert_array_equal(w.arrays[0], le)
    assert compress_obs(be) == compress_obs(le)


# --------------------------------------------------------------------------- decompression without a call per blob


def _lz4_one_by_one(data: bytes, off: np.ndarray, size: int) -> list[bytes | None]:
    """The plainest reference: lz4 on each blob; None where it fails or gives the wrong size."""
    out: list[bytes | None] = []
    for j in range(len(off) - 1):
        try:
            raw = lz4.block.decompress(data[off[j]:off[j + 1]], uncompressed_size=size)
        except lz4.block.LZ4BlockError:
            raw = None
        out.append(raw if raw is not None and len(raw) == size else None)
    return out


OBS_KINDS = {
    "cartpole": lambda rng: rng.normal(size=(40, 4)).astype(np.float32),        # 16 bytes: never shrinks
    "short": lambda rng: rng.normal(size=(40, 3)).astype(np.float32),           # 12 bytes: 1-byte header
    "long": lambda rng: rng.normal(size=(40, 70)).astype(np.float32),           # 280 bytes: extension bytes
    "mixed": lambda rng: np.where(rng.random((40, 1)) < 0.5, 0.0,               # zero rows do shrink
                                  rng.normal(size=(40, 8))).astype(np.float32),
    "noise-u8": lambda rng: rng.integers(0, 256, size=(40, 600), dtype=np.uint8),  # 600 random bytes: literal too
    "big-noise": lambda rng: rng.integers(0, 256, size=(6, 3000), dtype=np.uint8),  # over the numpy path's limit
    "atari-like": lambda rng: np.repeat(rng.integers(0, 256, size=(6, 84, 1), dtype=np.uint8), 84, axis=2),
}


@pytest.mark.parametrize("kind", list(OBS_KINDS))
def test_frames_decompress_as_lz4_does_blob_by_blob(kind):
    obs = OBS_KINDS[kind](np.random.default_rng(3))
    data, off = frame_table(compress_obs(obs))
    size = obs[0].nbytes
    if kind in ("cartpole", "short", "long", "noise-u8"):
        assert np.all(np.diff(off) == len(data) // len(obs)), "all literal blobs: the reshape path"
    frames, bad = decompress_frames_tolerant(data, off, obs.shape[1:], str(obs.dtype))
    assert not bad.any()
    ref = _lz4_one_by_one(data, off, size)
    assert [f.tobytes() for f in frames] == ref
    np.testing.assert_array_equal(frames, obs)
    np.testing.assert_array_equal(decompress_frames(data, off, obs.shape[1:], str(obs.dtype)), obs)


def test_a_bad_blob_among_literal_ones_is_flagged_and_the_rest_decode():
    obs = cartpole_obs(12)
    blobs = compress_obs(obs)
    blobs[4] = b"\xf0\x05" + bytes(16)            # a literal header that promises 20 bytes, not 16
    blobs[7] = blobs[7][:-1]                      # one byte short
    blobs[9] = b"\x1f" + bytes(17)                # not literal-only, and not valid lz4 for 16 bytes
    data, off = frame_table(blobs)
    frames, bad = decompress_frames_tolerant(data, off, (4,), "float32")
    ref = _lz4_one_by_one(data, off, 16)
    assert bad.tolist() == [r is None for r in ref]
    assert bad[[4, 7]].all()
    keep = ~bad
    np.testing.assert_array_equal(frames[keep], obs[keep])
    assert not frames[bad].any()  # zeroed
    with pytest.raises(WireError, match="blob 4"):
        decompress_frames(data, off, (4,), "float32")
