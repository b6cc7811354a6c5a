"""The actor core on a real ALE game with lives: every emitted transition against a plain reference.

The actor runs as ./run.sh runs it on Atari (two env groups over ale-py's AtariVectorEnv, the acting
copy ``--acting-dtype auto`` picks on this CPU); the test records what the envs actually returned and
rebuilds every n-step transition one env at a time with loops written out here.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict

import numpy as np
import pytest
import torch

from actor.main import ActorCore
from apex_zmq import config as C
from apex_zmq import cpu
from apex_zmq.envs import make_vector_env
from apex_zmq.networks import choose_acting, int8_engine, make_acting_network
from apex_zmq.wire import decompress_frames

GAME = "ALE/Breakout-v5"  # 5 lives; random play loses one every ~25 steps
K, GROUPS, CHUNK, N, GAMMA = 6, 2, 7, 3, 0.99
STEPS = 330  # vector steps per group: several games and many lost lives per env


class Recorder:
    """Wraps a group's stepper: keeps the actions sent and what every env returned."""

    def __init__(self, stepper, first_obs: np.ndarray, first_lives: np.ndarray) -> None:
        self.inner = stepper
        self.obs = [first_obs.copy()]
        self.lives = [np.array(first_lives)]
        self.actions: list[np.ndarray] = []
        self.rewards: list[np.ndarray] = []
        self.term: list[np.ndarray] = []
        self.trunc: list[np.ndarray] = []

    def send(self, actions: np.ndarray) -> None:
        self.actions.append(np.array(actions))
        self.inner.send(actions)

    def recv(self) -> tuple:
        obs, r, term, trunc, info = self.inner.recv()
        self.obs.append(obs.copy())
        self.rewards.append(np.array(r, dtype=np.float64))
        self.term.append(np.array(term))
        self.trunc.append(np.array(trunc))
        self.lives.append(np.array(info["lives"]))
        return obs, r, term, trunc, info


def reference_transitions(rec: Recorder, k: int, steps: int) -> dict[int, dict]:
    """The n-step transitions env ``k`` should have produced from its first ``steps`` steps, by start step."""
    T = len(rec.rewards)
    valid = [True] + [not (rec.term[t][k] or rec.trunc[t][k]) for t in range(T - 1)]
    out = {}
    for t in range(steps):
        if not valid[t]:  # an autoreset step: its action was ignored, it starts nothing
            continue
        ret, disc, boot = 0.0, None, None
        for i in range(N):
            s = t + i
            ret += GAMMA ** i * max(-1.0, min(1.0, rec.rewards[s][k]))
            # (a life lost on the frame-cap step still ends the return: no bootstrap past it)
            lost_life = rec.lives[s + 1][k] < rec.lives[s][k] and not rec.term[s][k]
            if rec.term[s][k] or lost_life:
                disc, boot = 0.0, s + 1
                break
            if rec.trunc[s][k]:
                disc, boot = GAMMA ** (i + 1), s + 1
                break
        else:
            disc, boot = GAMMA ** N, t + N
        out[t] = dict(action=int(rec.actions[t][k]), ret=ret, disc=disc, obs=rec.obs[t][k], next_obs=rec.obs[boot][k])
    return out


def reference_games(rec: Recorder, k: int) -> list[tuple[float, float, int]]:
    """(score, clipped score, length) of every game env ``k`` finished: whole games, lost lives included."""
    games, score, clipped, length = [], 0.0, 0.0, 0
    valid = True
    for t in range(len(rec.rewards)):
        if valid:
            r = rec.rewards[t][k]
            score, clipped, length = score + r, clipped + max(-1.0, min(1.0, r)), length + 1
            if rec.term[t][k] or rec.trunc[t][k]:
                games.append((score, clipped, length))
                score, clipped, length = 0.0, 0.0, 0
        valid = not (rec.term[t][k] or rec.trunc[t][k])
    return games


