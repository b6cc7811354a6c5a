"""Surviving faults: kill -9 of an actor, the replay server and the learner during a live run.

The run is what ./run.sh starts (the supervising launcher and every role as its own process). Each
killed role must be restarted by the supervisor while the others keep their process (ZeroMQ
reconnects them); the replay comes back from its snapshot, the learner from its last checkpoint,
and the run still reaches its evaluation target after all three crashes.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import ROOT, free_port_base

TARGET = 195.0
BOUND_S = 360.0


class Run:
    """A launcher run and what it has written so far."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        argv = [sys.executable, "-m", "apex_zmq.launch", "--env", "CartPole-v1", "--run-dir", str(run_dir),
                "--port-base", str(free_port_base()), "--num-actors", "2", "--dashboard-port", "0",
                "--checkpoint-period", "2", "--snapshot-period", "2", "--max-seconds", str(BOUND_S)]
        self.out = open(run_dir.parent / "launcher.log", "wb")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self.out, stderr=subprocess.STDOUT)

    def roles(self) -> dict:
        try:
            return json.loads((self.dir / "roles.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def metric(self, tag: str) -> list[tuple[float, float]]:
        path = self.dir / "metrics.csv"
        if not path.exists():
            return []
        with open(path) as f:
            return [(float(r["time"]), float(r["value"])) for r in csv.DictReader(f) if r["tag"] == tag]

    def wait(self, what: str, cond, timeout: float = 120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"launcher exited while waiting for {what}: {self.log()}"
            value = cond()
            if value:
                return value
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}: {self.log()}")

    def log(self) -> str:
        return (self.dir.parent / "launcher.log").read_text(errors="replace")[-3000:]

    def kill9(self, role: str) -> int:
        """SIGKILL a role; wait until the supervisor has a new process for it; return the new pid."""
        before = self.roles()
        old = before[role]["pid"]
        os.kill(old, signal.SIGKILL)
        new = self.wait(f"{role} restarted", lambda: (self.roles().get(role, {}).get("pid") or old) != old
                        and self.roles()[role]["pid"])
        after = self.roles()
        assert after[role]["restarts"] == before[role]["restarts"] + 1
        for other, info in before.items():  # nobody else was restarted: they reconnected
            if other != role:
                assert after[other]["pid"] == info["pid"], f"{other} was restarted when {role} died"
        return new


def _grows(run: Run, tag: str, since: float) -> bool:
    vals = [v for t, v in run.metric(tag) if t > since]
    return len(vals) >= 2 and vals[-1] > vals[0]


def test_kill9_actor_replay_learner_run_recovers_and_reaches_target(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run = Run(run_dir)
    try:
        run.wait("learning to start", lambda: any(v > 50 for _, v in run.metric("learner/steps")))
        run.wait("a replay snapshot", lambda: (run_dir / "replay" / "snapshot.npz").exists())

        # 1. An actor: restarted; the replay keeps receiving experience.
        run.kill9("actor-0")
        t = time.time()
        run.wait("inserts after the actor restart", lambda: _grows(run, "replay/size", t)
                 or _grows(run, "replay/inserted", t))

        # 2. The replay server: restarted from its snapshot; actors and learner reconnect by themselves.
        run.kill9("replay_server")
        t = time.time()
        run.wait("the replay restored", lambda: "restored" in (run_dir / "logs" / "replay_server.log").read_text())
        restored = int(re.findall(r"restored (\d+) transitions",
                                  (run_dir / "logs" / "replay_server.log").read_text())[-1])
        assert restored > 0
        run.wait("learning after the replay restart", lambda: _grows(run, "learner/steps", t))
        run.wait("inserts after the replay restart", lambda: _grows(run, "replay/inserted", t))

        # 3. The learner: it resumes from last.pt, losing at most one checkpoint period of steps.
        ckpt = run_dir / "checkpoints" / "last.pt"
        ck_steps = int(torch.load(ckpt, weights_only=True)["steps"])
        reported = max(v for _, v in run.metric("learner/steps"))
        rates = [v for _, v in run.metric("learner/steps_per_s")]
        run.kill9("learner")
        t = time.time()
        log = run_dir / "logs" / "learner.log"
        resumed = int(run.wait("the learner resumed", lambda: re.findall(r"at step (\d+)", log.read_text()))[-1])
        assert resumed >= ck_steps
        # Steps lost: at most what the learner does in one checkpoint period (2 s) plus the
        # telemetry period (1 s) between its last report and the kill.
        assert reported - resumed <= max(rates) * 3 + 1, (reported, resumed, max(rates))
        run.wait("learning after the learner restart",
                 lambda: any(v > resumed for tt, v in run.metric("learner/steps") if tt > t))

        # 4. The run still reaches its target, with weights trained after all three crashes.
        def reached() -> bool:
            path = run_dir / "eval.csv"
            if not path.exists():
                return False
            with open(path) as f:
                return any(float(r["mean"]) >= TARGET and int(float(r["learner_steps"])) > resumed
                           for r in csv.DictReader(f))
        run.wait(f"an evaluation mean >= {TARGET} after the crashes", reached, timeout=BOUND_S)
    finally:
        if run.proc.poll() is None:
            run.proc.send_signal(signal.SIGINT)
            run.proc.wait(60)
        run.out.close()
    assert run.proc.returncode == 0, run.log()
    assert "restarts:" in run.log()
