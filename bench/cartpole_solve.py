"""Seconds from launching the whole distributed system until CartPole-v1 is solved.

Runs ``./run.sh --env CartPole-v1`` (the launcher: evaluator, replay server, learner, actors as
separate processes over loopback ZeroMQ) ``--runs`` times, each in a fresh run directory, and times
launch -> the first evaluation whose mean return over its episodes reaches ``--target``.
The evaluation's own wall-clock timestamp (eval.csv) is used, so the launcher's shutdown is not counted.

    .venv/bin/python bench/cartpole_solve.py [--runs 3] [--target 475] [--limit 300]

Last line: ``cartpole_solve_s=<median seconds>``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import free_port_base  # noqa: E402


def first_reach(eval_csv: Path, target: float) -> float | None:
    """Wall-clock time of the first evaluation with mean >= target."""
    if not eval_csv.exists():
        return None
    with open(eval_csv) as f:
        for row in csv.DictReader(f):
            if float(row["mean"]) >= target:
                return float(row["time"])
    return None


def one_run(target: float, limit: float, extra: list[str]) -> float:
    """Launch one fresh run; seconds from launch to the target (inf if not reached in ``limit``)."""
    with tempfile.TemporaryDirectory(prefix="cartpole-solve-") as tmp:
        run_dir = Path(tmp) / "run"
        argv = [sys.executable, "-m", "apex_zmq.launch", "--env", "CartPole-v1", "--run-dir", str(run_dir),
                "--port-base", str(free_port_base()), "--stop-at-return", str(target),
                "--max-seconds", str(limit), *extra]
        t0 = time.time()
        subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, check=False)
        reached = first_reach(run_dir / "eval.csv", target)
        return float("inf") if reached is None else reached - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--target", type=float, default=475.0)
    ap.add_argument("--limit", type=float, default=300.0, help="seconds before a run counts as failed")
    args, extra = ap.parse_known_args()
    times = []
    for i in range(args.runs):
        s = one_run(args.target, args.limit, extra)
        times.append(s)
        print(f"run {i + 1}: {s:.1f} s to eval mean >= {args.target:g}", flush=True)
    print(f"runs={args.runs} min={min(times):.1f} max={max(times):.1f}")
    print(f"cartpole_solve_s={statistics.median(times):.1f}")


if __name__ == "__main__":
    main()
