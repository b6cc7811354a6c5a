"""Agent steps/s of one real actor process on Atari, next to bare ``AtariVectorEnv`` stepping.

The actor is the real program (``python -m actor.main``): K envs in ``--groups`` ale-py native
vector envs of ``--env-threads`` threads each (one group steps while the network acts on the other),
the Nature dueling CNN (acting copy in bf16 where the CPU has it) run on each group's batch with
``--torch-threads`` threads, n-step returns and initial priorities, lz4 compression, encoding and
sending chunks to a PULL socket held by this benchmark, which counts the transitions that arrive,
while the benchmark publishes new network weights every ``--weights-period`` seconds as the learner
does (the actor adopts each: the int8 acting copy re-quantizes and re-calibrates every time).
The reference steps one ``AtariVectorEnv`` of the same K with ``--bare-threads`` threads (default 2,
the machine's two cores: the best the bare env does here) with random actions, in the same run. The two alternate ``--rounds`` times
and the medians are compared.

    .venv/bin/python bench/actor_throughput.py [--env ALE/Pong-v5] [--envs 64] [--groups 2] [--env-threads 2]

Last line: ``actor_steps_per_s=<x> ratio_to_bare_env=<y>``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from conftest import endpoint_flags, free_port_base  # noqa: E402

from apex_zmq import cpu  # noqa: E402
from apex_zmq.config import loopback_endpoints  # noqa: E402
from apex_zmq.envs import make_vector_env  # noqa: E402
from apex_zmq.networks import choose_acting, int8_engine  # noqa: E402
from apex_zmq.wire import decode_experience, decode_telemetry  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from _common import print_machine, publish_weights  # noqa: E402


def bare_env_rate(env_id: str, envs: int, threads: int, seconds: float) -> float:
    """Agent steps/s of the vector env alone with random actions."""
    env = make_vector_env(env_id, envs, seed=1, num_threads=threads)
    try:
        rng = np.random.default_rng(0)
        n_actions = int(env.single_action_space.n)
        for _ in range(50):  # warm up
            env.step(rng.integers(0, n_actions, envs))
        steps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            env.step(rng.integers(0, n_actions, envs))
            steps += envs
        return steps / (time.perf_counter() - t0)
    finally:
        env.close()


def actor_rate(env_id: str, envs: int, groups: int, env_threads: int, torch_threads: int,
               seconds: float, warmup: float, weights_period: float, acting_dtype: str) -> tuple[float, dict]:
    """Agent steps/s of the real actor process, counted as transitions arriving at a PULL socket,
    and its last telemetry (weights version acted with, acting copy's bits and agreement)."""
    base = free_port_base()
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    eps = loopback_endpoints(base)
    pull.bind(eps["experience"])
    tel = ctx.socket(zmq.SUB)  # the actor's telemetry says which weights version it acts with
    tel.setsockopt(zmq.SUBSCRIBE, b"")
    tel.bind(eps["telemetry"])
    adopted = 0
    report_metrics: dict = {}
    stop = threading.Event()
    learner = threading.Thread(target=publish_weights, args=(eps["weights"], env_id, 512, weights_period, stop))
    learner.start()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [sys.executable, "-m", "actor", "--env", env_id, "--run-dir", tmp,
             *endpoint_flags(base), "--envs-per-actor", str(envs), "--env-threads", str(env_threads),
             "--env-groups", str(groups), "--torch-threads", str(torch_threads), "--num-actors", "1",
             "--acting-dtype", acting_dtype],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            poller = zmq.Poller()
            poller.register(pull, zmq.POLLIN)
            poller.register(tel, zmq.POLLIN)
            start = None
            count = 0
            t_end = None
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                ready = dict(poller.poll(1000))
                if not ready:
                    if proc.poll() is not None:
                        raise RuntimeError(f"actor exited with code {proc.returncode}")
                    continue
                if tel in ready:
                    report = decode_telemetry(tel.recv_multipart())
                    adopted = max(adopted, int(report.metrics.get("actor/weights_version", 0)))
                    report_metrics = {**report.metrics, "actor/weights_version": adopted}
                if pull not in ready:
                    continue
                chunk = decode_experience(pull.recv_multipart(copy=False))
                now = time.perf_counter()
                if start is None:
                    start = now + warmup  # the first chunk: start counting after the warm-up
                    continue
                if now < start:
                    continue
                if t_end is None:
                    t0, t_end = now, now + seconds  # count chunks that arrive after t0
                    continue
                count += len(chunk.action)
                if now >= t_end:
                    return count / (now - t0), report_metrics
            raise RuntimeError("actor produced no experience in time")
        finally:
            proc.terminate()
            proc.wait(15)
            pull.close()
            tel.close()
            stop.set()
            learner.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="ALE/Pong-v5")
    ap.add_argument("--envs", type=int, default=64, help="K: envs per actor")
    ap.add_argument("--groups", type=int, default=2, help="env groups in the actor")
    ap.add_argument("--env-threads", type=int, default=2, help="ale-py threads per group")
    ap.add_argument("--acting-dtype", default="auto", help="the actor's --acting-dtype")
    ap.add_argument("--weights-period", type=float, default=2.0, help="seconds between new weights")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--bare-threads", type=int, default=2, help="ale-py threads of the bare reference")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print_machine()
    caps = cpu.detect()
    choice = choose_acting(args.acting_dtype, True, caps, int8_engine())
    print(f"acting copy ({args.acting_dtype}): {choice.label} ({choice.why})", flush=True)
    actor, bare = [], []
    for r in range(args.rounds):
        bare.append(bare_env_rate(args.env, args.envs, args.bare_threads, args.seconds))
        rate, m = actor_rate(args.env, args.envs, args.groups, args.env_threads, args.torch_threads,
                                args.seconds, warmup=3.0, weights_period=args.weights_period,
                                   acting_dtype=args.acting_dtype)
        actor.append(rate)
        print(f"round {r + 1}: bare env {bare[-1]:.0f} steps/s, actor {actor[-1]:.0f} steps/s (acting with "
              f"weights version {m.get('actor/weights_version', 0):.0f}, {m.get('actor/acting_bits', 0):.0f}-bit "
              f"activations, greedy agreement with float32 {m.get('actor/acting_agreement', float('nan')):.2f})",
              flush=True)
    a, b = statistics.median(actor), statistics.median(bare)
    print(f"env={args.env} K={args.envs} groups={args.groups} env_threads/group={args.env_threads} "
          f"torch_threads={args.torch_threads} bare env threads={args.bare_threads} "
          f"network=Nature dueling CNN (hidden 512) acting={choice.label}")
    print(f"actor_steps_per_s={a:.0f} ratio_to_bare_env={a / b:.2f}")


if __name__ == "__main__":
    main()
