"""MinAtar as an env family: the ten ids play as ``minatar``'s own ``Environment`` does (same frames,
rewards and ends for the same seed and actions, sticky actions and difficulty ramping on), frames reach
the network as 0/1 (not divided by 255), the family's preset, and every game through all roles briefly
for a replay rule (dqn) and an asynchronous one (a3c): frames on the wire, the learner's steps and an
evaluation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_algos_e2e import _launch, _metric_max, _role_logs, _rows
from test_async_e2e import _stop, _wait

from apex_zmq import checkpoint
from apex_zmq import config as C
from apex_zmq.envs import env_spec, make_env, make_vector_env
from apex_zmq.minatar_envs import GAMES, MinAtarEnv
from apex_zmq.models import build_network

minatar = pytest.importorskip("minatar")

CHANNELS = {"Asterix": 4, "Breakout": 4, "Freeway": 7, "Seaquest": 10, "SpaceInvaders": 6}
MINIMAL = {"Asterix": 5, "Breakout": 3, "Freeway": 3, "Seaquest": 6, "SpaceInvaders": 4}


@pytest.mark.parametrize("game", sorted(GAMES))
def test_ids_and_spaces(game: str) -> None:
    for version, actions in (("v0", 6), ("v1", MINIMAL[game])):
        spec = env_spec(f"MinAtar/{game}-{version}")
        assert spec.obs_shape == (CHANNELS[game], 10, 10) and spec.obs_dtype == "uint8"
        assert spec.num_actions == actions and spec.pixel_max == 1 and not spec.atari


@pytest.mark.parametrize("game", sorted(GAMES))
def test_plays_as_minatar_environment(game: str) -> None:
    """Same seed, same actions: the same frames (channel-first), rewards and game ends as minatar's own
    ``Environment`` with its defaults (sticky actions 0.1, difficulty ramping), over several games."""
    ours = make_env(f"MinAtar/{game}-v0")
    assert ours.unwrapped.sticky_action_prob == 0.1
    ref = minatar.Environment(GAMES[game])
    assert ref.sticky_action_prob == 0.1 and getattr(ref.env, "ramping", True)  # Breakout, Freeway: no ramp
    assert getattr(ours.unwrapped.game, "ramping", True)
    rng = np.random.default_rng(1)
    obs, _ = ours.reset(seed=7)
    ref.seed(7)
    ref.reset()
    ends = 0
    for _ in range(3000):
        assert np.array_equal(obs, ref.state().transpose(2, 0, 1).astype(np.uint8))
        a = int(rng.integers(6))
        obs, r, term, trunc, _ = ours.step(a)
        r_ref, done_ref = ref.act(a)
        assert (r, term, trunc) == (float(r_ref), bool(done_ref), False)
        if term:
            ends += 1
            obs, _ = ours.reset()
            ref.reset()
    assert ends >= 1 or game == "Freeway"  # a random Freeway game lasts its 2,500 frames


def test_minimal_action_set_and_flags() -> None:
    assert not MinAtarEnv("asterix", difficulty_ramping=False).game.ramping
    env = MinAtarEnv("breakout", minimal_actions=True, sticky_action_prob=0.0)
    assert env.action_set == [0, 1, 3] and env.sticky_action_prob == 0.0
    env.reset(seed=0)
    before = np.flatnonzero(env._obs()[0].max(axis=0))[0]  # the paddle's column
    env.step(1)  # minimal action 1 = MinAtar's 'l'
    after = np.flatnonzero(env._obs()[0].max(axis=0))[0]
    assert after == max(0, before - 1)


def test_frames_enter_the_network_as_0_1() -> None:
    """A 0/1 frame divided by 255 would starve the network: the first convolution sees the 0/1 values."""
    spec = env_spec("MinAtar/Breakout-v0")
    net = build_network(spec, 128)
    seen = []
    conv = net.torso.net[0]
    assert tuple(conv.weight.shape) == (16, 4, 3, 3)  # Young & Tian's one 3x3 layer of 16
    conv.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    env = make_vector_env("MinAtar/Breakout-v0", 2, seed=0)
    obs, _ = env.reset(seed=0)
    net(torch.as_tensor(obs))
    assert obs.max() == 1 and torch.equal(seen[0], torch.as_tensor(obs).float())


def test_family_preset() -> None:
    p = C.preset_for("MinAtar/SpaceInvaders-v0")
    assert (p["eval_episodes"], p["eval_epsilon"], p["capacity"], p["min_size"]) == (30, 0.01, 100_000, 5_000)
    assert p["samples_per_insert"] > 0 and p["spi_block_inserts"]
    assert C.preset_for("MinAtar/Breakout-v1", "rainbow")["v_max"] == 100.0
    assert C.preset_for("MinAtar/Breakout-v0", "a3c")["eps_anneal_frames"] == 100_000
    cfg = C.parse(C.LearnerConfig, ["--env", "MinAtar/Asterix-v0"], "learner")
    assert cfg.hidden == 128 and cfg.lr == 2.5e-4 and cfg.target_update == 250


# Tiny settings: a few learner steps of each rule, one short evaluation.
TINY = ["--min-size", "200", "--batch-size", "16", "--eval-episodes", "2", "--eval-period", "3",
        "--num-actors", "1", "--max-seconds", "240"]


def _through_all_roles(tmp_path, game: str, algo: str) -> None:
    """A brief run of ``algo`` on ``game`` under the launcher: 20 learner steps, frames through the replay
    (replay rules), an evaluation of trained weights, no traceback, no rejected message, a checkpoint of
    Young & Tian's first layer over the game's channels."""
    env_id = f"MinAtar/{game}-v0"
    run_dir, log = tmp_path / f"{game}-{algo}", tmp_path / f"{game}-{algo}.log"
    proc = _launch(run_dir, log, "--env", env_id, "--algo", algo, *TINY)
    replay = not C.is_async(C.LearnerConfig(algo=algo))

    def turned_over() -> bool:
        evals = [r for r in _rows(run_dir / "eval.csv") if int(r["learner_steps"]) > 0]
        wire = not replay or _metric_max(run_dir, "replay/sampled") > 0  # the replay's telemetry too
        return _metric_max(run_dir, "learner/steps") >= 20 and bool(evals) and wire

    try:
        _wait(proc, run_dir, log, f"{env_id} {algo}: 20 learner steps and an evaluation", turned_over, 150)
    finally:
        code = _stop(proc)
    out = log.read_text(errors="replace")
    assert code == 0, out[-3000:]
    for path in (run_dir / "logs").glob("*.log"):
        assert "Traceback" not in path.read_text(errors="replace"), _role_logs(run_dir)
    if replay:  # frames crossed the wire into the replay and back out to the learner
        assert _metric_max(run_dir, "replay/inserted") > 0 and _metric_max(run_dir, "replay/sampled") > 0
    for tag in ("learner/rejected", "actor/rejected", "replay/rejected"):
        assert _metric_max(run_dir, tag) <= 0, f"{env_id} {algo} {tag}"
    state = checkpoint.load(checkpoint.last_path(run_dir))
    assert state["env"] == env_id and state["algo"] == algo
    first_conv = next(k for k in state["net"] if k.endswith("net.0.weight"))
    assert tuple(state["net"][first_conv].shape)[:2] == (16, CHANNELS[game])


@pytest.mark.parametrize("algo", ["dqn", "a3c"])
def test_every_game_through_all_roles(tmp_path, algo: str) -> None:
    for game in sorted(GAMES):
        _through_all_roles(tmp_path, game, algo)


@pytest.mark.parametrize("algo", ["rainbow", "iqn", "nstep_q", "onestep_q", "onestep_sarsa"])
def test_every_other_rule_runs_on_minatar(tmp_path, algo: str) -> None:
    _through_all_roles(tmp_path, "SpaceInvaders", algo)
