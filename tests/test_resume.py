"""Resume: running the same ./run.sh command again continues a stopped run from checkpoints/last.pt."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import torch

from conftest import ROOT, free_port_base


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
