"""The asynchronous family end to end under ./run.sh's launcher (evaluator, learner as parameter server,
actor-learners; no replay server): a3c and the three Q algorithms (nstep_q, onestep_q, onestep_sarsa) learn CartPole to the 195 mark over separate
processes, the learner's gradients socket is fuzzed during the a3c run (every malformed or foreign
gradient dropped and counted, the run still learns) and its learner is then killed (restarted by the
supervisor, it resumes and takes gradients again), and a3c turns over a few hundred updates on Pong.

Slow (each run about a minute on 2 busy cores): leave them out with ``--ignore=tests/test_async_e2e.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import zmq
from conftest import free_port_base
from test_algos_e2e import _launch, _metric_max, _play, _role_logs, _rows
from test_fuzz import mutants

from actor.main import EXPLORATION_CODES
from apex_zmq import checkpoint
from apex_zmq.config import loopback_endpoints

TARGET = 195.0
FUZZED = 600  # malformed or foreign gradients pushed at the live learner


def _stop(proc: subprocess.Popen) -> int:
    """Ctrl-C the launcher (every role stops, the learner saves last.pt) and return its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def _wait(proc: subprocess.Popen, run_dir: Path, log: Path, what: str, done, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None and time.monotonic() < deadline, \
            f"waiting for {what}:\n{log.read_text(errors='replace')[-3000:]}\n{_role_logs(run_dir)}"
        time.sleep(0.5)


def _check_roles(run_dir: Path, out: str, algo: str, exploration: str, restarted: frozenset = frozenset()) -> None:
    """No replay server, no restarts but those named, no tracebacks; the actor-learner names its rule and
    exploration."""
    roles = json.loads((run_dir / "roles.json").read_text())
    assert set(roles) == {"evaluator", "learner", "actor-0"}, roles
    assert all(r["restarts"] == (name in restarted) for name, r in roles.items()), f"{roles}\n{out[-3000:]}"
    for log in (run_dir / "logs").glob("*.log"):
        assert "Traceback" not in log.read_text(errors="replace"), _role_logs(run_dir)
    text = (run_dir / "logs" / "actor-0.log").read_text(errors="replace")
    assert f"actor-0: actor-learner, --algo {algo}," in text and f"exploration {exploration}," in text, text[-2000:]
    assert _metric_max(run_dir, "actor/exploration") == EXPLORATION_CODES[exploration]
    for name in ("config_actor_0", "config_learner", "config_evaluator"):
        assert json.loads((run_dir / f"{name}.json").read_text())["algo"] == algo
    state = checkpoint.load(checkpoint.last_path(run_dir))
    assert state["algo"] == algo and state["steps"] > 0


def _best_plays(tmp_path: Path, run_dir: Path) -> None:
    text, rows = _play(tmp_path, str(run_dir), "--episodes", "5")
    returns = [float(r["return"]) for r in rows]
    # A network that first reached 195 can be unsteady (3 episodes of one played 60, 80, 102); a wrongly
    # loaded one falls in ~10 steps every time, a random policy in ~22.
    assert len(returns) == 5 and sum(returns) / 5 >= 40, (returns, text)


def test_a3c_reaches_195_while_fuzzed_and_survives_a_learner_crash(tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    base = free_port_base()
    proc = _launch(run_dir, log, "--env", "CartPole-v1", "--algo", "a3c", "--num-actors", "1",
                   "--max-seconds", "300", port_base=base)
    ctx = zmq.Context()
    try:
        _wait(proc, run_dir, log, "the first applied gradients",
              lambda: _metric_max(run_dir, "learner/gradients_applied") > 0, 120)
        # A rogue PUSH on the learner's gradients socket: malformed messages, and well-formed gradients
        # of another network (every mutant is of an 8-unit network: none fits the run's 64-unit one).
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(loopback_endpoints(base)["gradients"])
        for m in mutants("gradients", FUZZED):
            push.send_multipart(m.frames)
        _wait(proc, run_dir, log, f"{FUZZED} rejected gradients and an evaluation >= {TARGET}",
              lambda: _metric_max(run_dir, "learner/rejected") >= FUZZED
              and max((float(r["mean"]) for r in _rows(run_dir / "eval.csv")), default=0) >= TARGET, 200)
        time.sleep(2.5)  # two more reports: nothing else gets counted
        assert _metric_max(run_dir, "learner/rejected") == FUZZED
        applied = _metric_max(run_dir, "learner/gradients_applied")
        stale = _metric_max(run_dir, "learner/stale_dropped")
        assert applied > 100 and stale <= 0.05 * applied, (applied, stale)

        # The learner crashes: the supervisor restarts it, it resumes from its checkpoint as a new
        # incarnation, the actor-learner takes its weights and its gradients are applied again.
        # After its first checkpoint (a run can reach 195 before it: then there is nothing to resume).
        _wait(proc, run_dir, log, "the learner's first checkpoint",
              lambda: checkpoint.last_path(run_dir).exists(), 60)
        learner_pid = json.loads((run_dir / "roles.json").read_text())["learner"]["pid"]
        steps_before = _metric_max(run_dir, "learner/steps")
        os.kill(learner_pid, signal.SIGKILL)
        _wait(proc, run_dir, log, "the learner restarted and applying gradients again",
              lambda: json.loads((run_dir / "roles.json").read_text())["learner"]["restarts"] == 1
              and "resumed from" in (run_dir / "logs" / "learner.log").read_text(errors="replace")
              and _metric_max(run_dir, "learner/steps") > steps_before + 50, 120)
    finally:
        ctx.destroy(linger=0)
        code = _stop(proc)
    out = log.read_text(errors="replace")
    assert code == 0 and "run.sh: stopped (interrupted)" in out, out[-3000:]
    assert "learner exited with code" in out  # the one crash, and nothing else
    assert _metric_max(run_dir, "actor/rejected") <= 0
    assert 0 < _metric_max(run_dir, "learner/entropy") <= 0.6932  # log 2: CartPole's two actions
    evals = _rows(run_dir / "eval.csv")
    print(f"a3c: best eval {max(float(r['mean']) for r in evals):.1f}, {applied:.0f} gradients applied, "
          f"{stale:.0f} stale, {FUZZED} fuzzed ones rejected; learner steps {steps_before:.0f} before the crash, "
          f"{_metric_max(run_dir, 'learner/steps'):.0f} at the end")
    _check_roles(run_dir, out, "a3c", "policy", restarted={"learner"})
    _best_plays(tmp_path, run_dir)


@pytest.mark.parametrize("algo", ["nstep_q", "onestep_q", "onestep_sarsa"])
def test_q_algorithms_reach_195(tmp_path: Path, algo: str) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    proc = _launch(run_dir, log, "--env", "CartPole-v1", "--algo", algo, "--num-actors", "1",
                   "--stop-at-return", str(TARGET), "--max-seconds", "240")
    try:
        code = proc.wait(300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log.read_text(errors="replace")
    assert code == 0 and "run.sh: stopped (finished)" in out, f"{out[-3000:]}\n{_role_logs(run_dir)}"
    finished = json.loads((run_dir / "finished.json").read_text())
    assert finished["mean"] >= TARGET
    print(f"{algo}: {finished['mean']:.1f} after {finished['elapsed_s']:.0f}s, {finished['learner_steps']} updates")
    _check_roles(run_dir, out, algo, "annealed")
    # The paper's exploration: epsilons annealed from 1 towards 0.1 / 0.01 / 0.5.
    assert 0 < _metric_max(run_dir, "actor/epsilon_mean") <= 1
    _best_plays(tmp_path, run_dir)


UPDATES = 300


def test_a3c_atari_smoke(tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    proc = _launch(run_dir, log, "--env", "ALE/Pong-v5", "--algo", "a3c", "--num-actors", "1", "--envs-per-actor", "4",
                   "--eval-episodes", "1", "--eval-max-frames", "2000", "--eval-period", "600",
                   "--weights-period", "0.2", "--max-seconds", "400")
    try:
        _wait(proc, run_dir, log, f"{UPDATES} updates, weights at the actor-learner, an evaluation",
              lambda: _metric_max(run_dir, "learner/steps") >= UPDATES
              and _metric_max(run_dir, "actor/weights_version") > 0 and bool(_rows(run_dir / "eval.csv")), 420)
    finally:
        code = _stop(proc)
    out = log.read_text(errors="replace")
    assert code == 0 and "run.sh: stopped (interrupted)" in out, out[-3000:]
    for tag in ("learner/rejected", "actor/rejected"):
        assert _metric_max(run_dir, tag) <= 0, tag
    assert _metric_max(run_dir, "learner/loss") > float("-inf")
    assert 0 < _metric_max(run_dir, "learner/entropy") <= 1.7918  # log 6: Pong's minimal action set
    _check_roles(run_dir, out, "a3c", "policy")
    state = checkpoint.load(checkpoint.last_path(run_dir))
    assert state["env"] == "ALE/Pong-v5" and state["steps"] >= UPDATES
    text, rows = _play(tmp_path, str(checkpoint.last_path(run_dir)), "--episodes", "1", "--max-frames", "2000")
    assert "play: return mean" in text and len(rows) == 1, text
