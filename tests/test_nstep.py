"""n-step targets and the actor's SegmentBuffer.

Conventions (see actor/nstep.py): step t is taken at observation t and leads to observation
t+1. Under next-step autoreset, the step that ends an episode (terminated or truncated) returns
the *final* observation t+1; the following step is a reset step with reward 0 that is marked
``valid=False`` and starts no transition. All expected numbers below are worked out by hand with
gamma = 0.5 so they are exact in float32.
"""

from __future__ import annotations

import numpy as np
import pytest

from actor.nstep import SegmentBuffer, initial_priorities, nstep_targets

F, T_ = False, True


def col(*xs, dtype=None):
    """A [T, 1] column."""
    return np.array(xs, dtype=dtype).reshape(-1, 1)


def check(tg, exp_done, exp):
    """exp: {(t, k): (ret, disc, boot)} for every valid complete step."""
    np.testing.assert_array_equal(tg.done, np.array(exp_done, dtype=bool).reshape(tg.done.shape))
    assert tg.ret.dtype == np.float32 and tg.disc.dtype == np.float32
    assert tg.boot.dtype == np.int64 and tg.done.dtype == bool
    for (t, k), (ret, disc, boot) in exp.items():
        assert tg.done[t, k], (t, k)
        assert tg.ret[t, k] == ret, (t, k, tg.ret[t, k], ret)
        assert tg.disc[t, k] == disc, (t, k, tg.disc[t, k], disc)
        assert tg.boot[t, k] == boot, (t, k, tg.boot[t, k], boot)


# ----------------------------------------------------------------- nstep_targets, hand-worked


def test_no_episode_end_n3():
    r = col(1, 2, 4, 8, 16, dtype=np.float32)
    z = np.zeros_like(r, dtype=bool)
    tg = nstep_targets(r, z, z, ~z, gamma=0.5, n=3)
    check(tg, [T_, T_, T_, F, F], {
        (0, 0): (1 + 0.5 * 2 + 0.25 * 4, 0.125, 3),   # 3
        (1, 0): (2 + 0.5 * 4 + 0.25 * 8, 0.125, 4),   # 6
        (2, 0): (4 + 0.5 * 8 + 0.25 * 16, 0.125, 5),  # 12: t = T - n is still complete
    })
    assert tg.ret[0, 0] == 3.0 and tg.ret[1, 0] == 6.0 and tg.ret[2, 0] == 12.0


def test_termination_in_the_middle_n3():
    # steps: 0 1 2(term) 3(reset, invalid) 4 5 6 ; the reset step's reward must never be used
    r = col(1, 2, 4, 1000, 8, 16, 32, dtype=np.float32)
    term = col(F, F, T_, F, F, F, F)
    trunc = col(F, F, F, F, F, F, F)
    valid = col(T_, T_, T_, F, T_, T_, T_)
    tg = nstep_targets(r, term, trunc, valid, gamma=0.5, n=3)
    check(tg, [T_, T_, T_, T_, T_, F, F], {
        (0, 0): (3.0, 0.0, 3),   # 1 + 1 + 1, terminates at its 3rd step: discount 0
        (1, 0): (4.0, 0.0, 3),   # 2 + 0.5*4, cut at the termination
        (2, 0): (4.0, 0.0, 3),   # terminal step itself
        (4, 0): (24.0, 0.125, 7),  # next episode: 8 + 8 + 8
    })
    # the invalid reset step is "done" (nothing to wait for) but carries no target
    assert tg.ret[3, 0] == 0.0 and tg.disc[3, 0] == 0.0


def test_truncation_bootstraps_from_final_obs_n3():
    r = col(1, 2, 4, 0, 8, 16, 32, dtype=np.float32)
    term = col(F, F, F, F, F, F, F)
    trunc = col(F, F, T_, F, F, F, F)
    valid = col(T_, T_, T_, F, T_, T_, T_)
    tg = nstep_targets(r, term, trunc, valid, gamma=0.5, n=3)
    # obs 3 is the final observation returned by the truncating step 2
    check(tg, [T_, T_, T_, T_, T_, F, F], {
        (0, 0): (3.0, 0.125, 3),  # 3 steps to the end: gamma^3
        (1, 0): (4.0, 0.25, 3),   # 2 steps: gamma^2
        (2, 0): (4.0, 0.5, 3),    # 1 step: gamma
        (4, 0): (24.0, 0.125, 7),
    })


