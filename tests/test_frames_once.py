"""Frames stored once (the wire's stack layout): stacked observations sent as single compressed
frames plus [n, S] frame references, kept so by the replay, stacked by index in the learner.

The property: for random episodes with resets (whatever the reset stack holds: its first frame
repeated, or the distinct frames of no-op steps), actor chunk -> wire -> replay -> sample -> wire
-> learner batch gives exactly the observations of the old path (whole compressed stacks).
"""

from __future__ import annotations

from unittest import mock

import lz4.block
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actor.frames import FrameStacker, stack_table
from actor.nstep import SegmentBuffer
from apex_zmq.wire import (
    ExperienceChunk,
    WireError,
    compress_obs,
    decode_experience,
    decode_sample,
    encode,
    frame_table,
)
from learner.dqn import batch_from_sample
from replay_server.replay import PrioritizedReplay

S, H, W, A = 4, 6, 5, 3


def episodes(seed: int, K: int, T: int, p_end: float, noop_reset: bool):
    """T steps of K envs with next-step autoreset: (obs [K, S, H, W], rewards, terminated, truncated,
    valid) per step, the observation first. Frames come from a small alphabet so that identical
    frames (not shared by shifting) also occur."""
    rng = np.random.default_rng(seed)
    alphabet = rng.integers(0, 256, (5, H, W), dtype=np.uint8)

    def reset() -> np.ndarray:
        if noop_reset and rng.random() < 0.5:
            return alphabet[rng.integers(0, len(alphabet), S)].copy()
        return np.repeat(alphabet[rng.integers(0, len(alphabet))][None], S, axis=0)

    obs = np.stack([reset() for _ in range(K)])
    ended = np.zeros(K, dtype=bool)
    for _ in range(T):
        yield obs.copy()
        term = rng.random(K) < p_end
        trunc = ~term & (rng.random(K) < p_end / 2)
        valid = ~ended
        yield rng.normal(size=K).astype(np.float32), term & valid, trunc & valid, valid
        nxt = np.empty_like(obs)
        for k in range(K):
            if ended[k]:  # the autoreset step: the next episode's first observation
                nxt[k] = reset()
            else:
                nxt[k] = np.concatenate([obs[k, 1:], alphabet[rng.integers(0, len(alphabet))][None]])
        obs = nxt
        ended = (term | trunc) & valid


def run_actor(seed: int, K: int, T: int, steps: int, n: int, p_end: float, noop_reset: bool,
              frames_once: bool, hc: int = 0) -> list[ExperienceChunk]:
    """Chunks the actor's way (SegmentBuffer, frame table), through the wire."""
    seg = SegmentBuffer(K, steps, n, 0.9, A)
    stacker = FrameStacker(hc)
    qrng = np.random.default_rng(seed + 1)
    chunks = []
    it = episodes(seed, K, T, p_end, noop_reset)
    for obs in it:
        seg.add_obs(stacker.add(obs) if frames_once else compress_obs(obs), qrng.normal(size=(K, A)))
        if seg.full:
            f = seg.emit()
            data, off = frame_table(f.pop("blobs"))
            c = ExperienceChunk(sender="a", seq=len(chunks) + 1, obs_shape=(S, H, W), obs_dtype="uint8",
                                frame_data=data, frame_offsets=off, **f)
            chunks.append(decode_experience(encode(c)))
        rewards, term, trunc, valid = next(it)
        seg.add_step(qrng.integers(0, A, K), rewards, term, trunc, valid)
    return chunks


def batches(chunks: list[ExperienceChunk], capacity: int, batch: int):
    replay = PrioritizedReplay(capacity, seed=7)
    for c in chunks:
        replay.add(c)
    for i in range(3):
        s = decode_sample(encode(replay.sample(batch, 0.4, seq=i)))
        yield s, batch_from_sample(s, A, torch.device("cpu"))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), K=st.integers(1, 4), steps=st.integers(1, 6), n=st.integers(1, 4),
       p_end=st.sampled_from([0.0, 0.1, 0.4]), noop_reset=st.booleans(), capacity=st.integers(5, 200),
       hc=st.sampled_from([0, 0, 4]))
def test_round_trip_matches_whole_stacks(seed, K, steps, n, p_end, noop_reset, capacity, hc) -> None:
    T = 30
    new = run_actor(seed, K, T, steps, n, p_end, noop_reset, frames_once=True, hc=hc)
    old = run_actor(seed, K, T, steps, n, p_end, noop_reset, frames_once=False)
    assert len(new) == len(old)
    if not new:
        return
    for a, b in zip(new, old):
        assert a.obs_idx.shape == (len(b.action), S) and b.obs_idx.ndim == 1
        for k in ("action", "ret", "disc", "priority"):
            np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    for (sn, bn), (so, bo) in zip(batches(new, capacity, 16), batches(old, capacity, 16)):
        np.testing.assert_array_equal(sn.ids, so.ids)
        assert sn.obs_idx.ndim == 2 and len(sn.frame_offsets) - 1 <= 2 * S * len(sn.ids)
        assert bn.obs.shape == bo.obs.shape == (len(so.ids), S, H, W)
        assert torch.equal(bn.obs, bo.obs) and torch.equal(bn.next_obs, bo.next_obs)
        for k in ("action", "ret", "disc", "weight"):
            assert torch.equal(getattr(bn, k), getattr(bo, k))


def test_replay_never_decompresses() -> None:
    chunks = run_actor(3, 4, 40, 8, 3, 0.1, True, frames_once=True)
    replay = PrioritizedReplay(100)
    with mock.patch.object(lz4.block, "decompress", side_effect=AssertionError("replay decompressed")) as dec:
        for c in chunks:
            replay.add(c)
        for _ in range(5):
            replay.sample(32, 0.4)
        assert dec.call_count == 0


