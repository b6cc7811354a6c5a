"""Live: one experience chunk with an observation that does not decompress, in a running CartPole run.

The replay server never decompresses, so it stores the chunk; the learner's loader finds the bad
blob, trains on the rest of each batch and sends the item back as ``remove``; the replay stops
sampling it. The chunk is pushed with priority 1e30, so until it is removed every batch is made of
nothing but the bad item: if removal did not work, ``learner/bad_items`` would grow forever and
training would stall.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import zmq

from apex_zmq import wire
from apex_zmq.config import loopback_endpoints
from conftest import endpoint_flags, start_role, stop_all

DEADLINE_S = 120.0
ACTOR_STEPS = 120  # x 8 envs: ~850 transitions, over the CartPole preset's min_size of 500


def _metric(run_dir: Path, tag: str) -> list[float]:
    """Every value logged for ``tag``, in order (the last line may be half written: skipped)."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return []
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r.get("tag") == tag:
                try:
                    out.append(float(r["value"]))
                except (TypeError, ValueError):
                    pass
    return out


def _last(run_dir: Path, tag: str) -> float | None:
    vals = _metric(run_dir, tag)
    return vals[-1] if vals else None


def _bad_chunk() -> wire.ExperienceChunk:
    """One transition from a blob that does not decompress to a good one, at a huge priority."""
    obs = np.array([[0.01, -0.02, 0.03, 0.04], [0.02, 0.1, 0.02, -0.1]], dtype=np.float32)
    blobs = wire.compress_obs(obs)
    blobs[0] = b"\xff" * 24 + blobs[0]
    data, offsets = wire.frame_table(blobs)
    return wire.ExperienceChunk(sender="test-rogue", seq=1, obs_shape=(4,), obs_dtype="float32",
                                frame_data=data, frame_offsets=offsets,
                                obs_idx=np.array([0], np.int32), next_idx=np.array([1], np.int32),
                                action=np.array([1], np.int32), ret=np.array([1.0], np.float32),
                                disc=np.array([0.97], np.float32), priority=np.array([1e30], np.float32))


def test_a_corrupt_observation_is_removed_and_training_goes_on(tmp_path: Path, port_base: int) -> None:
    run_dir = tmp_path / "run"
    logs = tmp_path / "logs"
    logs.mkdir()
    common = ["--env", "CartPole-v1", "--run-dir", str(run_dir), *endpoint_flags(port_base)]
    procs = {
        # no evaluations to speak of: the evaluator is here to log telemetry to metrics.csv
        "evaluator": start_role("evaluator", [*common, "--dashboard-port", "0", "--eval-period", "3600"],
                                logs / "evaluator.log"),
        "replay_server": start_role("replay_server", common, logs / "replay_server.log"),
        "learner": start_role("learner", common, logs / "learner.log"),
        # A bounded actor: once it is done, the only experience is the chunk this test pushes.
        "actor": start_role("actor", [*common, "--actor-index", "0", "--num-actors", "1",
                                      "--max-actor-steps", str(ACTOR_STEPS)], logs / "actor.log"),
    }

    def logs_tail() -> str:
        return "\n".join(f"--- {n}:\n{(logs / f'{n}.log').read_text(errors='replace')[-1500:]}" for n in procs)

    def wait(what: str, cond, timeout: float = DEADLINE_S):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in procs.items():
                code = p.poll()
                assert code is None or (name == "actor" and code == 0), \
                    f"{name} exited with {code} while waiting for {what}\n{logs_tail()}"
            value = cond()
            if value:
                return value
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}\n{logs_tail()}")

    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5000)
    try:
        # 1. Training on the actor's experience; the actor done, the replay's insert count settles.
        wait("the learner training", lambda: (_last(run_dir, "learner/steps") or 0) > 20)
        wait("the actor to finish its steps", lambda: procs["actor"].poll() == 0)

        def settled():
            vals = _metric(run_dir, "replay/inserted")
            n = len(vals)
            # three reports after the actor's exit was seen, all equal
            return n >= settled.start + 3 and vals[-1] == vals[-2] == vals[-3] and vals[-1]
        settled.start = len(_metric(run_dir, "replay/inserted"))
        inserted = wait("the replay's insert count to settle", settled)
        assert inserted >= 500
        assert _last(run_dir, "replay/rejected_experience") == 0
        assert _last(run_dir, "replay/removed") == 0
        assert (_last(run_dir, "learner/bad_items") or 0) == 0

        # 2. The rogue chunk: well formed (the replay takes it), one observation not decompressible.
        push.connect(loopback_endpoints(port_base)["experience"])
        push.send_multipart(wire.encode(_bad_chunk()))

        wait("the replay to insert the chunk", lambda: _last(run_dir, "replay/inserted") == inserted + 1)
        wait("the learner to find the bad item", lambda: (_last(run_dir, "learner/bad_items") or 0) >= 1)
        wait("the replay to remove it", lambda: (_last(run_dir, "replay/removed") or 0) >= 1)

        # 3. Removed once, and never sampled again: bad_items stops growing while training goes on.
        def quiet():
            bad = _metric(run_dir, "learner/bad_items")
            steps = _metric(run_dir, "learner/steps")
            n = min(len(bad), len(steps))  # written together, one report at a time
            window = 6
            return (n >= window and len(set(bad[n - window:n])) == 1
                    and steps[n - 1] - steps[n - window] >= 50 and (bad[n - 1], steps[n - 1]))
        bad_items, steps = wait("learner/bad_items to stop growing while learner/steps rises", quiet)
        assert bad_items >= 1
        assert _last(run_dir, "replay/inserted") == inserted + 1
        assert _last(run_dir, "replay/rejected_experience") == 0
        assert _last(run_dir, "replay/stale_incarnation") == 0  # the learner echoed the right incarnation
        assert _last(run_dir, "learner/rejected") == 0

        def removed_settled():
            v = _metric(run_dir, "replay/removed")
            return len(v) >= 3 and v[-1] == v[-2] == v[-3] and [v[-1]]
        removed = wait("replay/removed to settle", removed_settled)[0]
        # One item was removed: however many in-flight batches reported it (all of them did, as the
        # item was all they held), it counts once.
        assert removed == 1, _metric(run_dir, "replay/removed")
    finally:
        push.close()
        ctx.term()
        stop_all(list(procs.values()))
