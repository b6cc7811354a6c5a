"""Bring your own environment: ``--env-module`` registers gymnasium envs in every role, any env with
a Discrete action space and a 1-D Box or uint8 image observation trains, every other space is refused
before anything starts (in ./run.sh and in each role), with what is supported and what the env has.

The envs live in ``tests/custom_envs.py`` (``--env-module tests.custom_envs`` from the repository
root, where ./run.sh and the roles run).
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, free_port_base

from apex_zmq import checkpoint
from apex_zmq import config as C
from apex_zmq import envs
from apex_zmq.launch import role_module
from apex_zmq.models import build_network
from apex_zmq.networks import NATURE_CONVS, SMALL_CONVS, TINY_CONVS, conv_layers_for

MODULE = "tests.custom_envs"
custom = pytest.importorskip(MODULE)

# CartPole's settings, given as flags (envs without a preset of their own get the classic one; the
# tests that use these do not depend on it).
SMALL_RUN = ["--hidden", "64", "--envs-per-actor", "8", "--chunk-steps", "8", "--capacity", "50000",
             "--batch-size", "128", "--min-size", "500", "--lr", "0.001", "--target-update", "250",
             "--weights-period", "0.25", "--checkpoint-period", "10", "--eval-period", "1",
             "--eval-episodes", "10", "--eval-epsilon", "0", "--report-period", "2", "--prefetch", "8",
             "--loader-threads", "1", "--device", "cpu", "--num-actors", "1", "--dashboard-port", "0"]


def launcher(*flags: str) -> list[str]:
    """What ./run.sh runs (it only adds the venv check), with these flags."""
    return [sys.executable, "-m", "apex_zmq.launch", *flags]


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- the space check


@pytest.mark.parametrize("env_id", sorted(custom.UNSUPPORTED))
def test_unsupported_spaces_are_refused_saying_what_is_supported_and_what_the_env_has(env_id: str) -> None:
    obs_space, action_space, why = custom.UNSUPPORTED[env_id]
    assert envs.space_problem(obs_space, action_space) is not None
    with pytest.raises(envs.UnsupportedEnv) as e:
        envs.check_spaces(env_id, obs_space, action_space)
    msg = str(e.value)
    assert why in msg
    assert envs.SUPPORTED_SPACES in msg
    assert f"{env_id} has observation space {obs_space} and action space {action_space}" in msg
    # Every path that makes the env refuses it too (the roles' env_spec and vector envs).
    with pytest.raises(envs.UnsupportedEnv, match="not supported"):
        envs.check_env(env_id)
    with pytest.raises(envs.UnsupportedEnv, match="not supported"):
        envs.env_spec(env_id)


def test_supported_spaces_pass_the_check() -> None:
    from gymnasium import spaces
    for obs in (spaces.Box(-1, 1, (1,), np.float32), spaces.Box(-1, 1, (300,), np.float64),
                spaces.Box(0, 10, (5,), np.int64), spaces.Box(0, 255, (4, 84, 84), np.uint8),
                spaces.Box(0, 255, (96, 96, 3), np.uint8), spaces.Box(0, 255, (5, 5, 1), np.uint8)):
        assert envs.space_problem(obs, spaces.Discrete(4)) is None, obs
        assert envs.space_problem(obs, spaces.Discrete(2, start=3)) is None, obs


def test_image_layout_takes_the_shorter_end_as_channels() -> None:
    assert envs.image_layout((4, 84, 84)) == "CHW"
    assert envs.image_layout((96, 96, 3)) == "HWC"
    assert envs.image_layout((6, 11, 2)) == "HWC"
    assert envs.image_layout((5, 5, 5)) == "CHW"


def test_the_cnn_fits_any_supported_image_size() -> None:
    assert conv_layers_for((4, 84, 84)) == NATURE_CONVS  # Atari keeps the Nature CNN (and its checkpoints)
    assert conv_layers_for((3, 36, 40)) == NATURE_CONVS
    assert conv_layers_for((3, 35, 96)) == SMALL_CONVS
    assert conv_layers_for((3, 16, 20)) == SMALL_CONVS
    assert conv_layers_for((4, 10, 10)) == TINY_CONVS  # MinAtar: Young & Tian's one 3x3 layer
    for shape in ((1, envs.MIN_IMAGE_SIDE, envs.MIN_IMAGE_SIDE), (3, 35, 35), (3, 36, 36), (3, 96, 96), (2, 6, 11)):
        net = build_network(envs.EnvSpec("x", shape, "uint8", 3, False), hidden=16)
        assert net(torch.zeros(2, *shape, dtype=torch.uint8)).shape == (2, 3), shape


# --------------------------------------------------------------------------- adapted envs


@pytest.mark.parametrize("env_id", ["CustomImageCorridor-v0", "CustomImageCorridorCHW-v0"])
def test_image_envs_reach_the_cnn_channel_first(env_id: str) -> None:
    spec = envs.env_spec(env_id)
    assert (spec.obs_shape, spec.obs_dtype, spec.num_actions, spec.atari) == ((2, 6, 11), "uint8", 2, False)
    env = envs.make_vector_env(env_id, 3, seed=1)
    try:
        obs, _ = env.reset(seed=1)
        assert obs.shape == (3, 2, 6, 11) and obs.dtype == np.uint8
        # The walker (channel 0) starts in the middle column; the flagged end is lit in channel 1.
        assert (obs[:, 0, :, custom.LENGTH // 2] == 255).all() and obs[:, 0].sum() == 3 * 6 * 255
        q = build_network(spec, 16)(torch.as_tensor(obs))
        assert q.shape == (3, 2)
        obs, *_ = env.step(np.array([1, 1, 1]))  # "right", mirrored on the odd middle cell: one cell left
        assert (obs[:, 0, :, custom.LENGTH // 2 - 1] == 255).all()
    finally:
        env.close()


def test_float64_observations_and_actions_from_one_are_adapted() -> None:
    spec = envs.env_spec("CustomOffsetCorridor-v0")
    assert (spec.obs_shape, spec.obs_dtype, spec.num_actions) == ((custom.LENGTH + 1,), "float32", 2)
    env = envs.make_vector_env("CustomOffsetCorridor-v0", 2, seed=0)
    try:
        obs, _ = env.reset(seed=0)
        assert obs.dtype == np.float32
        # Network action 0 is the env's action 1, which the corridor takes for 0 ("left", mirrored on the
        # odd middle cell: one cell right).
        obs, *_ = env.step(np.array([0, 0]))
        assert obs[:, custom.LENGTH // 2 + 1].tolist() == [1.0, 1.0]
    finally:
        env.close()


# --------------------------------------------------------------------------- --env-module in the config


def test_env_module_is_a_shared_flag_saved_with_the_run(tmp_path: Path) -> None:
    assert "env_module" in {f.name for f in C.dataclasses.fields(C.Common)}
    cfg = C.parse(C.LaunchConfig, ["--env", "CustomCorridor-v0", "--env-module", MODULE,
                                   "--run-dir", str(tmp_path)], "run")
    assert cfg.env_module == MODULE
    # ./run.sh hands every role the saved run config: each role's own parse reads the module from it.
    path = C.save(cfg, str(tmp_path), "config")
    for role, cls in C.ROLE_CONFIGS.items():
        assert C.parse(cls, ["--config", str(path)], role).env_module == MODULE


def test_env_module_from_a_config_file(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text(f'env = "CustomCorridor-v0"\nenv_module = "{MODULE}"\n')
    assert C.parse(C.LearnerConfig, ["--config", str(f)], "learner").env_module == MODULE


def test_a_module_that_cannot_be_imported_is_a_configuration_error(capsys) -> None:
    with pytest.raises(C.ConfigError) as e:
        C.parse(C.ActorConfig, ["--env", "CustomCorridor-v0", "--env-module", "no_such_envs_pkg"], "actor")
    assert e.value.code == C.CONFIG_ERROR_EXIT
    assert str(e.value).startswith("--env-module no_such_envs_pkg: no module named 'no_such_envs_pkg'")
    assert "--env-module no_such_envs_pkg" in capsys.readouterr().err  # what the program prints


def test_a_module_that_fails_on_import_says_where(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "broken_envs_mod.py").write_text("import gymnasium\nraise RuntimeError('no simulator here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(C.ConfigError) as e:
        C.import_env_modules("broken_envs_mod")
    assert "--env-module broken_envs_mod: importing it failed: RuntimeError: no simulator here" in str(e.value)
    assert "broken_envs_mod.py:2" in str(e.value)


def test_an_unregistered_env_points_at_env_module() -> None:
    with pytest.raises(C.ConfigError, match="pass --env-module"):
        C.parse(C.ReplayConfig, ["--env", "NotRegisteredAnywhere-v0"], "replay_server")


# --------------------------------------------------------------------------- ./run.sh and the roles


def test_launcher_refuses_an_unsupported_env_before_starting_any_role(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    for env_id, (_, _, why) in custom.UNSUPPORTED.items():
        t0 = time.monotonic()
        out = subprocess.run(launcher("--env", env_id, "--env-module", MODULE, "--run-dir", str(run_dir),
                                      "--port-base", str(free_port_base()), "--max-seconds", "60"),
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == C.CONFIG_ERROR_EXIT, out.stdout + out.stderr
        assert f"./run.sh: --env {env_id} is not supported: " in out.stderr and why in out.stderr
        assert "Supported: a Discrete action space" in out.stderr
        assert not run_dir.exists()  # nothing started: no run directory, no logs, no roles
        assert "run.sh: role logs" not in out.stdout
        assert time.monotonic() - t0 < 60


def test_launcher_names_a_bad_env_module(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = subprocess.run(launcher("--env", "CustomCorridor-v0", "--env-module", "tests.no_such_envs",
                                  "--run-dir", str(run_dir), "--port-base", str(free_port_base())),
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == C.CONFIG_ERROR_EXIT, out.stdout + out.stderr
    assert "./run.sh: --env-module tests.no_such_envs: no module named 'tests.no_such_envs'" in out.stderr
    assert not run_dir.exists()


def test_each_role_refuses_an_unsupported_env_at_start(tmp_path: Path) -> None:
    procs = {}
    for role in C.ROLE_CONFIGS:  # side by side: most of each one's time is importing torch
        extra = ["--actor-index", "0", "--num-actors", "1"] if role == "actor" else []
        procs[role] = subprocess.Popen([sys.executable, "-m", role_module(role), "--env", "CustomBoxAction-v0",
                                        "--env-module", MODULE, "--run-dir", str(tmp_path / "run"), *extra],
                                       cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       stdin=subprocess.DEVNULL, text=True)
    for role, p in procs.items():
        stdout, stderr = p.communicate(timeout=180)
        assert p.returncode == C.CONFIG_ERROR_EXIT, f"{role}: {stdout}{stderr}"
        assert "--env CustomBoxAction-v0 is not supported: its action space is Box, not Discrete" in stderr, role
        assert "Traceback" not in stderr, f"{role}: {stderr}"


def test_corridor_trains_through_run_sh_to_its_solved_return(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # ./run.sh itself, with the classic preset an env without its own gets (no tuning flags).
    out = subprocess.run([str(ROOT / "run.sh"), "--env", "CustomCorridor-v0", "--env-module", MODULE,
                          "--run-dir", str(run_dir), "--port-base", str(free_port_base()), "--max-seconds", "300",
                          "--stop-at-return", str(custom.SOLVED_RETURN - 0.05), "--num-actors", "1",
                          "--dashboard-port", "0", "--device", "cpu"],
                         cwd=ROOT, capture_output=True, text=True, timeout=420)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((run_dir / "logs").glob("*.log")))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:] + logs
    assert "run.sh: stopped (finished)" in out.stdout, out.stdout[-3000:] + logs
    finished = json.loads((run_dir / "finished.json").read_text())
    assert finished["mean"] >= custom.SOLVED_RETURN - 0.05
    evals = read_csv(run_dir / "eval.csv")
    best = max(evals, key=lambda r: float(r["mean"]))
    assert int(best["learner_steps"]) > 0  # learnt: not the untrained network's luck
    for name in ("config_actor_0", "config_replay_server", "config_learner", "config_evaluator"):
        saved = json.loads((run_dir / f"{name}.json").read_text())
        assert (saved["env"], saved["env_module"]) == ("CustomCorridor-v0", MODULE)
    # play makes the custom env from the module the checkpoint names (no --env-module needed).
    played = subprocess.run([sys.executable, "-m", "apex_zmq.cli", "play", str(run_dir), "--episodes", "3"],
                            cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert played.returncode == 0, played.stdout[-2000:] + played.stderr[-2000:]
    assert "CustomCorridor-v0" in played.stdout


def test_image_env_smoke_run_through_the_launcher(tmp_path: Path) -> None:
    """A custom [H, W, C] image env through every role: the CNN trains on channel-first frames."""
    run_dir = tmp_path / "run"
    flags = [*SMALL_RUN, "--min-size", "64", "--batch-size", "32", "--capacity", "2000"]
    proc = subprocess.Popen(launcher("--env", "CustomImageCorridor-v0", "--env-module", MODULE,
                                     "--run-dir", str(run_dir), "--port-base", str(free_port_base()),
                                     "--max-seconds", "240", *flags),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        trained = []
        while time.monotonic() < deadline and proc.poll() is None and not trained:
            time.sleep(1.0)
            trained = [r for r in read_csv(run_dir / "eval.csv") if int(r["learner_steps"]) > 0]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0].decode(errors="replace")
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((run_dir / "logs").glob("*.log")))
    assert trained, output[-3000:] + logs
    assert proc.returncode == 0, output[-3000:] + logs
    assert "exited with code" not in output, output[-3000:] + logs  # no role crashed on the frames
    state = checkpoint.load(checkpoint.last_path(run_dir))
    assert tuple(state["net"]["torso.net.0.weight"].shape) == (16, 2, 3, 3)  # TINY_CONVS over 2 channels


def test_relay_ignores_env_module() -> None:
    cfg = C.parse(C.RelayConfig, ["--env-module", "no_such_envs_pkg"], "relay")  # makes no env
    assert cfg.env_module == "no_such_envs_pkg"