def test_terminated_and_truncated_together_is_a_termination():
    r = col(1, 2, 0, 4, dtype=np.float32)
    term = col(F, T_, F, F)
    trunc = col(F, T_, F, F)
    valid = col(T_, T_, F, T_)
    tg = nstep_targets(r, term, trunc, valid, gamma=0.5, n=3)
    check(tg, [T_, T_, T_, F], {(0, 0): (2.0, 0.0, 2), (1, 0): (2.0, 0.0, 2)})


def test_end_at_last_step_completes_the_tail_early():
    # T=4, n=3: only t <= T-n = 1 would be complete, but the episode ends at step 3,
    # so steps 2 and 3 are complete too (their window is cut by the end). No lost tail.
    r = col(1, 2, 4, 8, dtype=np.float32)
    z = col(F, F, F, F)
    term = col(F, F, F, T_)
    tg = nstep_targets(r, term, z, ~z, gamma=0.5, n=3)
    check(tg, [T_, T_, T_, T_], {
        (0, 0): (3.0, 0.125, 3),  # 1 + 1 + 1, the end is 4 steps away: full bootstrap
        (1, 0): (6.0, 0.0, 4),    # 2 + 2 + 2, terminates at its 3rd step
        (2, 0): (8.0, 0.0, 4),    # 4 + 4
        (3, 0): (8.0, 0.0, 4),
    })


def test_truncation_at_last_step():
    r = col(1, 2, 4, 8, dtype=np.float32)
    z = col(F, F, F, F)
    trunc = col(F, F, F, T_)
    tg = nstep_targets(r, z, trunc, ~z, gamma=0.5, n=3)
    check(tg, [T_, T_, T_, T_], {
        (0, 0): (3.0, 0.125, 3),
        (1, 0): (6.0, 0.125, 4),
        (2, 0): (8.0, 0.25, 4),
        (3, 0): (8.0, 0.5, 4),
    })


def test_end_just_beyond_window_is_not_used():
    # t=0's window is steps 0..2; the termination at step 3 must not affect it.
    r = col(1, 2, 4, 8, 0, 16, dtype=np.float32)
    z = col(F, F, F, F, F, F)
    term = col(F, F, F, T_, F, F)
    valid = col(T_, T_, T_, T_, F, T_)
    tg = nstep_targets(r, term, z, valid, gamma=0.5, n=3)
    check(tg, [T_, T_, T_, T_, T_, F], {
        (0, 0): (3.0, 0.125, 3),
        (1, 0): (6.0, 0.0, 4),
        (2, 0): (8.0, 0.0, 4),
        (3, 0): (8.0, 0.0, 4),
    })


def test_one_step_episodes_back_to_back():
    # episodes of length 1: step 0 term, 1 reset, 2 term, 3 reset, 4 normal, 5 normal
    r = col(5, 0, 7, 0, 1, 2, dtype=np.float32)
    z = col(F, F, F, F, F, F)
    term = col(T_, F, T_, F, F, F)
    valid = col(T_, F, T_, F, T_, T_)
    tg = nstep_targets(r, term, z, valid, gamma=0.5, n=2)
    check(tg, [T_, T_, T_, T_, T_, F], {
        (0, 0): (5.0, 0.0, 1),
        (2, 0): (7.0, 0.0, 3),
        (4, 0): (2.0, 0.25, 6),  # 1 + 0.5*2
    })


def test_n1_is_one_step_td():
    r = col(3, 5, 0, 9, dtype=np.float32)
    z = col(F, F, F, F)
    term = col(F, T_, F, F)
    valid = col(T_, T_, F, T_)
    tg = nstep_targets(r, term, z, valid, gamma=0.5, n=1)
    check(tg, [T_, T_, T_, T_], {
        (0, 0): (3.0, 0.5, 1), (1, 0): (5.0, 0.0, 2), (3, 0): (9.0, 0.5, 4)})


