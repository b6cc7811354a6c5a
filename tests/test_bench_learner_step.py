"""bench/learner_step.py: both networks step, and its last line carries the figures it claims."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT


def test_learner_step_bench_times_both_heads_and_prints_its_line() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "learner_step.py"), "--rounds", "1", "--steps", "2",
                        "--batch", "8"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("cpu: ")
    m = re.fullmatch(r"learner_step env=MinAtar/Breakout-v0 batch=8 single_ms=([\d.]+) dueling_ms=([\d.]+) "
                     r"ratio=([\d.]+)", lines[-1])
    assert m, lines[-1]
    single, dueling, ratio = map(float, m.groups())
    assert single > 0 and dueling > 0 and abs(ratio - single / dueling) < 0.01 + 0.01 * ratio