@pytest.fixture(scope="module")
def actor_run():
    cfg = C.parse(C.ActorConfig, ["--env", GAME, "--run-dir", tempfile.gettempdir(), "--envs-per-actor", str(K),
                                  "--env-groups", str(GROUPS), "--chunk-steps", str(CHUNK), "--n-step", str(N),
                                  "--gamma", str(GAMMA), "--num-actors", "1", "--eps-base", "1.0",
                                  "--acting-dtype", "auto", "--no-frames-once"], "actor")
    # Whole stacks: an index names a (step, env) observation, which the reference check needs; the
    # stack layout is checked against this one below.
    core = ActorCore(cfg)
    recs = []
    for g in core.groups:
        rec = Recorder(g.stepper, g.obs, g.lives)
        g.stepper = rec
        recs.append(rec)
    chunks: list[tuple[int, object]] = []
    try:
        for _ in range(STEPS * GROUPS):
            group = core._next
            c = core.step()
            if c is not None:
                chunks.append((group, c))
    finally:
        core.close()
    return core, recs, chunks


def test_actor_uses_the_acting_copy_auto_picks_here(actor_run) -> None:
    core, _, _ = actor_run
    choice = choose_acting("auto", True, cpu.detect(), int8_engine())
    assert core.acting == choice
    net = core.net
    assert type(core.policy) is type(make_acting_network(net, choice))
    assert 0.0 <= core.agreement <= 1.0


def test_lost_lives_do_not_reset_the_game(actor_run) -> None:
    _, recs, _ = actor_run
    losses = 0
    for rec in recs:
        for t in range(len(rec.rewards) - 1):
            for k in range(len(rec.lives[0])):
                valid = t == 0 or not (rec.term[t - 1][k] or rec.trunc[t - 1][k])
                if valid and rec.lives[t + 1][k] < rec.lives[t][k] and not rec.term[t][k]:
                    losses += 1
                    # The game goes on: no end flag, and the next step keeps the lower count.
                    assert not rec.trunc[t][k]
                    assert rec.lives[t + 2][k] <= rec.lives[t + 1][k] or rec.term[t + 1][k]
    assert losses >= 10, "random Breakout should lose many lives in this many steps"
    assert any(rec.term[t][k] for rec in recs for t in range(len(rec.term)) for k in range(len(rec.lives[0]))), \
        "some game should have ended (all lives lost)"


def test_every_emitted_transition_matches_the_reference(actor_run) -> None:
    core, recs, chunks = actor_run
    emitted: dict[tuple[int, int], list[dict]] = defaultdict(list)  # (slot, start step) -> transitions
    per_group_chunks = [0] * GROUPS
    for g, c in chunks:
        kg = len(core.groups[g].eps)
        frames = decompress_frames(c.frame_data, c.frame_offsets, c.obs_shape, c.obs_dtype)
        base = per_group_chunks[g] * CHUNK
        per_group_chunks[g] += 1
        for j in range(len(c.action)):
            row, k = divmod(int(c.obs_idx[j]), kg)
            assert int(c.next_idx[j]) % kg == k  # bootstraps from its own env
            emitted[(core.groups[g].first + k, base + row)].append(
                dict(action=int(c.action[j]), ret=float(c.ret[j]), disc=float(c.disc[j]),
                     obs=frames[c.obs_idx[j]], next_obs=frames[c.next_idx[j]], priority=float(c.priority[j])))
    assert min(per_group_chunks) >= 40
    checked = 0
    zero_disc_at_lost_life = 0
    for g, grp in enumerate(core.groups):
        rows = per_group_chunks[g] * CHUNK  # steps whose transitions have been emitted
        for k in range(len(grp.eps)):
            ref = reference_transitions(recs[g], k, rows)
            got = {t: v for (slot, t), v in emitted.items() if slot == grp.first + k}
            # None lost, none doubled, none from an autoreset step.
            assert sorted(got) == sorted(ref), f"slot {grp.first + k}: starts differ"
            for t, want in ref.items():
                (have,) = got[t]
                assert have["action"] == want["action"], (k, t)
                assert have["ret"] == pytest.approx(want["ret"], abs=1e-5), (k, t)
                assert have["disc"] == pytest.approx(want["disc"], abs=1e-6), (k, t)
                np.testing.assert_array_equal(have["obs"], want["obs"])
                np.testing.assert_array_equal(have["next_obs"], want["next_obs"])
                assert np.isfinite(have["priority"]) and have["priority"] >= 0
                checked += 1
                if want["disc"] == 0.0 and not any(recs[g].term[s][k] for s in range(t, min(t + N, rows + N))):
                    zero_disc_at_lost_life += 1
    assert checked > 1000
    assert zero_disc_at_lost_life > 0  # the lost-life case was exercised, not just game overs