def test_two_envs_with_different_ends_n2():
    # env 0: terminates at step 1, step 2 is its reset step.
    # env 1: truncated at step 3, step 4 is its reset step.
    r = np.array([[1, 2], [2, 4], [0, 6], [4, 8], [8, 0]], dtype=np.float32)
    term = np.array([[F, F], [T_, F], [F, F], [F, F], [F, F]])
    trunc = np.array([[F, F], [F, F], [F, F], [F, T_], [F, F]])
    valid = np.array([[T_, T_], [T_, T_], [F, T_], [T_, T_], [T_, F]])
    tg = nstep_targets(r, term, trunc, valid, gamma=0.5, n=2)
    check(tg, [[T_, T_], [T_, T_], [T_, T_], [T_, T_], [F, T_]], {
        (0, 0): (2.0, 0.0, 2),    # 1 + 0.5*2, terminated
        (1, 0): (2.0, 0.0, 2),
        (3, 0): (8.0, 0.25, 5),   # 4 + 0.5*8, full bootstrap from obs 5
        (0, 1): (4.0, 0.25, 2),   # 2 + 0.5*4
        (1, 1): (7.0, 0.25, 3),   # 4 + 0.5*6
        (2, 1): (10.0, 0.25, 4),  # 6 + 0.5*8, truncated at its 2nd step: gamma^2 from final obs 4
        (3, 1): (8.0, 0.5, 4),    # truncated at its 1st step
    })


def test_first_step_of_segment_can_be_invalid():
    # A segment that starts with a carried reset step.
    r = col(0, 1, 2, 4, dtype=np.float32)
    z = col(F, F, F, F)
    valid = col(F, T_, T_, T_)
    tg = nstep_targets(r, z, z, valid, gamma=0.5, n=2)
    check(tg, [T_, T_, T_, F], {(1, 0): (2.0, 0.25, 3), (2, 0): (4.0, 0.25, 4)})


def test_initial_priorities_hand_worked():
    # T=2, K=1, A=2, n=1, gamma=0.5
    r = col(1, 3, dtype=np.float32)
    z = col(F, F)
    term = col(F, T_)
    tg = nstep_targets(r, term, z, ~z, gamma=0.5, n=1)
    q = np.array([[[0.0, 10.0]], [[4.0, 2.0]], [[100.0, 100.0]]], dtype=np.float32)  # [T+1, K, A]
    actions = col(0, 1, dtype=np.int64)
    pr = initial_priorities(q, actions, tg, np.array([0, 1]), np.array([0, 0]))
    # t=0: 1 + 0.5 * max(4, 2) - Q(0, a=0)=0 -> 3
    # t=1: 3 + 0 * 100 - Q(1, a=1)=2 -> 1 (terminal: the bootstrap obs is ignored)
    np.testing.assert_array_equal(pr, np.array([3.0, 1.0], dtype=np.float32))
    assert pr.dtype == np.float32
    q[0, 0, 0] = 10.0  # now TD at t=0 is 3 - 10 = -7 -> |TD| = 7
    pr = initial_priorities(q, actions, tg, np.array([0]), np.array([0]))
    np.testing.assert_array_equal(pr, [7.0])


# ----------------------------------------------------------------- SegmentBuffer


def blob(t: int, k: int) -> bytes:
    return f"obs-{t}-{k}".encode()


def parse(b: bytes) -> tuple[int, int]:
    _, t, k = b.decode().split("-")
    return int(t), int(k)


def qvals(t: int, K: int, A: int) -> np.ndarray:
    """Distinct small integer Q values for observation t: q[k, a] = (3t + 2k + a) % 7 - 3."""
    return np.array([[(3 * t + 2 * k + a) % 7 - 3 for a in range(A)] for k in range(K)],
                    dtype=np.float32)


