"""PrioritizedReplay: ids, FIFO eviction, freed chunk bytes, stale updates, proportional sampling,
importance weights, and observations that survive the whole actor -> replay -> learner path.

Chunks are built the way the actor builds them: ``SegmentBuffer.emit`` gives the transition
fields and the compressed blobs, ``frame_table`` turns the blobs into the chunk's frame table.
"""

from __future__ import annotations

import numpy as np
import pytest

from actor.nstep import SegmentBuffer
from apex_zmq.wire import (
    ExperienceChunk,
    compress_obs,
    decode_experience,
    decode_sample,
    decompress_frames,
    encode,
    frame_table,
)
from replay_server.ledger import SenderLedger
from replay_server.replay import PrioritizedReplay, annealed_beta, importance_weights

ALPHA = 0.6
EPS = 1e-6


def simple_chunk(priorities, tag: int = 0, n_step: int = 1) -> ExperienceChunk:
    """n transitions; observation j is [tag, j, 0, 0]; transition j goes from obs j to obs j + n_step."""
    priorities = np.asarray(priorities, dtype=np.float32)
    n = len(priorities)
    m = n + n_step
    obs = np.zeros((m, 4), dtype=np.float32)
    obs[:, 0] = tag
    obs[:, 1] = np.arange(m)
    data, offsets = frame_table(compress_obs(obs))
    return ExperienceChunk(
        sender="actor-0", seq=tag, obs_shape=(4,), obs_dtype="float32", frame_data=data,
        frame_offsets=offsets, obs_idx=np.arange(n, dtype=np.int32),
        next_idx=np.arange(n_step, m, dtype=np.int32), action=(np.arange(n) % 2).astype(np.int32),
        ret=np.full(n, float(tag), np.float32), disc=np.full(n, 0.9, np.float32), priority=priorities)


def p_alpha(p, alpha=ALPHA, eps=EPS):
    return (np.asarray(p, dtype=np.float64) + eps) ** alpha


# --------------------------------------------------------------------------- ids and eviction


def test_ids_are_ever_increasing_across_chunks_and_wraps():
    r = PrioritizedReplay(capacity=8)
    seen = []
    for k, n in enumerate([3, 5, 4, 6, 1, 7]):
        ids = r.add(simple_chunk(np.ones(n), tag=k))
        assert ids.dtype == np.int64
        seen.extend(ids.tolist())
    assert seen == list(range(26))
    assert r.next_id == 26 and r.size == 8


def test_size_grows_to_capacity():
    r = PrioritizedReplay(capacity=10)
    assert r.size == 0
    r.add(simple_chunk(np.ones(4)))
    assert r.size == 4
    r.add(simple_chunk(np.ones(4)))
    assert r.size == 8
    r.add(simple_chunk(np.ones(4)))
    assert r.size == 10


def test_fifo_eviction_keeps_only_the_newest_capacity_ids():
    cap = 8
    r = PrioritizedReplay(capacity=cap, alpha=ALPHA, seed=1)
    prios = np.arange(1, 13, dtype=np.float32)  # item id i has priority i + 1
    for k in range(3):
        r.add(simple_chunk(prios[4 * k:4 * k + 4], tag=k))
    assert r.size == cap
    assert sorted(r.ids.tolist()) == list(range(4, 12))  # ids 0..3 evicted
    # priorities() reads the slot: an evicted id shows the newer item living in its slot.
    np.testing.assert_allclose(r.priorities(np.arange(4)), r.priorities(np.arange(8, 12)))
    np.testing.assert_allclose(r.priorities(np.arange(4, 12)), p_alpha(prios[4:12]))
    # The oldest ids are never sampled again.
    sampled = np.concatenate([r.sample(8, 0.4).ids for _ in range(300)])
    assert sampled.min() >= 4 and sampled.max() <= 11
    assert set(sampled.tolist()) == set(range(4, 12))


def test_sample_never_returns_evicted_ids_with_many_wraps():
    r = PrioritizedReplay(capacity=13, seed=3)
    rng = np.random.default_rng(0)
    for k in range(40):
        r.add(simple_chunk(rng.random(int(rng.integers(1, 9))) * 10, tag=k))
        s = r.sample(16, 0.5)
        assert s.ids.min() >= r.next_id - 13 and s.ids.max() < r.next_id
        # the batch's ids and transition data belong together
        np.testing.assert_array_equal(r.ids[s.ids % 13], s.ids)


def test_chunk_larger_than_capacity_keeps_its_tail():
    r = PrioritizedReplay(capacity=4)
    chunk = simple_chunk(np.arange(1, 11, dtype=np.float32), tag=1)
    ids = r.add(chunk)
    np.testing.assert_array_equal(ids, np.arange(6, 10))
    assert r.next_id == 10 and r.size == 4
    np.testing.assert_allclose(r.priorities(ids), p_alpha([7, 8, 9, 10]))
    s = r.sample(4, 1.0)
    frames = decompress_frames(s.frame_data, s.frame_offsets, s.obs_shape, s.obs_dtype)
    # transition id 6+j goes from obs 6+j to obs 7+j of the chunk
    np.testing.assert_array_equal(frames[s.obs_idx][:, 1], s.ids)
    np.testing.assert_array_equal(frames[s.next_idx][:, 1], s.ids + 1)


def test_empty_chunk_adds_nothing():
    r = PrioritizedReplay(capacity=4)
    ids = r.add(simple_chunk(np.zeros(0)))
    assert len(ids) == 0 and r.size == 0 and r.next_id == 0
    with pytest.raises(ValueError):
        r.sample(2, 0.4)


def test_rejects_chunks_of_another_observation_spec():
    r = PrioritizedReplay(capacity=8)
    r.add(simple_chunk(np.ones(2)))
    other = simple_chunk(np.ones(2))
    other.obs_shape = (84, 84)
    with pytest.raises(ValueError):
        r.add(other)
    other = simple_chunk(np.ones(2))
    other.obs_dtype = "uint8"
    with pytest.raises(ValueError):
        r.add(other)