def test_frames_are_compressed_once() -> None:
    """A step after the first compresses one frame per env: the stack's others are the old blobs."""
    st = FrameStacker()
    rng = np.random.default_rng(0)
    obs = rng.integers(0, 256, (2, S, H, W), dtype=np.uint8)
    first = st.add(obs)
    nxt = np.concatenate([obs[:, 1:], rng.integers(0, 256, (2, 1, H, W), dtype=np.uint8)], axis=1)
    with mock.patch.object(lz4.block, "compress", wraps=lz4.block.compress) as comp:
        second = st.add(nxt)
    assert comp.call_count == 2
    assert all(second[k][j] is first[k][j + 1] for k in range(2) for j in range(S - 1))
    blobs, idx = stack_table(first + second)
    assert len(blobs) == 2 * (S + 1) and idx.shape == (4, S)
    # A reset stack of one frame repeated: one blob.
    rep = np.repeat(obs[:, :1], S, axis=1)
    assert all(len(set(map(id, s))) == 1 for s in st.add(rep))


def test_stack_layout_decoder_is_strict() -> None:
    chunks = run_actor(1, 2, 12, 4, 2, 0.2, False, frames_once=True)
    frames = encode(chunks[0])
    import msgpack
    h = msgpack.unpackb(frames[0])
    for bad in (1, 3, "4", True, 65):
        with pytest.raises(WireError):
            decode_experience([msgpack.packb({**h, "stack": bad}), *frames[1:]])
    no_stack = {k: v for k, v in h.items() if k != "stack"}  # [n, S] entries read as [n]: wrong counts
    with pytest.raises(WireError):
        decode_experience([msgpack.packb(no_stack), *frames[1:]])


def test_replay_keeps_one_layout() -> None:
    new = run_actor(1, 2, 12, 4, 2, 0.2, False, frames_once=True)
    old = run_actor(1, 2, 12, 4, 2, 0.2, False, frames_once=False)
    replay = PrioritizedReplay(100)
    replay.add(new[0])
    with pytest.raises(ValueError, match="stacks"):
        replay.add(old[0])


def test_snapshot_of_the_stack_layout(tmp_path) -> None:
    """A replay of stacks survives a snapshot taken a slice at a time while chunks come in."""
    chunks = run_actor(5, 3, 60, 4, 3, 0.1, True, frames_once=True)
    replay = PrioritizedReplay(50, seed=1)
    for c in chunks[:6]:
        replay.add(c)
    snap = replay.begin_snapshot()
    snap.copy(10)
    replay.add(chunks[6])  # overwrites slots ahead of the cursor: preserved, copy-on-write
    while not snap.copy(7):
        pass
    path = tmp_path / "replay.npz"
    PrioritizedReplay.write_snapshot(snap.state(), path)
    back = PrioritizedReplay.load_snapshot(path, 50, replay.alpha, seed=3)
    assert back.stack == S and back.obs_lo.shape == (50, S)
    ref = PrioritizedReplay(50, seed=3)
    for c in chunks[:6]:
        ref.add(c)
    a, b = back.sample(20, 0.4), ref.sample(20, 0.4)
    np.testing.assert_array_equal(a.ids, b.ids)
    ba, bb = (batch_from_sample(decode_sample(encode(x)), A, torch.device("cpu")) for x in (a, b))
    assert torch.equal(ba.obs, bb.obs) and torch.equal(ba.next_obs, bb.next_obs)


def test_replay_server_rejects_the_other_layout() -> None:
    """An actor with the other --frames-once is counted as rejected experience, not a crash."""
    pytest.importorskip("ale_py")
    from apex_zmq.config import ReplayConfig
    from replay_server.main import ReplayService

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (6, 84, 84), dtype=np.uint8)
    n = 2
    fields = dict(action=np.zeros(n, np.int32), ret=np.zeros(n, np.float32), disc=np.ones(n, np.float32),
                  priority=np.ones(n, np.float32))
    data, off = frame_table(compress_obs(frames))
    stacked = ExperienceChunk(sender="a", seq=1, obs_shape=(4, 84, 84), obs_dtype="uint8", frame_data=data,
                              frame_offsets=off, obs_idx=np.array([[0, 1, 2, 3], [1, 2, 3, 4]], np.int32),
                              next_idx=np.array([[1, 2, 3, 4], [2, 3, 4, 5]], np.int32), **fields)
    data, off = frame_table(compress_obs(np.stack([frames[:4], frames[1:5], frames[2:6]])))
    whole = ExperienceChunk(sender="b", seq=1, obs_shape=(4, 84, 84), obs_dtype="uint8", frame_data=data,
                            frame_offsets=off, obs_idx=np.array([0, 1], np.int32),
                            next_idx=np.array([1, 2], np.int32), **fields)
    svc = ReplayService(ReplayConfig(env="ALE/Pong-v5", capacity=64, batch_size=2, min_size=2))
    assert svc.on_experience(encode(stacked))
    assert not svc.on_experience(encode(whole))
    assert svc.counts["rejected_experience"] == 1 and svc.replay.size == 2
    s = decode_sample(encode(svc.replay.sample(2, 0.4)))
    b = batch_from_sample(s, 6, torch.device("cpu"))
    want = {0: frames[:4], 1: frames[1:5], 2: frames[2:6]}  # item i: obs i, next obs i + 1
    for i, item in enumerate(s.ids.tolist()):
        assert np.array_equal(b.obs[i].numpy(), want[item])
        assert np.array_equal(b.next_obs[i].numpy(), want[item + 1])
