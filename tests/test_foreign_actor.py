"""An actor written from PROTOCOL.md alone (examples/foreign_actor.py: pyzmq, msgpack, lz4 and numpy,
nothing of this project) feeds a real replay server and learner, and they learn from it.

The test binds the telemetry endpoint itself (in the evaluator's place) and checks, from what the
three processes report: every transition the foreign actor sent was stored and none rejected, the
replay server sampled them and applied the learner's priority updates, the learner trained on them
without rejecting a batch or finding an observation that does not decompress, the foreign actor's
own telemetry is valid, and it received and acted with weights newer than the first ones.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import zmq

from apex_zmq import wire
from apex_zmq.config import loopback_endpoints
from conftest import ROOT, endpoint_flags, start_role, stop_all

ACTOR = ROOT / "examples" / "foreign_actor.py"
UNTIL_WEIGHTS = 3       # the actor stops once it has sent a chunk acting with the 3rd weights it adopted
ACTOR_SECONDS = 45      # ... or after this long
MIN_SIZE, BATCH = 256, 32
STEPS_PER_S = 1000       # paced: the learner needs the CPU more (2 cores)


def _tail(path: Path, n: int = 2500) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def test_foreign_actor_feeds_a_live_replay_server_and_learner(tmp_path: Path, port_base: int) -> None:
    eps = loopback_endpoints(port_base)
    ctx = zmq.Context()
    tel = ctx.socket(zmq.SUB)
    tel.setsockopt(zmq.SUBSCRIBE, b"")
    tel.setsockopt(zmq.LINGER, 0)
    tel.bind(eps["telemetry"])
    common = ["--env", "CartPole-v1", "--run-dir", str(tmp_path / "run"), *endpoint_flags(port_base),
              "--telemetry-period", "0.25"]
    logs = {name: tmp_path / f"{name}.log" for name in ("replay_server", "learner", "actor")}
    procs = [
        start_role("replay_server", [*common, "--min-size", str(MIN_SIZE), "--batch-size", str(BATCH),
                                     "--capacity", "20000"], logs["replay_server"]),
        start_role("learner", [*common, "--device", "cpu", "--loader-threads", "1", "--weights-period", "0.25",
                               "--checkpoint-period", "600"], logs["learner"]),
    ]
    with open(logs["actor"], "wb") as err:
        actor = subprocess.Popen(
            [sys.executable, str(ACTOR), "--experience", eps["experience"], "--weights", eps["weights"],
             "--telemetry", eps["telemetry"], "--name", "foreign-0", "--envs", "4", "--chunk", "64",
             "--until-weights", str(UNTIL_WEIGHTS), "--seconds", str(ACTOR_SECONDS), "--telemetry-period", "0.25",
             "--max-steps-per-s", str(STEPS_PER_S)],
            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, cwd=ROOT)
    procs.append(actor)
    reports: dict[str, list[wire.Telemetry]] = {}

    def drain(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if tel.poll(50):
                t = wire.decode_telemetry(tel.recv_multipart())  # WireError: the test fails
                reports.setdefault(t.sender, []).append(t)

    try:
        deadline = time.monotonic() + ACTOR_SECONDS + 15
        while actor.poll() is None and time.monotonic() < deadline:
            drain(0.5)
            for name, p in zip(("replay_server", "learner"), procs):
                assert p.poll() is None, f"{name} died:\n{_tail(logs[name])}"
        assert actor.poll() is not None, "the foreign actor did not stop"
        out = actor.stdout.read().decode()
        assert actor.returncode == 0, f"foreign actor failed:\n{out}\n{_tail(logs['actor'])}"
        summary = json.loads(out.strip().splitlines()[-1])
        # The replay server's counters after the actor's last chunk (they report every 0.25 s).
        settle = time.monotonic() + 5
        while time.monotonic() < settle:
            drain(0.3)
            if reports.get("replay") and reports["replay"][-1].metrics["replay/inserted"] >= summary["transitions"]:
                break
    finally:
        stop_all(procs)
        tel.close(0)
        ctx.term()

    context = (f"summary {summary}\nreplay log:\n{_tail(logs['replay_server'])}\nlearner log:\n"
               f"{_tail(logs['learner'])}\nactor stderr:\n{_tail(logs['actor'])}")
    # The foreign actor acted with learned weights, newer than the first it got.
    assert summary["transitions"] > MIN_SIZE and summary["chunks"] > 0, context
    assert summary["weights_rejected"] == 0, context
    assert summary["first_weights_version"] is not None, context
    # (Not necessarily version 0 first: the learner's first publish may precede the subscription.)
    assert summary["weights_adopted"] >= UNTIL_WEIGHTS and summary["chunk_weights_adopted"] >= UNTIL_WEIGHTS, context
    assert summary["last_weights_version"] > summary["first_weights_version"], context
    assert summary["chunk_weights_version"] == summary["last_weights_version"], context

    # The replay server stored every transition it sent and rejected nothing; sampled; took updates.
    assert "replay" in reports, f"no replay telemetry: {sorted(reports)}\n{context}"
    replay = reports["replay"][-1].metrics
    assert replay["replay/inserted"] == summary["transitions"], (replay, context)
    assert replay["replay/rejected_experience"] == 0 and replay["replay/rejected_priorities"] == 0, replay
    assert replay["replay/sampled"] >= BATCH and replay["replay/updated"] > 0, replay
    assert replay["replay/removed"] == 0, replay

    # The learner trained on those batches: no batch rejected, every observation decompressed.
    assert "learner" in reports, f"no learner telemetry: {sorted(reports)}\n{context}"
    learner = reports["learner"][-1].metrics
    assert learner["learner/steps"] >= summary["last_weights_version"] > 0, (learner, context)
    assert learner["learner/rejected"] == 0 and learner["learner/bad_items"] == 0, learner

    # The foreign actor's own telemetry passed the project's strict decoder (drain would have
    # raised otherwise) and reported its episodes and the weights it acted with.
    mine = reports.get("foreign-0", [])
    assert mine and all(t.role == "actor" for t in mine), sorted(reports)
    assert sum(len(t.episodes) for t in mine) > 0
    assert max(t.metrics["actor/weights_version"] for t in mine) > summary["first_weights_version"]