def test_chunk_bytes_freed_when_its_last_transition_is_evicted():
    r = PrioritizedReplay(capacity=8)
    a, b, c, d = (simple_chunk(np.ones(n), tag=t) for t, n in [(1, 4), (2, 4), (3, 2), (4, 2)])
    la, lb, lc, ld = (len(x.frame_data) for x in (a, b, c, d))
    assert r.stored_bytes == 0
    r.add(a)
    assert r.stored_bytes == la
    r.add(b)
    assert r.stored_bytes == la + lb
    r.add(c)  # evicts half of a: a's blobs are still needed
    assert r.stored_bytes == la + lb + lc
    r.add(d)  # evicts the rest of a
    assert r.stored_bytes == lb + lc + ld
    r.add(simple_chunk(np.ones(8), tag=5))  # evicts b, c and d at once
    assert r.stored_bytes == len(simple_chunk(np.ones(8), tag=5).frame_data)


def test_stored_bytes_stays_bounded_over_a_long_run():
    r = PrioritizedReplay(capacity=20)
    sizes = []
    for k in range(200):
        r.add(simple_chunk(np.ones(7), tag=k))
        sizes.append(r.stored_bytes)
    one = len(simple_chunk(np.ones(7), tag=0).frame_data)
    # at most ceil(20 / 7) + 1 chunks can have live transitions
    assert max(sizes) <= 4 * one + 16
    assert len(r._chunks) <= 4


# --------------------------------------------------------------------------- updates


def test_stale_update_is_ignored_and_counted():
    r = PrioritizedReplay(capacity=4, alpha=ALPHA)
    r.add(simple_chunk(np.ones(4), tag=0))  # ids 0..3
    r.add(simple_chunk([2.0, 3.0], tag=1))  # ids 4, 5 replace 0, 1
    before = r.priorities([4, 5]).copy()
    applied = r.update(np.array([0, 1, 2]), np.array([100.0, 100.0, 5.0]))
    assert applied == 1
    assert r.stale_updates == 2
    np.testing.assert_array_equal(r.priorities([4, 5]), before)
    np.testing.assert_allclose(r.priorities([2]), p_alpha([5.0]))
    np.testing.assert_allclose(r.priorities([3]), p_alpha([1.0]))


def test_update_of_never_stored_or_negative_ids_is_stale():
    r = PrioritizedReplay(capacity=4)
    r.add(simple_chunk([1.0, 1.0, 1.0], tag=0))
    total = r.tree.total
    assert r.update(np.array([3, 7, 100, -1, -4]), np.full(5, 9.0)) == 0
    assert r.stale_updates == 5
    assert r.tree.total == total


def test_update_applies_new_priorities_and_returns_count():
    r = PrioritizedReplay(capacity=16, alpha=0.5)
    ids = r.add(simple_chunk(np.ones(10)))
    new = np.linspace(0.0, 9.0, 10)
    assert r.update(ids, new) == 10
    assert r.stale_updates == 0
    np.testing.assert_allclose(r.priorities(ids), p_alpha(new, alpha=0.5))
    np.testing.assert_allclose(r.tree.total, p_alpha(new, alpha=0.5).sum())


