"""End to end: the four programs as separate processes over loopback ZeroMQ learn CartPole."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from conftest import endpoint_flags, start_role, stop_all

TARGET = 195.0
BOUND_S = 400  # generous: a good run takes under a minute on 2 cores


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cartpole_four_processes_reach_195(tmp_path: Path, port_base: int) -> None:
    run_dir = tmp_path / "run"
    common = ["--env", "CartPole-v1", "--run-dir", str(run_dir), *endpoint_flags(port_base)]
    logs = tmp_path / "logs"
    logs.mkdir()
    # The command lines a user would type on separate hosts, one per role.
    procs = {
        "evaluator": start_role("evaluator", [*common, "--stop-at-return", str(TARGET)],
                                logs / "evaluator.log"),
        "replay_server": start_role("replay_server", common, logs / "replay.log"),
        "learner": start_role("learner", common, logs / "learner.log"),
        "actor": start_role("actor", [*common, "--actor-index", "0", "--num-actors", "1"],
                            logs / "actor.log"),
    }
    try:
        deadline = time.monotonic() + BOUND_S
        while time.monotonic() < deadline and procs["evaluator"].poll() is None:
            for name, p in procs.items():
                assert p.poll() is None or name == "evaluator", \
                    f"{name} died: {(logs / (name if name != 'replay_server' else 'replay')).with_suffix('.log').read_text()[-3000:]}"
            time.sleep(1.0)
        code = procs["evaluator"].poll()
        assert code == 0, f"evaluator did not finish (code {code}): " \
                          f"{(logs / 'evaluator.log').read_text()[-3000:]}"
    finally:
        stop_all(list(procs.values()))

    finished = json.loads((run_dir / "finished.json").read_text())
    assert finished["mean"] >= TARGET
    evals = _read_csv(run_dir / "eval.csv")
    assert evals and max(float(r["mean"]) for r in evals) >= TARGET
    # The target was reached by learning, through the replay: the learner trained on sampled batches
    # and the weights that reached the target came from it.
    best = max(evals, key=lambda r: float(r["mean"]))
    assert int(best["learner_steps"]) > 0
    metrics = _read_csv(run_dir / "metrics.csv")
    tags = {r["tag"] for r in metrics}
    assert {"learner/steps_per_s", "replay/size", "actor/steps_per_s"} <= tags, tags
    # Every role saved the configuration it ran with.
    for name in ("config_actor_0", "config_replay_server", "config_learner", "config_evaluator"):
        saved = json.loads((run_dir / f"{name}.json").read_text())
        assert saved["env"] == "CartPole-v1"
