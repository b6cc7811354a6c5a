"""bench/datapath.py runs end to end at tiny sizes: the machine line first, every stage's row, and a last
line whose figures parse (the figures themselves are the benchmark's, not checked here)."""

from __future__ import annotations

import math
import re
import subprocess
import sys

from conftest import ROOT


def test_datapath_runs_and_its_last_line_parses() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "datapath.py"), "--capacity", "1024", "--batch", "16",
                        "--chunks", "2", "--envs", "4", "--batches", "2", "--seconds", "0.05", "--min-calls", "2",
                        "--scaling-batches", "2"], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("cpu: ") and re.search(r"\d+ cores", lines[0])
    for stage in ("replay sample + update", "replay insert", "decode + assemble (pong)",
                  "decode + assemble (mspacman)", "trainer loop (trivial step)"):
        row = next((line for line in lines if line.startswith(stage)), None)
        assert row is not None and "memcpy" in row and "cores" in row, stage
    assert any(line.startswith("loader threads (Pong): 1 thread") for line in lines)
    figures = dict(re.findall(r"(\w+)=(\S+)", lines[-1]))
    assert list(figures) == ["learner_batch_cpu_ms", "mspacman_batch_cpu_ms", "replay_sample_update_ms",
                             "loaders_scaling"]
    for k, v in figures.items():
        assert math.isfinite(float(v)) and float(v) > 0, (k, v)