def test_episodes_are_whole_games_with_unclipped_scores(actor_run) -> None:
    core, recs, _ = actor_run
    for g, grp in enumerate(core.groups):
        for k in range(len(grp.eps)):
            slot = grp.first + k
            got = [(e["return"], e["clipped_return"], e["length"]) for e in core.episodes if e["slot"] == slot]
            assert got == reference_games(recs[g], k), f"slot {slot}"
    assert core.episodes, "some games should have ended"
    # Breakout's upper bricks are worth 4 and 7: a whole game's score can exceed its clipped sum.
    assert all(e["return"] >= e["clipped_return"] for e in core.episodes)


def test_ale_next_step_autoreset_which_the_nstep_code_relies_on() -> None:
    """After a game ends, ale-py's next step ignores its action and returns a new game's first
    observation with reward 0 and no end flag (gymnasium's NEXT_STEP autoreset)."""
    env = make_vector_env(GAME, 1, seed=11, num_threads=1)
    rng = np.random.default_rng(11)
    try:
        for _ in range(5000):
            obs, r, term, trunc, info = env.step(rng.integers(0, 4, 1))
            if term[0]:
                break
        else:
            pytest.fail("no game over in 5000 random Breakout steps")
        assert info["lives"][0] == 0
        end_frame = int(info["episode_frame_number"][0])
        obs2, r2, term2, trunc2, info2 = env.step(np.array([3]))
        assert (r2[0], bool(term2[0]), bool(trunc2[0])) == (0.0, False, False)
        assert info2["lives"][0] == 5
        assert int(info2["episode_frame_number"][0]) < end_frame  # a fresh game (no-op and fire starts)
        assert not np.array_equal(obs2, obs)
        # The new game's first stack: the frames before its first step are the reset frame repeated.
        torch.testing.assert_close(torch.as_tensor(obs2[0, 0]), torch.as_tensor(obs2[0, 1]))
    finally:
        env.close()


def run_chunks(frames_once: bool, steps: int) -> list:
    cfg = C.parse(C.ActorConfig, ["--env", GAME, "--run-dir", tempfile.gettempdir(), "--envs-per-actor", str(K),
                                  "--env-groups", str(GROUPS), "--chunk-steps", str(CHUNK), "--n-step", str(N),
                                  "--gamma", str(GAMMA), "--num-actors", "1", "--eps-base", "1.0",
                                  "--acting-dtype", "float32", "--seed", "11",
                                  "--frames-once" if frames_once else "--no-frames-once"], "actor")
    core = ActorCore(cfg)
    try:
        return [c for c in (core.step() for _ in range(steps * GROUPS)) if c is not None]
    finally:
        core.close()


def test_frames_once_chunks_are_the_whole_stack_chunks() -> None:
    """On real ALE games (resets included), the stack layout's chunks rebuild exactly the observations
    of the whole-stack chunks, with fewer blobs; random play is the same in both runs."""
    new, old = run_chunks(True, 120), run_chunks(False, 120)
    assert len(new) == len(old) >= 2 * (120 // CHUNK) - 2
    resets = 0
    for a, b in zip(new, old):
        assert a.obs_idx.shape == (len(b.action), 4) and b.obs_idx.ndim == 1
        for k in ("action", "ret", "disc"):
            np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
        fa = decompress_frames(a.frame_data, a.frame_offsets, a.obs_shape[1:], a.obs_dtype)
        fb = decompress_frames(b.frame_data, b.frame_offsets, b.obs_shape, b.obs_dtype)
        np.testing.assert_array_equal(fa[a.obs_idx], fb[b.obs_idx])
        np.testing.assert_array_equal(fa[a.next_idx], fb[b.next_idx])
        assert len(fa) < 2 * len(fb)  # frames, not stacks: about one new frame per observation
        resets += int(np.sum(b.disc == 0))
    assert resets > 0
