"""config: precedence (defaults < env preset < --config file < flags), argparse errors that name the
flag and its choices, config-file checks (unknown keys and tables, wrong types), save / reload, and
the cross-field checks of ``validate``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from apex_zmq import config as C
from apex_zmq.config import (
    ActorConfig,
    Common,
    EvaluatorConfig,
    LaunchConfig,
    LearnerConfig,
    ReplayConfig,
)


def write(tmp_path: Path, text: str, name: str = "cfg.toml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def exit_message(excinfo) -> str:
    """The text a SystemExit carries (parse errors from config.py exit with a message; a ``ConfigError``
    exits with code 78 and carries its message as ``str()``)."""
    return str(excinfo.value) if isinstance(excinfo.value, C.ConfigError) else str(excinfo.value.code)


# --------------------------------------------------------------------------- precedence


def test_envs_without_a_preset_of_their_own_get_the_classic_one():
    cfg = C.parse(ReplayConfig, ["--env", "MountainCar-v0"], "replay_server")  # no preset of its own
    assert cfg.capacity == C.PRESETS["classic"]["capacity"] == 50_000 != ReplayConfig.capacity
    assert cfg.batch_size == 128 and cfg.hidden == 64
    assert cfg.alpha == ReplayConfig.alpha == 0.6  # not in the preset: the field default
    assert cfg.run_dir == str(Path("runs") / "MountainCar-v0")


def test_preset_overrides_defaults():
    cfg = C.parse(ReplayConfig, ["--env", "CartPole-v1"], "replay_server")
    assert cfg.capacity == C.PRESETS["CartPole-v1"]["capacity"] == 50_000
    assert cfg.batch_size == 128 and cfg.min_size == 500 and cfg.hidden == 64
    assert cfg.alpha == 0.6  # not in the preset: the field default


def test_atari_ids_share_the_atari_preset():
    cfg = C.parse(LearnerConfig, [], "learner")  # default env is ALE/Pong-v5
    assert cfg.env == Common.env and cfg.env.startswith("ALE/")
    assert cfg.lr == C.PRESETS["atari"]["lr"]
    cfg = C.parse(LearnerConfig, ["--env", "ALE/Breakout-v5"], "learner")
    assert cfg.target_update == C.PRESETS["atari"]["target_update"]
    assert cfg.run_dir == str(Path("runs") / "ALE-Breakout-v5")


def test_config_file_overrides_preset_and_flags_override_file(tmp_path):
    path = write(tmp_path, 'env = "CartPole-v1"\ncapacity = 1000\nbatch_size = 32\nalpha = 0.5\n')
    cfg = C.parse(ReplayConfig, ["--config", path], "replay_server")
    assert cfg.env == "CartPole-v1"
    assert cfg.capacity == 1000 and cfg.batch_size == 32 and cfg.alpha == 0.5  # file over preset
    assert cfg.min_size == 500  # preset of the env named in the file
    cfg = C.parse(ReplayConfig, ["--config", path, "--capacity", "2000", "--alpha", "0.7"], "replay_server")
    assert cfg.capacity == 2000 and cfg.alpha == 0.7  # flags over file
    assert cfg.batch_size == 32  # file value not overridden by a flag stays


def test_flag_order_relative_to_config_does_not_matter(tmp_path):
    path = write(tmp_path, "capacity = 1000\nmin_size = 10\n")
    a = C.parse(ReplayConfig, ["--capacity", "3000", "--config", path, "--env", "CartPole-v1"], "replay_server")
    b = C.parse(ReplayConfig, ["--config", path, "--capacity", "3000", "--env", "CartPole-v1"], "replay_server")
    assert a == b and a.capacity == 3000


def test_env_flag_picks_the_preset_over_the_files_env(tmp_path):
    path = write(tmp_path, 'env = "ALE/Pong-v5"\n')
    cfg = C.parse(ReplayConfig, ["--config", path, "--env", "CartPole-v1"], "replay_server")
    assert cfg.env == "CartPole-v1" and cfg.capacity == 50_000


def test_role_table_overrides_top_level_keys(tmp_path):
    path = write(tmp_path, 'env = "CartPole-v1"\nlr = 0.01\nhidden = 32\n\n'
                           '[learner]\nlr = 0.002\n\n[actor]\nhidden = 16\n')
    cfg = C.parse(LearnerConfig, ["--config", path], "learner")
    assert cfg.lr == 0.002  # own table over top level
    assert cfg.hidden == 32  # another role's table does not apply
    cfg = C.parse(ActorConfig, ["--config", path], "actor")
    assert cfg.hidden == 16
    cfg = C.parse(LearnerConfig, ["--config", path, "--lr", "0.5"], "learner")
    assert cfg.lr == 0.5


def test_settings_of_other_roles_in_a_shared_file_are_ignored(tmp_path):
    path = write(tmp_path, 'env = "CartPole-v1"\ncapacity = 1000\noptimizer = "rmsprop"\neval_period = 3.0\n')
    actor = C.parse(ActorConfig, ["--config", path], "actor")
    assert not hasattr(actor, "capacity") and not hasattr(actor, "optimizer")
    learner = C.parse(LearnerConfig, ["--config", path], "learner")
    assert learner.optimizer == "rmsprop"


def test_run_sh_takes_every_role_table(tmp_path):
    """./run.sh hands one flat config to every role: the role tables of its file must reach it."""
    path = write(tmp_path, 'env = "CartPole-v1"\n[learner]\nlr = 0.002\n[replay_server]\ncapacity = 4000\n'
                           '[run]\nmax_seconds = 9.0\n')
    cfg = C.parse(LaunchConfig, ["--config", path, "--num-actors", "2"], "run")
    assert cfg.lr == 0.002 and cfg.capacity == 4000 and cfg.max_seconds == 9.0
    # ... and what it saves for the roles carries them
    saved = C.save(cfg, str(tmp_path / "run"), "config")
    learner = C.parse(LearnerConfig, ["--config", str(saved)], "learner")
    assert learner.lr == 0.002
    replay = C.parse(ReplayConfig, ["--config", str(saved)], "replay_server")
    assert replay.capacity == 4000


def test_run_sh_rejects_role_tables_that_disagree(tmp_path):
    path = write(tmp_path, '[learner]\nhidden = 64\n[actor]\nhidden = 128\n')
    with pytest.raises(SystemExit) as e:
        C.parse(LaunchConfig, ["--config", path], "run")
    assert "hidden" in exit_message(e)
    # each role on its own may take its own table
    assert C.parse(LearnerConfig, ["--config", path], "learner").hidden == 64


def test_json_config_file(tmp_path):
    path = write(tmp_path, json.dumps({"env": "CartPole-v1", "capacity": 777, "learner": {"lr": 0.3}}),
                 "c.json")
    assert C.parse(ReplayConfig, ["--config", path], "replay_server").capacity == 777
    assert C.parse(LearnerConfig, ["--config", path], "learner").lr == 0.3


# --------------------------------------------------------------------------- flag parsing


def test_bool_flags_and_optional_values(tmp_path):
    assert C.parse(ReplayConfig, [], "replay_server").insecure is False
    assert C.parse(ReplayConfig, ["--insecure"], "replay_server").insecure is True
    path = write(tmp_path, "insecure = true\n")
    assert C.parse(ReplayConfig, ["--config", path], "replay_server").insecure is True
    assert C.parse(ReplayConfig, ["--config", path, "--no-insecure"], "replay_server").insecure is False
    assert C.parse(EvaluatorConfig, [], "evaluator").stop_at_return is None
    assert C.parse(EvaluatorConfig, ["--stop-at-return", "195"], "evaluator").stop_at_return == 195.0
    assert C.parse(EvaluatorConfig, ["--stop-at-return", "none"], "evaluator").stop_at_return is None


def test_num_actors_resolution():
    assert C.parse(ActorConfig, [], "actor").num_actors == 1  # a lone actor counts 1
    assert C.parse(ActorConfig, ["--num-actors", "4", "--actor-index", "3"], "actor").num_actors == 4
    assert C.parse(LaunchConfig, [], "run").num_actors >= 1


@pytest.mark.parametrize("cls,flag,bad,choices", [
    (LearnerConfig, "--optimizer", "sgd", ["adam", "rmsprop"]),
    (LearnerConfig, "--device", "tpu", ["auto", "cpu", "cuda"]),
    (LaunchConfig, "--device", "tpu", ["auto", "cpu", "cuda"]),
    (ActorConfig, "--acting-dtype", "fp8", ["auto", "float32", "bfloat16", "int8"]),
])
def test_bad_choice_flag_is_an_argparse_error_naming_flag_and_choices(cls, flag, bad, choices, capsys):
    with pytest.raises(SystemExit) as e:
        C.parse(cls, [flag, bad], "learner")
    assert e.value.code == 2  # argparse's usage error
    err = capsys.readouterr().err
    assert flag in err and bad in err
    for c in choices:
        assert c in err
    assert "usage:" in err


@pytest.mark.parametrize("cls,argv,flag", [
    (ReplayConfig, ["--capacity", "lots"], "--capacity"),
    (ReplayConfig, ["--alpha", "high"], "--alpha"),
    (ActorConfig, ["--n-step", "2.5"], "--n-step"),
])
def test_bad_typed_flag_is_an_argparse_error(cls, argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        C.parse(cls, argv, "x")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and argv[1] in err


def test_int8_acting_needs_an_atari_env():
    with pytest.raises(SystemExit) as e:
        C.parse(ActorConfig, ["--env", "CartPole-v1", "--acting-dtype", "int8"], "actor")
    assert exit_message(e).startswith("--acting-dtype") and "CartPole-v1" in exit_message(e)
    assert C.parse(ActorConfig, ["--env", "ALE/Pong-v5", "--acting-dtype", "int8"], "actor").acting_dtype == "int8"


def test_unknown_flag_and_other_roles_flags_are_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        C.parse(ActorConfig, ["--capacity", "10"], "actor")  # a replay flag, not an actor one
    assert e.value.code == 2 and "--capacity" in capsys.readouterr().err


def test_bad_choice_in_config_file_names_the_flag_and_choices(tmp_path):
    path = write(tmp_path, 'optimizer = "sgd"\n')
    with pytest.raises(SystemExit) as e:
        C.parse(LearnerConfig, ["--config", path], "learner")
    msg = exit_message(e)
    assert "--optimizer" in msg and "sgd" in msg and "adam" in msg and "rmsprop" in msg


@pytest.mark.parametrize("text,flag", [
    ('capacity = "big"\n', "--capacity"),
    ("capacity = 1.5\n", "--capacity"),
    ('alpha = "0.5"\n', "--alpha"),
    ("insecure = 1\n", "--insecure"),
    ("batch_size = true\n", "--batch-size"),
    ("env = 3\n", "--env"),
])
def test_wrong_type_in_config_file_names_the_flag(tmp_path, text, flag):
    path = write(tmp_path, text)
    with pytest.raises(SystemExit) as e:
        C.parse(ReplayConfig, ["--config", path], "replay_server")
    assert exit_message(e).startswith(flag)


def test_int_in_config_file_is_accepted_for_a_float_setting(tmp_path):
    path = write(tmp_path, "alpha = 1\nbeta = 0\n")
    cfg = C.parse(ReplayConfig, ["--config", path], "replay_server")
    assert cfg.alpha == 1 and cfg.beta == 0


# --------------------------------------------------------------------------- config file errors


def test_unknown_key_in_config_file_is_rejected_naming_it(tmp_path):
    path = write(tmp_path, 'env = "CartPole-v1"\ncapacityy = 10\n')
    with pytest.raises(SystemExit) as e:
        C.parse(ReplayConfig, ["--config", path], "replay_server")
    msg = exit_message(e)
    assert "capacityy" in msg and path in msg


@pytest.mark.parametrize("role,cls", [("replay_server", ReplayConfig), ("learner", LearnerConfig),
                                      ("run", LaunchConfig)])
def test_unknown_key_in_any_role_table_is_rejected(tmp_path, role, cls):
    path = write(tmp_path, "[learner]\nlrr = 0.1\n")
    with pytest.raises(SystemExit) as e:
        C.parse(cls, ["--config", path], role)
    assert "lrr" in exit_message(e)


def test_misspelled_role_table_is_rejected(tmp_path):
    path = write(tmp_path, "[lerner]\nlr = 0.1\n")
    with pytest.raises(SystemExit) as e:
        C.parse(LearnerConfig, ["--config", path], "learner")
    assert "lerner" in exit_message(e)


def test_invalid_toml_and_json_exit_with_a_message(tmp_path):
    path = write(tmp_path, "capacity = = 3\n")
    with pytest.raises(SystemExit) as e:
        C.parse(ReplayConfig, ["--config", path], "replay_server")
    assert "TOML" in exit_message(e) and path in exit_message(e)
    path = write(tmp_path, "{nope", "c.json")
    with pytest.raises(SystemExit) as e:
        C.parse(ReplayConfig, ["--config", path], "replay_server")
    assert "JSON" in exit_message(e)


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("cls,role,argv", [
    (ReplayConfig, "replay_server", ["--env", "CartPole-v1", "--capacity", "1234", "--beta-anneal", "7"]),
    (LearnerConfig, "learner", ["--optimizer", "rmsprop", "--device", "cpu", "--lr", "0.125"]),
    (EvaluatorConfig, "evaluator", ["--stop-at-return", "195.5"]),
    (ActorConfig, "actor", ["--num-actors", "3", "--actor-index", "2", "--insecure"]),
    (LaunchConfig, "run", ["--env", "CartPole-v1", "--port-base", "6000", "--max-seconds", "12"]),
])
def test_save_writes_json_that_reads_back_equal(tmp_path, cls, role, argv):
    cfg = C.parse(cls, argv, role)
    path = C.save(cfg, str(tmp_path / "run"), "config_x")
    assert path == tmp_path / "run" / "config_x.json"
    assert not list((tmp_path / "run").glob("*.tmp"))
    data = json.loads(path.read_text())
    assert data == dataclasses.asdict(cfg)
    assert C.load_file(str(path)) == data
    again = C.parse(cls, ["--config", str(path)], role)
    assert again == cfg


def test_saved_launch_config_reads_back_in_each_role(tmp_path):
    """What ./run.sh does: save the launch config, each role parses it (plus its own flags)."""
    cfg = C.parse(LaunchConfig, ["--env", "CartPole-v1", "--num-actors", "3", "--lr", "0.004",
                                 "--capacity", "9000", "--eval-period", "7.5"], "run")
    path = str(C.save(cfg, str(tmp_path), "config"))
    for role, cls in C.ROLE_CONFIGS.items():
        extra = ["--actor-index", "2"] if cls is ActorConfig else []
        rc = C.parse(cls, ["--config", path, *extra], role)
        for f in dataclasses.fields(cls):
            want = 2 if f.name == "actor_index" else getattr(cfg, f.name)
            assert getattr(rc, f.name) == want, (role, f.name)


def test_save_overwrites(tmp_path):
    cfg = C.parse(ReplayConfig, ["--capacity", "5000", "--min-size", "10"], "replay_server")
    C.save(cfg, str(tmp_path), "c")
    cfg.capacity = 6000
    p = C.save(cfg, str(tmp_path), "c")
    assert json.loads(p.read_text())["capacity"] == 6000


# --------------------------------------------------------------------------- validate


@pytest.mark.parametrize("cls,role,argv,flag", [
    (ReplayConfig, "replay_server", ["--capacity", "100", "--batch-size", "200", "--min-size", "50"],
     "--capacity"),
    (ReplayConfig, "replay_server", ["--capacity", "1000", "--batch-size", "10", "--min-size", "2000"],
     "--min-size"),
    (ReplayConfig, "replay_server", ["--min-size", "0", "--capacity", "1000", "--batch-size", "10"],
     "--min-size"),
    (LearnerConfig, "learner", ["--gamma", "0"], "--gamma"),
    (LearnerConfig, "learner", ["--gamma", "1.01"], "--gamma"),
    (ActorConfig, "actor", ["--n-step", "0"], "--n-step"),
    (ActorConfig, "actor", ["--envs-per-actor", "0"], "--envs-per-actor"),
    (ActorConfig, "actor", ["--num-actors", "2", "--actor-index", "2"], "--actor-index"),
    (ActorConfig, "actor", ["--actor-index", "-1"], "--actor-index"),
    (ActorConfig, "actor", ["--chunk-steps", "0"], "--chunk-steps"),
    (EvaluatorConfig, "evaluator", ["--num-actors", "-1"], "--num-actors"),
    (ActorConfig, "actor", ["--algo", "a3c", "--t-max", "0"], "--t-max"),
    (ActorConfig, "actor", ["--algo", "nstep_q", "--eps-anneal-frames", "-1"], "--eps-anneal-frames"),
    (ActorConfig, "actor", ["--algo", "a3c", "--entropy-beta", "-0.1"], "--entropy-beta"),
    (ActorConfig, "actor", ["--algo", "a3c", "--exploration", "ladder"], "--exploration"),
    (LearnerConfig, "learner", ["--algo", "a3c", "--max-staleness", "-1"], "--max-staleness"),
    (LearnerConfig, "learner", ["--algo", "a3c", "--rmsprop-alpha", "1"], "--rmsprop-alpha"),
    (LearnerConfig, "learner", ["--algo", "onestep_q", "--rmsprop-eps", "0"], "--rmsprop-eps"),
    (LearnerConfig, "learner", ["--algo", "onestep_sarsa", "--noisy", "on"], "--noisy"),
    (LearnerConfig, "learner", ["--algo", "a3c", "--preset", "rainbow"], "--preset"),
    (LearnerConfig, "learner", ["--loader-threads", "-1"], "--loader-threads"),
    # values no learner can run with (issue 22)
    (LearnerConfig, "learner", ["--grad-clip", "-1"], "--grad-clip"),
    (LearnerConfig, "learner", ["--algo", "a3c", "--grad-clip", "-0.5"], "--grad-clip"),
    (LearnerConfig, "learner", ["--target-update", "0"], "--target-update"),
    (LearnerConfig, "learner", ["--algo", "nstep_q", "--target-update", "-3"], "--target-update"),
    (LearnerConfig, "learner", ["--lr", "0"], "--lr"),
    (LearnerConfig, "learner", ["--lr=-1e-4"], "--lr"),
    (LearnerConfig, "learner", ["--lr", "nan"], "--lr"),
    (LearnerConfig, "learner", ["--lr", "inf"], "--lr"),
    (LearnerConfig, "learner", ["--adam-eps", "0"], "--adam-eps"),
    (LearnerConfig, "learner", ["--optimizer", "rmsprop", "--rmsprop-eps", "0"], "--rmsprop-eps"),
    (LearnerConfig, "learner", ["--rmsprop-alpha", "1"], "--rmsprop-alpha"),
    (LearnerConfig, "learner", ["--rmsprop-alpha", "-0.1"], "--rmsprop-alpha"),
    (LearnerConfig, "learner", ["--weights-period", "0"], "--weights-period"),
    (LearnerConfig, "learner", ["--checkpoint-period", "-1"], "--checkpoint-period"),
    (LearnerConfig, "learner", ["--max-learner-steps", "-1"], "--max-learner-steps"),
    (LearnerConfig, "learner", ["--hidden", "0"], "--hidden"),
    (LearnerConfig, "learner", ["--n-step", "0"], "--n-step"),
    (LearnerConfig, "learner", ["--telemetry-period", "0"], "--telemetry-period"),
    (ReplayConfig, "replay_server", ["--batch-size", "0"], "--batch-size"),
    (ReplayConfig, "replay_server", ["--alpha", "-0.5"], "--alpha"),
    (ReplayConfig, "replay_server", ["--beta", "1.5"], "--beta"),
    (ReplayConfig, "replay_server", ["--beta-anneal", "-1"], "--beta-anneal"),
    (ReplayConfig, "replay_server", ["--prefetch", "0"], "--prefetch"),
    (ReplayConfig, "replay_server", ["--snapshot-period", "-1"], "--snapshot-period"),
    (ActorConfig, "actor", ["--eps-base", "1.5"], "--eps-base"),
    (ActorConfig, "actor", ["--eps-alpha", "-1"], "--eps-alpha"),
    (ActorConfig, "actor", ["--env-groups", "0"], "--env-groups"),
    (ActorConfig, "actor", ["--env-threads", "0"], "--env-threads"),
    (ActorConfig, "actor", ["--max-actor-steps", "-1"], "--max-actor-steps"),
    (EvaluatorConfig, "evaluator", ["--eval-period", "0"], "--eval-period"),
    (EvaluatorConfig, "evaluator", ["--eval-epsilon", "-0.1"], "--eval-epsilon"),
    (EvaluatorConfig, "evaluator", ["--report-period", "0"], "--report-period"),
    (EvaluatorConfig, "evaluator", ["--heartbeat-timeout", "0"], "--heartbeat-timeout"),
    (EvaluatorConfig, "evaluator", ["--ladder-window", "0"], "--ladder-window"),
    (LaunchConfig, "run", ["--max-restarts", "-1"], "--max-restarts"),
    (LaunchConfig, "run", ["--max-seconds", "-5"], "--max-seconds"),
    (LaunchConfig, "run", ["--grad-clip", "-1"], "--grad-clip"),
])
def test_validate_errors_name_the_flag(cls, role, argv, flag, capsys):
    with pytest.raises(C.ConfigError) as e:
        C.parse(cls, argv, role)
    assert exit_message(e).startswith(flag + ":")
    assert e.value.code == C.CONFIG_ERROR_EXIT  # ./run.sh does not restart a role that exits so
    assert flag + ":" in capsys.readouterr().err  # said on stderr before the exit


def test_grad_clip_zero_is_accepted_as_no_clipping():
    for algo in ("dqn", "rainbow", "iqn", "a3c"):
        assert C.parse(LearnerConfig, ["--algo", algo, "--grad-clip", "0"], "learner").grad_clip == 0.0
    C.parse(LearnerConfig, ["--target-update", "1", "--lr", "1e-9"], "learner")


def test_rmsprop_defaults_are_the_papers_for_replay_learners_and_the_async_familys_own():
    apex = C.parse(LearnerConfig, ["--optimizer", "rmsprop"], "learner")
    assert (apex.optimizer, apex.rmsprop_alpha, apex.rmsprop_eps) == ("rmsprop", 0.95, 1.5e-7)
    for env in ("CartPole-v1", "ALE/Pong-v5"):
        a3c = C.parse(LearnerConfig, ["--env", env, "--algo", "a3c"], "learner")
        assert (a3c.rmsprop_alpha, a3c.rmsprop_eps) == (0.99, 1e-5)
    flags = C.parse(LearnerConfig, ["--algo", "a3c", "--rmsprop-alpha", "0.9", "--rmsprop-eps", "0.1"], "learner")
    assert (flags.rmsprop_alpha, flags.rmsprop_eps) == (0.9, 0.1)


def test_launcher_refuses_a_bad_value_before_starting_anything(tmp_path: Path):
    import subprocess
    import sys
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "apex_zmq.launch", "--env", "CartPole-v1", "--run-dir",
                          str(run_dir), "--target-update", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == C.CONFIG_ERROR_EXIT, out.stdout + out.stderr
    assert "--target-update: must be >= 1" in out.stderr
    assert not run_dir.exists()  # refused before anything started


def test_presets_of_one_algorithm_on_one_env():
    rainbow = C.parse(LearnerConfig, ["--env", "CartPole-v1", "--algo", "rainbow"], "learner")
    assert (rainbow.v_min, rainbow.v_max, rainbow.lr) == (0.0, 110.0, 2e-3)
    assert rainbow.target_update == 250  # and the env's own
    for algo in ("rainbow", "iqn"):
        replay = C.parse(C.ReplayConfig, ["--env", "CartPole-v1", "--algo", algo], "replay_server")
        assert replay.batch_size == 64
        assert C.parse(C.ReplayConfig, ["--env", "CartPole-v1", "--algo", algo, "--batch-size", "32"],
                       "replay_server").batch_size == 32  # flags over presets
    assert C.parse(ActorConfig, ["--env", "CartPole-v1", "--preset", "rainbow"], "actor").exploration == "ladder"
    iqn = C.parse(LearnerConfig, ["--env", "CartPole-v1", "--algo", "iqn"], "learner")
    assert (iqn.iqn_n, iqn.iqn_n_prime, iqn.iqn_k, iqn.dueling, iqn.lr) == (8, 8, 4, False, 2e-3)
    held = C.parse(C.ReplayConfig, ["--env", "CartPole-v1", "--algo", "iqn"], "replay_server")
    assert (held.samples_per_insert, held.spi_block_inserts) == (8.0, True)
    free = C.parse(C.ReplayConfig, ["--env", "CartPole-v1", "--algo", "dqn"], "replay_server")
    assert (free.samples_per_insert, free.spi_block_inserts) == (0.0, False)
    dqn = C.parse(LearnerConfig, ["--env", "CartPole-v1"], "learner")
    assert (dqn.v_max, dqn.iqn_n) == (LearnerConfig.v_max, LearnerConfig.iqn_n)
    pong = C.parse(LearnerConfig, ["--env", "ALE/Pong-v5", "--algo", "rainbow"], "learner")
    assert pong.v_max == LearnerConfig.v_max == 10.0


def test_asynchronous_family_gets_its_presets_over_the_envs():
    cart = C.parse(LaunchConfig, ["--env", "CartPole-v1", "--algo", "a3c"], "run")
    assert (cart.lr, cart.t_max, cart.envs_per_actor, cart.weights_period, cart.hidden) == (1e-3, 5, 8, 0.02, 64)
    pong = C.parse(LaunchConfig, ["--env", "ALE/Pong-v5", "--algo", "nstep_q", "--lr", "3e-4"], "run")
    assert (pong.lr, pong.hidden, pong.envs_per_actor, pong.target_update) == (3e-4, 256, 16, 125)  # a flag wins
    dqn = C.parse(LaunchConfig, ["--env", "ALE/Pong-v5"], "run")
    assert (dqn.hidden, dqn.envs_per_actor, dqn.weights_period) == (512, 32, 2.0)  # Ape-X's untouched


def test_validate_accepts_the_boundaries():
    C.parse(ReplayConfig, ["--capacity", "100", "--batch-size", "100", "--min-size", "100"], "replay_server")
    C.parse(LearnerConfig, ["--gamma", "1"], "learner")
    C.parse(ActorConfig, ["--num-actors", "2", "--actor-index", "1", "--n-step", "1"], "actor")


def test_validate_directly_on_a_built_config():
    cfg = C.role_config(ReplayConfig, {"capacity": 10, "batch_size": 20, "min_size": 5, "lr": 1.0})
    with pytest.raises(SystemExit) as e:
        C.validate(cfg)
    assert exit_message(e).startswith("--capacity:")
    assert "20" in exit_message(e) and "10" in exit_message(e)


def test_loopback_endpoints_and_port_base():
    eps = C.loopback_endpoints(7000)
    assert list(eps) == list(C.DEFAULT_PORTS)
    assert eps["experience"] == "tcp://127.0.0.1:7000" and eps["telemetry"] == "tcp://127.0.0.1:7004"
    assert eps["gradients"] == "tcp://127.0.0.1:7006"  # as 5557 is to 5551: base + 5 is the relay's
    cfg = C.parse(ReplayConfig, [], "replay_server")
    assert cfg.experience == C.endpoint(C.LOOPBACK, C.DEFAULT_PORTS["experience"])


def test_dqn_single_head_is_a_network_option_and_the_default_says_nothing() -> None:
    """--no-dueling reaches every role's network builder; the default adds no option, so checkpoints
    written before the flag existed (options {}) still load."""
    dueling = C.parse(LearnerConfig, ["--env", "CartPole-v1"], "learner")
    assert C.net_options(dueling) == {}
    single = C.parse(LearnerConfig, ["--env", "CartPole-v1", "--no-dueling"], "learner")
    assert C.net_options(single) == {"dueling": False}
    from apex_zmq.envs import env_spec
    from apex_zmq.models import build_network
    net = build_network(env_spec("CartPole-v1"), 32, "dqn", **C.net_options(single))
    assert net.value is None and not any(k.startswith("value.") for k in net.state_dict())
    with pytest.raises(ValueError, match="only the option 'dueling'"):
        build_network(env_spec("CartPole-v1"), 32, "dqn", atoms=51)
