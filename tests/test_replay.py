"""PrioritizedReplay: ids, FIFO eviction, freed chunk bytes, stale updates, proportional sampling,
importance weights, and observations that survive the whole actor -> replay -> learner path.

Chunks are built the way the actor builds them: ``SegmentBuffer.emit`` gives the transition
fields and the compressed blobs, ``frame_table`` turns the blobs into the chunk's frame table.
"""

from __future__ import annotations

import numpy as np
import pytest

from apex_zmq.nstep import SegmentBuffer
from apex_zmq.replay import PrioritizedReplay, annealed_beta, importance_weights
from apex_zmq.wire import (
    ExperienceChunk,
    compress_obs,
    decode_experience,
    decode_sample,
    decompress_frames,
    encode,
    frame_table,
)

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
    from apex_zmq.replay import PrioritizedReplay
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
    from apex_zmq.replay import PrioritizedReplay
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