def drive(buf, K, A, rewards, term, trunc, num_obs, action_fn):
    """Feed the buffer like ActorCore.step does; returns the emitted chunks."""
    chunks = []
    valid = np.ones(K, dtype=bool)
    for t in range(num_obs):
        buf.add_obs([blob(t, k) for k in range(K)], qvals(t, K, A))
        if buf.full:
            chunks.append(buf.emit())
        if t == num_obs - 1:
            break
        buf.add_step(np.array([action_fn(t, k) for k in range(K)]), rewards[t], term[t], trunc[t],
                     valid.copy())
        valid = ~(term[t] | trunc[t])
    return chunks


def flatten(chunks):
    """All emitted transitions as {(t, k): (next_t, action, ret, disc, priority)}."""
    seen = {}
    for c in chunks:
        blobs = c["blobs"]
        n = len(c["obs_idx"])
        for name in ("next_idx", "action", "ret", "disc", "priority"):
            assert len(c[name]) == n
        assert c["obs_idx"].dtype == np.int32 and c["next_idx"].dtype == np.int32
        assert c["action"].dtype == np.int32
        for j in range(n):
            t, k = parse(blobs[c["obs_idx"][j]])
            nt, nk = parse(blobs[c["next_idx"][j]])
            assert nk == k, "bootstrap observation from another env"
            assert (t, k) not in seen, f"duplicate transition {(t, k)}"
            seen[(t, k)] = (nt, int(c["action"][j]), float(c["ret"][j]), float(c["disc"][j]),
                            float(c["priority"][j]))
    return seen


def test_segment_buffer_hand_worked():
    # K=2, steps per segment E=2, n=2, gamma=0.5, A=2 -> L = 3 steps, 4 observations per segment.
    K, A = 2, 2
    # env 0: terminates at step 2, step 3 is its reset step (reward 0).
    # env 1: truncated at step 4, step 5 is its reset step.
    rewards = np.array([[1, 2], [2, 4], [4, 6], [0, 8], [16, 10], [32, 0], [64, 14]], dtype=np.float32)
    term = np.zeros((7, 2), dtype=bool)
    trunc = np.zeros((7, 2), dtype=bool)
    term[2, 0] = True
    trunc[4, 1] = True
    buf = SegmentBuffer(num_envs=K, steps=2, n=2, gamma=0.5, num_actions=A)
    assert buf.L == 3

    def action_fn(t, k):
        return (t + k) % A

    chunks = drive(buf, K, A, rewards, term, trunc, num_obs=8, action_fn=action_fn)
    assert len(chunks) == 3  # full at obs 3, 5, 7
    # every chunk's frame table holds the 4 observations of its segment, once each, in (t, k) order
    assert chunks[0]["blobs"] == [blob(t, k) for t in range(0, 4) for k in range(K)]
    assert chunks[1]["blobs"] == [blob(t, k) for t in range(2, 6) for k in range(K)]
    assert chunks[2]["blobs"] == [blob(t, k) for t in range(4, 8) for k in range(K)]
    # which global steps each chunk carries
    assert sorted({parse(chunks[0]["blobs"][i])[0] for i in chunks[0]["obs_idx"]}) == [0, 1]
    assert sorted({parse(chunks[1]["blobs"][i])[0] for i in chunks[1]["obs_idx"]}) == [2, 3]
    assert sorted({parse(chunks[2]["blobs"][i])[0] for i in chunks[2]["obs_idx"]}) == [4, 5]

    expected = {  # (t, k): (boot obs, ret, disc)
        (0, 0): (2, 2.0, 0.25),   # 1 + 0.5*2
        (1, 0): (3, 4.0, 0.0),    # 2 + 0.5*4, terminated at step 2
        (2, 0): (3, 4.0, 0.0),
        (4, 0): (6, 32.0, 0.25),  # 16 + 0.5*32 (step 3 was the reset step: no transition)
        (5, 0): (7, 64.0, 0.25),  # 32 + 0.5*64
        (0, 1): (2, 4.0, 0.25),   # 2 + 0.5*4
        (1, 1): (3, 7.0, 0.25),   # 4 + 0.5*6
        (2, 1): (4, 10.0, 0.25),  # 6 + 0.5*8
        (3, 1): (5, 13.0, 0.25),  # 8 + 0.5*10, truncated at step 4: final obs 5, gamma^2
        (4, 1): (5, 10.0, 0.5),   # truncated at its own step: gamma^1
    }
    seen = flatten(chunks)
    assert set(seen) == set(expected)  # (3, 0) and (5, 1) are reset steps; (6, *) not yet complete
    for key, (boot, ret, disc) in expected.items():
        t, k = key
        nt, action, got_ret, got_disc, prio = seen[key]
        assert (nt, got_ret, got_disc) == (boot, ret, disc), key
        assert action == (t + k) % A
        # |ret + disc * max_a Q(boot) - Q(obs, action)| with the Q values fed for those observations
        td = ret + disc * qvals(boot, K, A)[k].max() - qvals(t, K, A)[k, action]
        assert prio == pytest.approx(abs(td), abs=1e-6), key
    # spot-check one priority fully by hand: (0, 0): q(2)[0] = [(6+0)%7-3, (6+1)%7-3] = [3, -3],
    # q(0)[0, a=0] = 0%7-3 = -3 -> |2 + 0.25*3 - (-3)| = 5.75
    assert seen[(0, 0)][4] == 5.75


