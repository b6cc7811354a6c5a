"""A live sharded run: ``./run.sh --env CartPole-v1 --replay-shards 2`` (the launcher and every role as
its own process). Both shards store and sample, the learner takes batches from both, and a shard
killed with SIGKILL is restarted (a new incarnation that stores and samples again) while the other
shard keeps its process and keeps serving."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from test_faults import Run


def _last(run: Run, tag: str) -> float:
    rows = run.metric(tag)
    return rows[-1][1] if rows else 0.0


@pytest.mark.parametrize("loaders", ["0", "2"])  # the trainer reads the shards itself, or two loader threads do
def test_two_shards_store_sample_and_survive_a_killed_shard(tmp_path: Path, loaders: str) -> None:
    run = Run(tmp_path / "run", "--replay-shards", "2", "--num-actors", "1", "--snapshot-period", "0",
              "--loader-threads", loaders)
    try:
        for i in (0, 1):  # every shard stores and samples; the learner trains on batches from both
            run.wait(f"shard {i} sampling", lambda i=i: _last(run, f"replay/{i}/sampled") > 0)
            run.wait(f"batches from shard {i}", lambda i=i: _last(run, f"learner/batches_from_shard_{i}") > 0)
        run.wait("training", lambda: _last(run, "learner/steps") > 200)
        assert _last(run, "replay/size") >= _last(run, "replay/0/size")  # the evaluator's total
        before = run.roles()
        inc1 = _last(run, "replay/1/incarnation")
        killed_at = time.time()
        os.kill(before["replay_server-1"]["pid"], signal.SIGKILL)
        # Shard 0 keeps serving while shard 1 is down: its sampled count rises after the kill.
        sampled0 = _last(run, "replay/0/sampled")
        run.wait("shard 0 serving on", lambda: _last(run, "replay/0/sampled") > sampled0)
        run.wait("shard 1 restarted", lambda: (run.roles().get("replay_server-1", {}).get("pid")
                                               not in (None, before["replay_server-1"]["pid"])))
        after = run.roles()
        assert after["replay_server-1"]["restarts"] == 1
        for role in ("replay_server-0", "learner", "actor-0", "evaluator"):
            assert after[role]["pid"] == before[role]["pid"], role  # nobody else was restarted
        # The new shard 1 (another incarnation) stores and samples again, and the learner takes its batches.
        run.wait("shard 1's new incarnation", lambda: any(
            t > killed_at and v != inc1 for t, v in run.metric("replay/1/incarnation")))
        run.wait("shard 1 sampling again", lambda: any(
            t > killed_at and v > 0 for t, v in run.metric("replay/1/sampled")
        ) and _last(run, "replay/1/incarnation") != inc1)
        steps = _last(run, "learner/steps")
        run.wait("training on", lambda: _last(run, "learner/steps") > steps + 50)
    finally:
        if run.proc.poll() is None:
            run.proc.send_signal(signal.SIGTERM)
            run.proc.wait(30)
        run.out.close()
