"""Resume: running the same ./run.sh command again continues a stopped run from checkpoints/last.pt."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, endpoint_flags, free_port_base

from apex_zmq import checkpoint
from apex_zmq import config as C
from learner.main import LearnerCore


def _launch(run_dir: Path, seconds: float) -> str:
    """One session of the whole system (what ./run.sh runs), stopped by its time limit."""
    argv = [sys.executable, "-m", "apex_zmq.launch", "--env", "CartPole-v1", "--run-dir", str(run_dir),
            "--port-base", str(free_port_base()), "--max-seconds", str(seconds), "--num-actors", "1",
            "--dashboard-port", "0", "--checkpoint-period", "2"]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def _learner_steps(path: Path) -> list[tuple[float, int]]:
    with open(path) as f:
        return [(float(r["time"]), int(float(r["value"]))) for r in csv.DictReader(f)
                if r["tag"] == "learner/steps"]


def test_stopped_run_resumes_with_counters_and_keeps_learning(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = _launch(run_dir, 25)
    assert "(resuming)" not in first
    ckpt = run_dir / "checkpoints" / "last.pt"
    state1 = torch.load(ckpt, weights_only=True)
    steps1 = int(state1["steps"])
    assert steps1 > 0, "the first session trained nothing"
    opt_step1 = max(float(s["step"]) for s in state1["opt"]["state"].values())
    end_first = max(t for t, _ in _learner_steps(run_dir / "metrics.csv"))

    second = _launch(run_dir, 25)
    assert "(resuming)" in second
    log = (run_dir / "logs" / "learner.log").read_text()
    assert f"resumed from {ckpt} at step {steps1}" in log
    state2 = torch.load(ckpt, weights_only=True)
    # Counters carry over and learning went on from them: more steps, and the optimizer's own
    # step count continued (it was restored, not rebuilt).
    assert int(state2["steps"]) > steps1
    assert max(float(s["step"]) for s in state2["opt"]["state"].values()) > opt_step1
    later = [s for t, s in _learner_steps(run_dir / "metrics.csv") if t > end_first]
    assert later and min(later) >= steps1, "the learner's step counter restarted from zero"
    assert not torch.equal(state1["net"]["advantage.2.weight"], state2["net"]["advantage.2.weight"])


def _cartpole_learner(run_dir: Path, hidden: int) -> LearnerCore:
    return LearnerCore(C.LearnerConfig(env="CartPole-v1", hidden=hidden, run_dir=str(run_dir), device="cpu"))


def test_checkpoint_of_another_network_stops_the_learner_naming_both(tmp_path: Path) -> None:
    # What the supervisor sees: the learner program's exit code and its message, not a crash loop.
    run_dir = tmp_path / "run"
    _cartpole_learner(run_dir, 64).save()
    argv = [sys.executable, "-m", "learner", "--env", "CartPole-v1", "--run-dir", str(run_dir),
            "--hidden", "32", "--device", "cpu", *endpoint_flags(free_port_base())]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 78, out.stdout[-3000:] + out.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "last.pt"
    assert (f"learner: {ckpt} was written for --algo dqn --env CartPole-v1 --hidden 64; this run has "
            f"--algo dqn --env CartPole-v1 --hidden 32: use another --run-dir or the same flags") in out.stderr
    assert "Traceback" not in out.stderr


def test_checkpoint_that_does_not_name_its_network_still_stops_on_a_shape_mismatch(
        tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    _cartpole_learner(run_dir, 64).save()
    assert _cartpole_learner(run_dir, 64).resumed_from == 0  # the same flags resume
    ckpt = checkpoint.last_path(run_dir)
    state = checkpoint.load(ckpt)
    del state["env"], state["hidden"]  # as if written before checkpoints named their network
    checkpoint.save_atomic(state, ckpt)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        _cartpole_learner(run_dir, 32)
    assert stopped.value.code == C.CONFIG_ERROR_EXIT
    err = capsys.readouterr().err
    assert (f"learner: {ckpt} was written for --algo dqn --env ? --hidden ?; "
            f"this run has --algo dqn --env CartPole-v1 --hidden 32") in err
    assert "size mismatch" in err


def test_checkpoint_of_another_learning_rule_stops_the_learner_naming_both(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    _cartpole_learner(run_dir, 64).save()
    ckpt = checkpoint.last_path(run_dir)
    state = checkpoint.load(ckpt)
    assert state["algo"] == "dqn"  # checkpoints record their learning rule
    state["algo"] = "rainbow"  # as written by a learner of another --algo with the same env and width
    checkpoint.save_atomic(state, ckpt)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        _cartpole_learner(run_dir, 64)
    assert stopped.value.code == C.CONFIG_ERROR_EXIT
    assert (f"learner: {ckpt} was written for --algo rainbow --env CartPole-v1 --hidden 64; "
            f"this run has --algo dqn --env CartPole-v1 --hidden 64") in capsys.readouterr().err


def test_checkpoint_of_another_c51_support_stops_the_learner_naming_it(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    cfg = dict(env="CartPole-v1", hidden=16, run_dir=str(run_dir), device="cpu", algo="rainbow", v_max=110.0)
    LearnerCore(C.LearnerConfig(**cfg)).save()
    assert LearnerCore(C.LearnerConfig(**cfg)).resumed_from == 0  # the same options resume
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        LearnerCore(C.LearnerConfig(**{**cfg, "v_max": 200.0}))
    assert stopped.value.code == C.CONFIG_ERROR_EXIT
    assert "network options differ: vmax 110.0 in the checkpoint, 200.0 now" in capsys.readouterr().err


def _core(run_dir: Path, **kw) -> LearnerCore:
    return LearnerCore(C.LearnerConfig(**{**dict(env="CartPole-v1", hidden=16, run_dir=str(run_dir),
                                                 device="cpu"), **kw}))


def test_checkpoint_of_another_optimizer_stops_the_learner_naming_it_and_the_way_out(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    _core(run_dir).save()  # adam, the default
    assert _core(run_dir).resumed_from == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        _core(run_dir, optimizer="rmsprop")
    assert stopped.value.code == C.CONFIG_ERROR_EXIT
    ckpt = checkpoint.last_path(run_dir)
    assert (f"learner: {ckpt} was written with --optimizer adam; this run has --optimizer rmsprop: start a new "
            f"run directory (another --run-dir) or pass --optimizer adam") in capsys.readouterr().err


@pytest.mark.parametrize("where,change,said", [
    ("net", lambda t: t.double(), "dtype mismatch for advantage.2.weight: torch.float64 in the checkpoint, "
                                  "torch.float32 in this network"),
    ("opt", lambda t: t.double(), "'exp_avg' of parameter 0 is torch.float64"),
    ("opt", lambda t: t[:, :1].clone(), "'exp_avg' of parameter 0 is torch.float32 [16, 1]"),  # would broadcast
])
def test_checkpoint_tensors_of_another_dtype_or_shape_stop_the_learner(tmp_path: Path, capsys, where, change,
                                                                        said) -> None:
    run_dir = tmp_path / "run"
    core = _core(run_dir)
    core.save()
    ckpt = checkpoint.last_path(run_dir)
    state = checkpoint.load(ckpt)
    if where == "net":
        state["net"]["advantage.2.weight"] = change(state["net"]["advantage.2.weight"])
    else:
        state["opt"]["state"][0] = {"step": torch.tensor(1.0), "exp_avg_sq": torch.zeros(16, 4),
                                    "exp_avg": change(torch.zeros(16, 4))}
    checkpoint.save_atomic(state, ckpt)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        _core(run_dir)
    assert stopped.value.code == C.CONFIG_ERROR_EXIT
    err = capsys.readouterr().err
    assert said in err and "--run-dir" in err, err


def test_learner_program_exits_78_without_a_traceback_on_another_optimizer(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _core(run_dir, hidden=64).save()
    argv = [sys.executable, "-m", "learner", "--env", "CartPole-v1", "--run-dir", str(run_dir), "--optimizer",
            "rmsprop", "--device", "cpu", *endpoint_flags(free_port_base())]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == C.CONFIG_ERROR_EXIT, out.stdout[-3000:] + out.stderr[-3000:]
    assert "pass --optimizer adam" in out.stderr and "Traceback" not in out.stderr