@pytest.mark.parametrize("K,E,n,seed", [(3, 5, 3, 0), (2, 1, 1, 1), (4, 3, 5, 2), (1, 7, 2, 3)])
def test_segment_buffer_matches_whole_trajectory(K, E, n, seed):
    """Segmenting with carry-over gives the same transitions as one pass over the whole trajectory,
    and every valid step appears exactly once."""
    rng = np.random.default_rng(seed)
    A, gamma = 3, 0.5
    num_obs = 1 + E * 12 + (n - 1) + (E - 1)  # 12 emits plus the longest partial tail
    steps = num_obs - 1
    rewards = rng.integers(-3, 4, size=(steps, K)).astype(np.float32)
    ends = rng.random((steps, K)) < 0.15
    term = ends & (rng.random((steps, K)) < 0.5)
    trunc = ends & ~term
    valid = np.ones((steps, K), dtype=bool)
    for t in range(1, steps):  # the step after an episode end is a reset step
        valid[t] = ~(term[t - 1] | trunc[t - 1])
        term[t] &= valid[t]  # a reset step neither ends an episode nor earns reward
        trunc[t] &= valid[t]
    rewards[~valid] = 0.0
    assert (~valid).any() and term.any() and trunc.any()

    def action_fn(t, k):
        return (7 * t + k) % A

    buf = SegmentBuffer(K, E, n, gamma, A)
    chunks = drive(buf, K, A, rewards, term, trunc, num_obs, action_fn)
    assert len(chunks) == 12
    seen = flatten(chunks)
    emitted_steps = E * len(chunks)
    want = {(t, k) for t in range(emitted_steps) for k in range(K) if valid[t, k]}
    assert set(seen) == want  # nothing lost, nothing duplicated (flatten checks duplicates)

    tg = nstep_targets(rewards, term, trunc, valid, gamma, n)
    for (t, k), (nt, action, ret, disc, prio) in seen.items():
        assert tg.done[t, k]
        assert nt == tg.boot[t, k] and ret == tg.ret[t, k] and disc == tg.disc[t, k], (t, k)
        assert action == action_fn(t, k)
        assert t < nt <= t + n
        td = ret + disc * qvals(nt, K, A)[k].max() - qvals(t, K, A)[k, action]
        assert prio == pytest.approx(abs(td), abs=1e-5)


def test_segment_buffer_misuse_raises():
    buf = SegmentBuffer(num_envs=1, steps=2, n=2, gamma=0.5, num_actions=2)
    with pytest.raises(RuntimeError):
        buf.add_step(np.array([0]), np.array([0.0]), np.array([F]), np.array([F]), np.array([T_]))
    buf.add_obs([b"a"], np.zeros((1, 2)))
    with pytest.raises(RuntimeError):
        buf.add_obs([b"b"], np.zeros((1, 2)))
    with pytest.raises(RuntimeError):
        buf.emit()
