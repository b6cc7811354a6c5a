"""The four roles under ./run.sh's launcher keep their busy threads within the budget it gave them,
read from /proc while they train (a role whose torch ran an OpenMP team of every core would not)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apex_zmq import config as C
from apex_zmq.launch import plan_budgets
from conftest import ROOT, free_port_base
from procstat import thread_cpu

BUSY = 0.1  # a thread using more than a tenth of a core counts as busy


def _learner_steps(run_dir: Path) -> float:
    path = run_dir / "metrics.csv"
    if not path.exists():
        return 0.0
    with open(path) as f:
        return max([float(r["value"]) for r in csv.DictReader(f) if r["tag"] == "learner/steps"], default=0.0)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_live_roles_stay_within_their_thread_budgets(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "apex_zmq.launch", "--env", "CartPole-v1", "--run-dir", str(run_dir),
            "--port-base", str(free_port_base()), "--num-actors", "1", "--dashboard-port", "0", "--max-seconds", "240"]
    log = open(tmp_path / "launcher.log", "wb")
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while _learner_steps(run_dir) < 200:
            assert proc.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "launcher.log").read_text()[-2000:]
            time.sleep(0.5)
        pids = {name: info["pid"] for name, info in json.loads((run_dir / "roles.json").read_text()).items()}
        assert all(pids.values()), pids
        usage = thread_cpu(pids, seconds=6.0)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        log.close()
    cfg = C.role_config(C.LaunchConfig, json.loads((run_dir / "config.json").read_text()))
    budgets = plan_budgets(cfg, os.cpu_count() or 1, learner_on_gpu=False)
    report = []
    for name, threads in usage.items():
        kind = "actor" if name.startswith("actor") else name
        busy = [(n, round(c, 2)) for n, c in threads if c > BUSY]
        report.append(f"{name}: {sum(c for _, c in threads):.2f} cores, busy {busy} (budget "
                      f"{budgets[kind].busy_threads} threads)")
        assert len(busy) <= budgets[kind].busy_threads, "\n".join(report)
    # The roles really worked while measured: the actor stepped and the learner trained.
    busiest = {name: threads[0] for name, threads in usage.items()}
    assert busiest["actor-0"][1] > BUSY and busiest["learner"][1] > BUSY, "\n".join(report)
    print("\n".join(report))
