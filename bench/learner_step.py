"""One learner step alone: double DQN at batch B on an env's network, single head against dueling.

The learner's step is what bounds MinAtar training on 2 cores (BENCHMARKS.md). This times
``DQNLearner.step`` on one torch thread, round by round, for the network with one head (Young & Tian's,
the MinAtar preset's) and with the dueling head (the reference, timed in the same rounds), on random
batches of the env's own observation shape. Last line::

    learner_step env=<id> batch=<B> single_ms=<median> dueling_ms=<median> ratio=<single / dueling>

    .venv/bin/python bench/learner_step.py --env MinAtar/Breakout-v0 --batch 128
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Optional

import _common  # noqa: F401  (puts the repository root on the path)
import numpy as np
import torch

from apex_zmq.envs import env_spec
from apex_zmq.minatar_envs import register as register_minatar
from apex_zmq.models import build_network
from learner.dqn import Batch, DQNLearner


def random_batch(spec, batch: int, rng: np.random.Generator) -> Batch:
    """A batch of ``spec``'s observation shape (images 0..pixel_max, vectors normal), as the loader makes."""
    shape = (batch, *spec.obs_shape)
    if spec.obs_dtype == "uint8":
        obs = torch.as_tensor(rng.integers(0, spec.pixel_max + 1, shape, dtype=np.uint8))
        nxt = torch.as_tensor(rng.integers(0, spec.pixel_max + 1, shape, dtype=np.uint8))
    else:
        obs = torch.as_tensor(rng.normal(size=shape).astype(np.float32))
        nxt = torch.as_tensor(rng.normal(size=shape).astype(np.float32))
    return Batch(obs=obs, action=torch.as_tensor(rng.integers(0, spec.num_actions, batch)),
                 ret=torch.as_tensor(rng.random(batch, dtype=np.float32)), disc=torch.full((batch,), 0.97),
                 next_obs=nxt, weight=torch.ones(batch), ids=np.arange(batch))


def step_ms(learner: DQNLearner, b: Batch, steps: int) -> float:
    """Milliseconds per ``learner.step`` (priorities and loss read back, as the CPU learner does) over ``steps``."""
    t0 = time.perf_counter()
    for _ in range(steps):
        learner.step(b)
    return (time.perf_counter() - t0) / steps * 1e3


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="MinAtar/Breakout-v0")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200, help="steps per round and network")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    _common.print_machine()
    register_minatar()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = env_spec(args.env)
    b = random_batch(spec, args.batch, np.random.default_rng(0))
    learners = {name: DQNLearner(build_network(spec, args.hidden, "dqn", dueling=dueling), "adam", 2.5e-4, 250, 10.0)
                for name, dueling in (("single", False), ("dueling", True))}
    for learner in learners.values():  # warm-up: allocator, kernels' first calls
        step_ms(learner, b, 20)
    times: dict[str, list[float]] = {name: [] for name in learners}
    for r in range(args.rounds):
        for name, learner in learners.items():
            times[name].append(step_ms(learner, b, args.steps))
        print(f"round {r + 1}: " + "  ".join(f"{n} {t[-1]:.2f} ms" for n, t in times.items()), flush=True)
    single, dueling = (statistics.median(times[n]) for n in ("single", "dueling"))
    print(f"learner_step env={args.env} batch={args.batch} single_ms={single:.2f} dueling_ms={dueling:.2f} "
          f"ratio={single / dueling:.2f}")


if __name__ == "__main__":
    main()