def test_zero_priority_item_is_practically_never_sampled():
    r = PrioritizedReplay(capacity=4, alpha=1.0, seed=0)
    ids = r.add(simple_chunk([0.0, 1.0, 1.0, 1.0]))
    assert r.priorities(ids[:1])[0] > 0  # priority_eps keeps it sampleable in principle
    got = np.concatenate([r.sample(4, 0.4).ids for _ in range(500)])
    assert (got == ids[0]).sum() <= 2


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("alpha", [0.6, 1.0, 0.0])
@pytest.mark.parametrize("batch_size", [1, 16])
def test_sampling_is_proportional_to_priority_alpha(alpha, batch_size):
    prios = np.array([1.0, 2.0, 4.0, 8.0, 0.5], dtype=np.float32)
    r = PrioritizedReplay(capacity=7, alpha=alpha, seed=42)  # capacity > size: empty slots exist
    ids = r.add(simple_chunk(prios))
    draws = 20000
    got = np.concatenate([r.sample(batch_size, 0.4).ids for _ in range(draws // batch_size)])
    assert len(got) == draws
    freq = np.array([(got == i).mean() for i in ids])
    want = p_alpha(prios, alpha) / p_alpha(prios, alpha).sum()
    # binomial std <= 0.0036 at 20000 draws; stratified batches are tighter still
    np.testing.assert_allclose(freq, want, atol=0.015)
    assert set(got.tolist()) <= set(ids.tolist())


def test_sample_weights_match_importance_weights_of_the_batch():
    prios = np.array([1.0, 2.0, 4.0, 8.0], dtype=np.float32)
    r = PrioritizedReplay(capacity=4, alpha=ALPHA, seed=0)
    r.add(simple_chunk(prios))
    for beta in (0.0, 0.4, 1.0):
        s = r.sample(32, beta)
        p = r.priorities(s.ids)
        want = importance_weights(p, p_alpha(prios).sum(), 4, beta)
        np.testing.assert_allclose(s.weight, want, rtol=1e-6)
        assert s.weight.dtype == np.float32 and s.weight.max() == pytest.approx(1.0)
    # beta = 1 exactly undoes the sampling bias: weight * P(i) is the same for every item
    s = r.sample(32, 1.0)
    prod = s.weight * r.priorities(s.ids)
    np.testing.assert_allclose(prod, prod[0], rtol=1e-5)


def test_sampling_is_reproducible_with_a_seed():
    def run(seed):
        r = PrioritizedReplay(capacity=32, seed=seed)
        r.add(simple_chunk(np.random.default_rng(5).random(30)))
        return np.concatenate([r.sample(8, 0.4).ids for _ in range(20)])
    np.testing.assert_array_equal(run(7), run(7))
    assert not np.array_equal(run(7), run(8))


def test_sample_carries_the_stored_transition_fields():
    r = PrioritizedReplay(capacity=32, seed=0)
    chunks = [simple_chunk(np.ones(5), tag=t) for t in range(1, 5)]
    for c in chunks:
        r.add(c)
    s = r.sample(64, 0.4, seq=9)
    assert s.seq == 9 and s.obs_shape == (4,) and s.obs_dtype == "float32"
    tag = s.ids // 5 + 1
    j = s.ids % 5
    np.testing.assert_array_equal(s.ret, tag.astype(np.float32))
    np.testing.assert_array_equal(s.action, (j % 2).astype(np.int32))
    np.testing.assert_array_equal(s.disc, np.full(64, 0.9, np.float32))
    frames = decompress_frames(s.frame_data, s.frame_offsets, s.obs_shape, s.obs_dtype)
    np.testing.assert_array_equal(frames[s.obs_idx][:, 0], tag)
    np.testing.assert_array_equal(frames[s.obs_idx][:, 1], j)
    np.testing.assert_array_equal(frames[s.next_idx][:, 1], j + 1)
    # each distinct observation is in the batch's frame table once
    keys = set(zip(tag.tolist(), j.tolist())) | set(zip(tag.tolist(), (j + 1).tolist()))
    assert len(s.frame_offsets) - 1 == len(keys)


# --------------------------------------------------------------------------- importance weights


def test_importance_weights_hand_computed():
    p = np.array([1.0, 2.0, 4.0])
    # (3 * p / 7) ** -1 = 7 / (3 p) = [7/3, 7/6, 7/12]; divided by the max 7/3
    np.testing.assert_allclose(importance_weights(p, 7.0, 3, 1.0), [1.0, 0.5, 0.25], rtol=1e-7)
    np.testing.assert_allclose(importance_weights(p, 7.0, 3, 0.5), [1.0, 0.5 ** 0.5, 0.5], rtol=1e-7)
    np.testing.assert_allclose(importance_weights(p, 7.0, 3, 0.0), [1.0, 1.0, 1.0])
    w = importance_weights(p, 7.0, 3, 0.4)
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, (p / p.min()) ** -0.4, rtol=1e-6)


def test_importance_weights_depend_on_batch_max_not_total():
    # total and size cancel after normalising by the batch maximum
    p = np.array([3.0, 6.0])
    np.testing.assert_allclose(importance_weights(p, 100.0, 1000, 1.0), [1.0, 0.5], rtol=1e-7)
    np.testing.assert_allclose(importance_weights(p, 9.0, 2, 1.0), [1.0, 0.5], rtol=1e-7)


def test_annealed_beta():
    assert annealed_beta(0.4, 0, 100) == pytest.approx(0.4)
    assert annealed_beta(0.4, 50, 100) == pytest.approx(0.7)
    assert annealed_beta(0.4, 100, 100) == pytest.approx(1.0)
    assert annealed_beta(0.4, 10**6, 100) == pytest.approx(1.0)
    assert annealed_beta(0.4, 10**6, 0) == 0.4  # no annealing: constant
    assert annealed_beta(0.4, 5, -1) == 0.4
    betas = [annealed_beta(0.2, s, 10) for s in range(15)]
    assert all(a <= b for a, b in zip(betas, betas[1:]))


# --------------------------------------------------------------------------- the whole path


def _stamped_obs(step: int, env: int, shape, dtype) -> np.ndarray:
    """An observation that says which (step, env) it is."""
    o = np.zeros(shape, dtype=dtype)
    flat = o.reshape(-1)
    flat[0], flat[1], flat[2] = step % 200, step // 200, env
    if o.ndim == 3:
        o[:, 20:30, 20:30] = 255 - env  # some image structure
    return o


@pytest.mark.parametrize("shape,dtype", [((4,), "float32"), ((4, 84, 84), "uint8")])
def test_sampled_frames_decompress_to_the_actor_observations(shape, dtype):
    """SegmentBuffer -> chunk -> wire -> replay -> sample -> wire -> decompress, checked by content.

    Every observation is stamped with its (step, env); no episode ends, so each transition goes from
    the observation of (t, k) to that of (t + n, k), and its action is the one recorded at (t, k).
    """
    K, steps, n, A, gamma = 3, 4, 3, 5, 0.5
    seg = SegmentBuffer(K, steps, n, gamma, A)
    r = PrioritizedReplay(capacity=40, seed=0)  # smaller than what is produced: wraps around
    rng = np.random.default_rng(0)
    produced = 0
    for t in range(30):
        obs = np.stack([_stamped_obs(t, k, shape, dtype) for k in range(K)])
        seg.add_obs(compress_obs(obs), rng.normal(size=(K, A)).astype(np.float32))
        if seg.full:
            f = seg.emit()
            data, offsets = frame_table(f.pop("blobs"))
            chunk = ExperienceChunk(sender="actor-0", seq=t, obs_shape=shape, obs_dtype=dtype,
                                    frame_data=data, frame_offsets=offsets, **f)
            produced += len(r.add(decode_experience(encode(chunk))))
        actions = (t + np.arange(K)) % A
        seg.add_step(actions, np.ones(K, np.float32), np.zeros(K, bool), np.zeros(K, bool),
                     np.ones(K, bool))
    assert produced > r.capacity
    for _ in range(5):
        s = decode_sample(encode(r.sample(32, 0.4)))
        frames = decompress_frames(s.frame_data, s.frame_offsets, s.obs_shape, s.obs_dtype)
        assert frames.shape == (len(s.frame_offsets) - 1, *shape) and frames.dtype == np.dtype(dtype)
        o, nx = frames[s.obs_idx].reshape(32, -1), frames[s.next_idx].reshape(32, -1)
        t0 = o[:, 0].astype(int) + 200 * o[:, 1].astype(int)
        t1 = nx[:, 0].astype(int) + 200 * nx[:, 1].astype(int)
        k0, k1 = o[:, 2].astype(int), nx[:, 2].astype(int)
        np.testing.assert_array_equal(k1, k0)
        np.testing.assert_array_equal(t1, t0 + n)
        np.testing.assert_array_equal(s.action, (t0 + k0) % A)
        np.testing.assert_allclose(s.ret, 1 + gamma + gamma ** 2)
        np.testing.assert_allclose(s.disc, gamma ** n)
        # the full observation, not just the stamp, comes back
        for i in range(0, 32, 7):
            np.testing.assert_array_equal(frames[s.obs_idx[i]], _stamped_obs(t0[i], k0[i], shape, dtype))
        # ids follow the actor's order (step-major, then env) and only live ids come back
        np.testing.assert_array_equal(s.ids, K * t0 + k0)
        assert s.ids.min() >= r.next_id - r.capacity


def test_snapshot_round_trip_restores_items_priorities_and_frames(tmp_path) -> None:
    from replay_server.replay import PrioritizedReplay
    rng = np.random.default_rng(5)
    r = PrioritizedReplay(40, alpha=0.6, seed=1)
    for i in range(7):  # 7 x 8 = 56 > capacity: evictions, chunks partly alive
        r.add(_snapshot_chunk(rng, 8, seed=i))
    r.update(np.arange(20, 56), rng.random(36) + 0.1)
    path = tmp_path / "replay" / "snapshot.npz"
    # As the server does: the snapshot is taken, the replay goes on changing (evicting chunks too),
    # and only then is the snapshot written; the file must hold the state at snapshot time.
    state = r.snapshot()
    before_ids = r.ids.copy()
    live = np.arange(16, 56)
    before_prios = r.priorities(live)
    before_frames = {int(i): bytes(r._chunks[int(r.chunk[i % 40])]) for i in live}
    before_batch = r._gather(live % 40, np.ones(40, np.float32), 0)
    for k in range(6):
        r.add(_snapshot_chunk(rng, 8, seed=99 + k))
        r.update(r.ids[:8], np.full(8, 5.0))
    PrioritizedReplay.write_snapshot(state, path)
    back = PrioritizedReplay.load_snapshot(path, 40, 0.6, seed=1)
    assert back.size == 40 and back.next_id == 56
    np.testing.assert_array_equal(back.ids, before_ids)
    np.testing.assert_array_equal(back.priorities(live), before_prios)
    assert all(bytes(back._chunks[int(back.chunk[i % 40])]) == blob for i, blob in before_frames.items())
    # The restored replay gathers exactly the frames the original held for the same items.
    again = back._gather(live % 40, np.ones(40, np.float32), 0)
    assert bytes(again.frame_data) == bytes(before_batch.frame_data)
    np.testing.assert_array_equal(again.ids, before_batch.ids)
    assert back.tree.total > 0 and back.stored_bytes > 0
    # Sampling from the restored replay gives the same frames as the original for the same items.
    b = back.sample(16, beta=0.4)
    assert set(b.ids.tolist()) <= set(live.tolist())
    assert len(bytes(b.frame_data)) == int(b.frame_offsets[-1])
    # Stale ids stay stale, and new items continue the id sequence.
    assert back.update(np.array([3]), np.array([1.0])) == 0
    assert back.add(_snapshot_chunk(rng, 8, seed=100))[0] == 56


def test_snapshot_refuses_other_settings(tmp_path) -> None:
    from replay_server.replay import PrioritizedReplay
    r = PrioritizedReplay(16, alpha=0.6)
    path = tmp_path / "s.npz"
    PrioritizedReplay.write_snapshot(r.snapshot(), path)
    with pytest.raises(ValueError, match="capacity"):
        PrioritizedReplay.load_snapshot(path, 32, 0.6)


def _snapshot_chunk(rng: np.random.Generator, n: int, seed: int):
    from apex_zmq.wire import ExperienceChunk, compress_obs, frame_table
    obs = np.random.default_rng(seed).integers(0, 4, (n + 1, 4), dtype=np.uint8)
    data, offsets = frame_table(compress_obs(obs))
    return ExperienceChunk(sender="t", seq=seed, obs_shape=(4,), obs_dtype="uint8", frame_data=data,
                           frame_offsets=offsets, obs_idx=np.arange(n, dtype=np.int32),
                           next_idx=np.arange(1, n + 1, dtype=np.int32),
                           action=rng.integers(0, 2, n).astype(np.int32), ret=rng.random(n).astype(np.float32),
                           disc=np.full(n, 0.97, np.float32), priority=(rng.random(n) + 0.1).astype(np.float32))


def _replay_state(r: PrioritizedReplay) -> dict:
    """Everything a snapshot must restore, copied: slot arrays, leaves, FIFO position, counters,
    per-chunk live counts and blobs, and the frames of every stored item as a batch gathers them."""
    live = np.flatnonzero(r.ids >= 0)
    batch = r._gather(live, np.ones(len(live), np.float32), 0)
    return {"slots": {k: getattr(r, k).copy() for k in PrioritizedReplay._SLOT_ARRAYS},
            "leaves": _leaves(r), "meta": (r.next_id, r._next_chunk, r.stale_updates),
            "live": dict(r._live), "blobs": {c: bytes(b) for c, b in r._chunks.items()},
            "frames": bytes(batch.frame_data), "total": r.tree.total}


def _assert_restores(back: PrioritizedReplay, want: dict) -> None:
    got = _replay_state(back)
    for k, v in want["slots"].items():
        np.testing.assert_array_equal(got["slots"][k], v, err_msg=k)
    np.testing.assert_array_equal(got["leaves"], want["leaves"])  # each item's own priority
    assert got["meta"] == want["meta"]  # FIFO position, chunk counter, counters
    assert got["live"] == want["live"] and got["blobs"] == want["blobs"]
    assert got["frames"] == want["frames"]  # no torn item: every item's frames are its own
    np.testing.assert_allclose(back.tree.total, want["total"], rtol=1e-12)


@pytest.mark.parametrize("seed,slice_slots", [(0, 1), (1, 5), (2, 17), (3, 40)])
def test_snapshot_copied_in_slices_while_the_replay_changes_restores_the_begin_instant(
        tmp_path, seed: int, slice_slots: int) -> None:
    """Between slices, chunks are inserted (evicting items ahead of and behind the copy, whole chunks
    too), priorities updated and items removed; the snapshot is still the replay of the instant it
    began, and the restored replay goes on from there."""
    rng = np.random.default_rng(seed)
    cap = 64
    r = PrioritizedReplay(cap, alpha=0.6, seed=1)
    for i in range(13):  # 104 items: wrapped, first chunks partly evicted
        r.add(_snapshot_chunk(rng, 8, seed=i))
    r.update(np.arange(40, 104), rng.random(64) + 0.1)
    r.remove(np.array([50, 77]))
    want = _replay_state(r)
    snap = r.begin_snapshot()
    with pytest.raises(RuntimeError, match="already"):
        r.begin_snapshot()
    changed_ahead = changed_behind = 0
    k = 100
    per_gap = -(-3 * cap // (2 * (-(-cap // slice_slots) - 1)))  # 1.5 x capacity over all gaps
    while True:
        done = snap.copy(slice_slots)
        if done:
            break
        before = r.ids.copy(), _leaves(r)
        target = r.next_id + per_gap
        while r.next_id < target:  # chunks of 1 to 11 items
            k += 1
            r.add(_snapshot_chunk(rng, int(rng.integers(1, 12)), seed=k))
        live = r.ids[r.ids >= 0]
        r.update(np.concatenate([rng.choice(live, 6), [0, 1]]), rng.random(8) + 0.1)  # 0, 1: stale
        r.remove(rng.choice(live, 1))
        moved = np.flatnonzero((r.ids != before[0]) | (_leaves(r) != before[1]))
        changed_ahead += int((moved >= snap.cursor).sum())
        changed_behind += int((moved < snap.cursor).sum())
    assert changed_ahead > 0 and changed_behind > 0 and snap.saved.any()
    assert r._snapshot is None  # done: the replay no longer feeds it
    assert r.next_id - want["meta"][0] > cap  # every item of the begin instant was overwritten since
    for k in range(3):  # the replay goes on changing while the finished snapshot waits to be written
        r.add(_snapshot_chunk(rng, 8, seed=200 + k))
    path = tmp_path / "replay" / "snapshot.npz"
    PrioritizedReplay.write_snapshot(snap.state(), path)
    back = PrioritizedReplay.load_snapshot(path, cap, 0.6, seed=1)
    _assert_restores(back, want)
    assert back.add(_snapshot_chunk(rng, 4, seed=300))[0] == want["meta"][0]  # ids go on from there
    assert back.update(np.array([want["meta"][0] - cap - 1]), np.array([1.0])) == 0  # evicted: stale


def test_abandoned_snapshot_stops_following_the_replay() -> None:
    rng = np.random.default_rng(0)
    r = PrioritizedReplay(32, alpha=0.6)
    r.add(_snapshot_chunk(rng, 8, seed=0))
    snap = r.begin_snapshot()
    snap.copy(4)
    snap.cancel()
    r.add(_snapshot_chunk(rng, 8, seed=1))
    assert not snap.saved.any()  # nothing preserved once cancelled
    with pytest.raises(RuntimeError, match="copied up to slot 4"):
        snap.state()
    r.begin_snapshot().copy(32)  # a new one can start


def test_service_snapshot_serves_between_slices_and_restores_its_begin_instant(tmp_path) -> None:
    """The replay server's snapshot task yields to the loop: batches are sampled, chunks inserted and
    priorities updated while it copies, and the file is the replay of the instant it began."""
    import asyncio
    from dataclasses import replace

    svc = _service(capacity=256, batch_size=16, min_size=8)
    svc.cfg = replace(svc.cfg, run_dir=str(tmp_path), snapshot_period=1.0)
    svc.snapshot_path = tmp_path / "replay" / "snapshot.npz"
    for tag in range(40):  # 320 items: wrapped
        svc.on_experience(encode(simple_chunk(np.random.default_rng(tag).random(8) + 0.1, tag=tag)))
    want: dict = {}
    begin = svc.replay.begin_snapshot

    def spy():  # the state at the instant the snapshot begins
        want.update(_replay_state(svc.replay))
        return begin()
    svc.replay.begin_snapshot = spy
    during = {"sampled": 0, "inserted": 0, "updated": 0}

    async def traffic(stop: asyncio.Event) -> None:
        tag, rng = 1000, np.random.default_rng(0)
        while not stop.is_set():
            copying = svc.replay._snapshot is not None
            s = decode_sample(svc.sample_frames())
            assert svc.on_priorities(_update(s.ids, rng.random(len(s.ids)) + 0.1, s.incarnation))
            assert svc.on_experience(encode(simple_chunk(rng.random(5) + 0.1, tag=tag)))
            tag += 1
            if copying:
                during["sampled"] += 1
                during["inserted"] += 5
            await asyncio.sleep(0)

    async def run() -> None:
        stop = asyncio.Event()
        t = asyncio.create_task(traffic(stop))
        await asyncio.sleep(0)
        await svc.snapshot(slice_slots=8)  # 32 slices
        stop.set()
        await t

    asyncio.run(run())
    assert during["sampled"] > 0 and during["inserted"] > 0
    assert svc.replay._snapshot is None
    back = _service(capacity=256, batch_size=16, min_size=8)
    restored = type(back)(replace(back.cfg, run_dir=str(tmp_path), snapshot_period=1.0))  # as a restart does
    _assert_restores(restored.replay, want)


# --------------------------------------------------------------------------- removal of bad items


def _leaves(r: PrioritizedReplay) -> np.ndarray:
    return r.tree.get(np.arange(r.capacity)).copy()


def _brute_force_find(r: PrioritizedReplay, v: np.ndarray) -> np.ndarray:
    """The slot whose cumulative-priority interval holds each v, from the leaves alone."""
    return np.searchsorted(np.cumsum(_leaves(r)), v, side="right")


def test_remove_after_a_huge_priority_restores_exact_proportional_sampling():
    """An item at 1e30 takes every draw; once removed it is never drawn again, and the others are
    drawn in proportion to their own priorities: the sum-tree holds no residue of the 1e30."""
    prios = np.array([1.0, 2.0, 1e30, 4.0, 0.5, 8.0], dtype=np.float32)
    r = PrioritizedReplay(capacity=8, alpha=ALPHA, seed=11)  # capacity > size: empty slots too
    ids = r.add(simple_chunk(prios))
    huge = ids[2]
    before = np.concatenate([r.sample(16, 0.4).ids for _ in range(200)])
    assert (before == huge).mean() > 0.999
    assert r.sampleable

    assert r.remove(np.array([huge])) == 1
    assert r.removed == 1
    assert r.priorities([huge])[0] == 0.0
    rest = np.delete(ids, 2)
    want_p = p_alpha(np.delete(prios, 2))
    np.testing.assert_allclose(r.priorities(rest), want_p, rtol=1e-12)  # the others untouched
    # The root is the sum of what is left (a delta-updated tree would keep float residue of 1e18).
    np.testing.assert_allclose(r.tree.total, want_p.sum(), rtol=1e-12)
    # The tree's descent agrees exactly with a brute-force search over the leaves.
    grid = np.linspace(0.0, np.nextafter(r.tree.total, 0), 4001)
    np.testing.assert_array_equal(r.tree.find(grid), _brute_force_find(r, grid))

    draws = 24000
    got = np.concatenate([r.sample(16, 0.4).ids for _ in range(draws // 16)])
    assert len(got) == draws and huge not in got
    freq = np.array([(got == i).mean() for i in rest])
    np.testing.assert_allclose(freq, want_p / want_p.sum(), atol=0.012)
    # The weights of the sample are those of the remaining priorities.
    s = r.sample(16, 1.0)
    np.testing.assert_allclose(s.weight, importance_weights(r.priorities(s.ids), want_p.sum(), r.size, 1.0),
                               rtol=1e-6)


def test_removed_items_among_many_are_never_sampled():
    r = PrioritizedReplay(capacity=64, alpha=1.0, seed=2)
    ids = r.add(simple_chunk(np.random.default_rng(0).random(60) * 5 + 0.1))
    gone = ids[::2]
    assert r.remove(gone) == len(gone)
    assert r.removed == 30
    got = np.concatenate([r.sample(64, 0.4).ids for _ in range(300)])
    assert not np.isin(got, gone).any()
    assert set(got.tolist()) == set(ids[1::2].tolist())


def test_remove_ignores_stale_never_stored_and_negative_ids():
    r = PrioritizedReplay(capacity=4, alpha=ALPHA)
    r.add(simple_chunk(np.ones(4), tag=0))       # ids 0..3
    r.add(simple_chunk([2.0, 3.0], tag=1))       # ids 4, 5 replace 0, 1
    leaves, total = _leaves(r), r.tree.total
    # 0, 1: evicted (their slots hold 4, 5); 6, 9, 10**9: never stored; negative: never valid
    assert r.remove(np.array([0, 1, 6, 9, 10**9, -1, -3, -4])) == 0
    assert r.removed == 0
    np.testing.assert_array_equal(_leaves(r), leaves)
    assert r.tree.total == total
    np.testing.assert_allclose(r.priorities([4, 5]), p_alpha([2.0, 3.0]))
    # A mix: only the live one goes.
    assert r.remove(np.array([1, 5, 7])) == 1
    assert r.removed == 1 and r.priorities([5])[0] == 0.0 and r.priorities([4])[0] > 0
    assert r.remove(np.zeros(0, np.int64)) == 0


def test_removed_slot_is_reused_by_a_new_item_with_its_own_priority():
    r = PrioritizedReplay(capacity=4, alpha=1.0, seed=0)
    ids = r.add(simple_chunk([1.0, 1.0, 1.0, 1.0], tag=0))
    r.remove(ids[:1])
    new = r.add(simple_chunk([3.0], tag=1))       # id 4 evicts removed id 0, in slot 0
    assert new.tolist() == [4]
    np.testing.assert_allclose(r.priorities(new), p_alpha([3.0], alpha=1.0))
    got = np.concatenate([r.sample(6, 0.4).ids for _ in range(1000)])
    assert 0 not in got
    np.testing.assert_allclose((got == 4).mean(), 3.0 / 6.0, atol=0.02)
    # the removed id is stale now: removing it again touches the new item not at all
    assert r.remove(np.array([0])) == 0
    np.testing.assert_allclose(r.priorities(new), p_alpha([3.0], alpha=1.0))


def test_replay_with_every_item_removed_is_not_sampleable():
    r = PrioritizedReplay(capacity=8, seed=0)
    assert not r.sampleable
    with pytest.raises(ValueError):
        r.sample(4, 0.4)
    ids = r.add(simple_chunk([1.0, 5.0, 0.0], tag=0))
    assert r.sampleable
    r.remove(ids[:2])
    assert r.sampleable  # a zero-priority (not removed) item keeps priority_eps
    r.remove(ids[2:])
    assert r.removed == 3 and r.size == 3
    assert not r.sampleable and r.tree.total == 0.0
    with pytest.raises(ValueError):
        r.sample(4, 0.4)
    more = r.add(simple_chunk([2.0], tag=1))
    assert r.sampleable
    got = np.concatenate([r.sample(4, 0.4).ids for _ in range(50)])
    assert set(got.tolist()) == set(more.tolist())


def test_removing_an_item_twice_counts_it_once():
    """The learner may report one bad item from several batches sampled before the first removal
    arrived (prefetch): ``removed`` counts items taken out of sampling, not removal requests."""
    r = PrioritizedReplay(capacity=8, seed=0)
    ids = r.add(simple_chunk(np.ones(5)))
    assert r.remove(ids[[1]]) == 1
    assert r.remove(ids[[1]]) == 0
    assert r.remove(ids[[1, 1, 3, 3]]) == 1
    assert r.removed == 2
    assert r.priorities(ids[[1, 3]]).tolist() == [0.0, 0.0]


def test_update_naming_a_removed_item_does_not_bring_it_back():
    """PROTOCOL.md: ``remove`` names ids never to sample again. A later priority update for the id
    (a batch sampled before the removal, or a client that keeps reporting it) is ignored and
    counted, however large its priority."""
    r = PrioritizedReplay(capacity=16, alpha=ALPHA, seed=3)
    ids = r.add(simple_chunk(np.ones(8)))
    gone = int(ids[2])
    assert r.remove(np.array([gone])) == 1
    assert r.update(ids, np.full(len(ids), 1e6)) == len(ids) - 1  # the others take it
    assert r.update(np.array([gone, gone]), np.array([1e9, 1e9])) == 0
    assert (r.removed, r.removed_updates, r.stale_updates) == (1, 3, 0)
    assert r.priorities([gone])[0] == 0.0
    for _ in range(10):
        assert gone not in r.sample(8, 0.4).ids
    # Removing it again changes no counter: the learner may report it from several batches.
    assert r.remove(np.array([gone])) == 0
    assert (r.removed, r.removed_updates, r.stale_updates) == (1, 3, 0)


def test_removal_of_an_evicted_id_counts_as_stale():
    r = PrioritizedReplay(capacity=4, alpha=ALPHA)
    r.add(simple_chunk(np.ones(4), tag=0))       # ids 0..3
    r.add(simple_chunk([2.0, 3.0], tag=1))       # ids 4, 5 replace 0, 1
    assert r.remove(np.array([0, 1, 1, -2, 9])) == 0  # evicted, negative, never stored; 1 twice: once
    assert (r.stale_updates, r.removed, r.removed_updates) == (4, 0, 0)
    np.testing.assert_allclose(r.priorities([4, 5]), p_alpha([2.0, 3.0]))


def test_a_new_item_in_a_removed_slot_takes_updates_again():
    """The removed flag belongs to the slot's item, not to the slot: the id that overwrites it is
    live, and the removed id is stale from then on."""
    r = PrioritizedReplay(capacity=4, alpha=1.0)
    r.add(simple_chunk(np.ones(4)))              # ids 0..3
    r.remove(np.array([1]))
    r.add(simple_chunk(np.ones(2), tag=1))       # ids 4, 5 take slots 0, 1
    assert r.update(np.array([5]), np.array([6.0])) == 1
    np.testing.assert_allclose(r.priorities([5]), p_alpha([6.0], alpha=1.0))
    assert r.update(np.array([1]), np.array([6.0])) == 0
    assert (r.stale_updates, r.removed_updates) == (1, 0)


def test_removed_items_stay_removed_across_a_snapshot(tmp_path) -> None:
    r = PrioritizedReplay(16, alpha=0.6, seed=1)
    ids = r.add(simple_chunk(np.ones(8)))
    r.remove(ids[[0, 5]])
    path = tmp_path / "s.npz"
    PrioritizedReplay.write_snapshot(r.snapshot(), path)
    back = PrioritizedReplay.load_snapshot(path, 16, 0.6)
    assert back.update(ids, np.full(8, 5.0)) == 6
    assert back.removed_updates == 2 and back.priorities(ids[[0, 5]]).tolist() == [0.0, 0.0]
    # A snapshot written before the flag existed: removed items are known by their priority 0.
    with np.load(path) as z:
        old = {k: z[k] for k in z.files if k != "slot_gone"}
    np.savez(path, **old)
    back = PrioritizedReplay.load_snapshot(path, 16, 0.6)
    assert back.gone[ids % 16].tolist() == [True, False, False, False, False, True, False, False]
    assert back.update(ids[[0]], np.array([5.0])) == 0


# --------------------------------------------------------------------------- ReplayService incarnations


def _service(capacity: int = 64, batch_size: int = 16, min_size: int = 8, seed: int = 0):
    from apex_zmq.config import ReplayConfig
    from replay_server.main import ReplayService
    return ReplayService(ReplayConfig(env="CartPole-v1", capacity=capacity, batch_size=batch_size,
                                      min_size=min_size, seed=seed))


def _update(ids, prios, inc: int, remove=()) -> list:
    from apex_zmq.wire import PriorityUpdate
    return encode(PriorityUpdate(sender="learner", seq=1, ids=np.asarray(ids, np.int64),
                                 priority=np.asarray(prios, np.float32), incarnation=inc,
                                 remove=np.asarray(remove, np.int64)))


def test_service_incarnation_is_random_and_stamped_on_every_sample():
    a, b = _service(), _service()
    assert a.incarnation != b.incarnation  # same config and seed: still distinct processes
    for svc in (a, b):
        assert type(svc.incarnation) is int and 0 <= svc.incarnation < 1 << 48
    assert a.on_experience(encode(simple_chunk(np.ones(12), tag=1)))
    assert a.ready
    incs = {decode_sample(a.sample_frames()).incarnation for _ in range(5)}
    assert incs == {a.incarnation}


def test_service_applies_updates_and_removals_of_its_own_incarnation():
    svc = _service()
    svc.on_experience(encode(simple_chunk(np.ones(10), tag=1)))  # ids 0..9
    s = decode_sample(svc.sample_frames())
    ids = np.unique(s.ids)
    assert svc.on_priorities(_update(ids, np.full(len(ids), 7.0), s.incarnation, remove=[9]))
    fresh = ids[ids != 9]
    np.testing.assert_allclose(svc.replay.priorities(fresh), p_alpha(np.full(len(fresh), 7.0)))
    assert svc.replay.priorities([9])[0] == 0.0
    assert svc.counts["updated"] == len(ids)  # 9 too, before its removal
    assert svc.replay.removed == 1
    assert svc.counts["stale_incarnation"] == 0 and svc.counts["rejected_priorities"] == 0
    got = np.concatenate([decode_sample(svc.sample_frames()).ids for _ in range(100)])
    assert 9 not in got


def test_service_ignores_and_counts_updates_of_another_incarnation():
    svc = _service()
    svc.on_experience(encode(simple_chunk(np.ones(10), tag=1)))
    leaves = _leaves(svc.replay)
    other = svc.incarnation ^ 1
    assert svc.on_priorities(_update([0, 1, 2], [100.0, 100.0, 100.0], other, remove=[3, 4]))
    np.testing.assert_array_equal(_leaves(svc.replay), leaves)
    assert svc.counts["stale_incarnation"] == 5
    assert svc.replay.stale_updates == 5
    assert svc.counts["updated"] == 0 and svc.replay.removed == 0
    assert svc.counts["rejected_priorities"] == 0  # well formed: stale, not rejected
    # an incarnation-0 update (the dataclass default) is stale too
    svc.on_priorities(_update([5], [9.0], 0))
    assert svc.counts["stale_incarnation"] == 6
    np.testing.assert_array_equal(_leaves(svc.replay), leaves)


def test_restarted_service_ignores_updates_for_ids_the_old_one_handed_out():
    """Ids start again from 0 in a restarted server: the same id names another item now."""
    old = _service()
    old.on_experience(encode(simple_chunk(np.ones(16), tag=1)))
    s = decode_sample(old.sample_frames())
    assert s.incarnation == old.incarnation

    new = _service()  # the restart: same config, fresh process
    new.on_experience(encode(simple_chunk(np.arange(1, 17, dtype=np.float32), tag=2)))
    assert new.replay.ids[:16].tolist() == list(range(16))  # the sampled ids exist again
    leaves = _leaves(new.replay)
    ids = np.unique(s.ids)
    msg = _update(ids, np.full(len(ids), 1000.0), s.incarnation, remove=ids[:2])
    assert new.on_priorities(msg)
    np.testing.assert_array_equal(_leaves(new.replay), leaves)  # no priority changed
    assert new.replay.removed == 0 and new.counts["updated"] == 0
    assert new.counts["stale_incarnation"] == len(ids) + 2
    # the old server, had it lived, would have applied the very same message
    assert old.on_priorities(msg)
    np.testing.assert_allclose(old.replay.priorities(ids[2:]), p_alpha(np.full(len(ids) - 2, 1000.0)))
    assert old.replay.removed == 2 and old.counts["stale_incarnation"] == 0


def test_service_with_every_item_removed_is_not_ready():
    svc = _service(min_size=4)
    svc.on_experience(encode(simple_chunk(np.ones(6), tag=1)))
    assert svc.ready
    svc.on_priorities(_update([], [], svc.incarnation, remove=np.arange(6)))
    assert svc.replay.removed == 6 and not svc.ready
    with pytest.raises(ValueError):
        svc.sample_frames()
    svc.on_experience(encode(simple_chunk(np.ones(2), tag=2)))
    assert svc.ready  # size >= min_size counts stored items, and two are sampleable
    assert set(decode_sample(svc.sample_frames()).ids.tolist()) <= {6, 7}


# ---------------------------------------------------------------------------------- the sender ledger

def test_sender_ledger_counts_per_process_gaps_and_restarts() -> None:
    led = SenderLedger(max_senders=2)
    for seq in (1, 2, 3, 6, 7):
        led.on_chunk("actor-0", seq, 10, incarnation=5)
    led.on_chunk("actor-0", 1, 4, incarnation=9)   # its new process ...
    led.on_chunk("actor-0", 8, 10, incarnation=5)  # ... while the old one's last chunks still arrive
    led.on_chunk("actor-1", 5, 8)   # no incarnation, first seen mid-stream (this server started late): no gap
    led.on_chunk("actor-1", 2, 8)   # its seq went back: a new process
    led.on_chunk("x", 1, 1)         # a third name: counted, not tracked
    m = led.metrics()
    assert m["replay/seq_skipped"] == 2 and m["replay/sender_restarts"] == 2 and m["replay/untracked_chunks"] == 1
    assert {k: v for k, v in m.items() if "/actor-0/" in k} == {
        "replay/from/actor-0/5/chunks": 6, "replay/from/actor-0/5/transitions": 60,
        "replay/from/actor-0/5/first_seq": 1, "replay/from/actor-0/5/last_seq": 8,
        "replay/from/actor-0/9/chunks": 1, "replay/from/actor-0/9/transitions": 4,
        "replay/from/actor-0/9/first_seq": 1, "replay/from/actor-0/9/last_seq": 1}
    assert m["replay/from/actor-1/0/first_seq"] == 2 and "replay/from/x/0/chunks" not in m
    led.on_chunk("actor-0", 1, 1, incarnation=12)  # a third process: the oldest is forgotten
    assert sorted(k.split("/")[3] for k in led.metrics() if k.startswith("replay/from/actor-0/") and
                  k.endswith("/chunks")) == ["12", "9"]
