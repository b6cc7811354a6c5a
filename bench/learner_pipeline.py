"""Learner training steps/s inside the running system against the same step standalone.

System: a real replay server process holding real Pong transitions (a producer process keeps
inserting at ``--insert-rate`` transitions/s, like a few actors) and the real learner program
(``python -m learner.main``: samples over ZeroMQ, loader threads that decode, decompress and
stack, the double-DQN step, priorities back, weight snapshots). Its steps/s is read from its own
telemetry (median of the per-second reports over ``--seconds``, after a warm-up).

Standalone: the same ``DQNLearner`` step (same network, batch size, torch threads) in this process
on pre-made tensors (one real sampled batch, decompressed once), no I/O at all.

Two networks (``--net``, default both): the Nature dueling CNN on Pong at batch 32 (the batch-512
CNN step takes over a second on 2 cores), and the CartPole dueling MLP (the CartPole preset: hidden
64, batch 128, real CartPole transitions), whose step is short enough (a millisecond or two) that
the system's per-step overhead (receiving, decoding, priorities back, weight snapshots, telemetry)
shows. 1 torch thread by default. With 2 torch threads on a 2-core machine the training step
competes with the replay server, the producer and the loader for the second core: that measures the
machine's size, not the pipeline (BENCHMARKS.md gives both).

    .venv/bin/python bench/learner_pipeline.py [--net both|cnn|mlp] [--batch N] [--threads 1]

A third figure: the standalone step again while a busy-looping process occupies every other core
(``beside_spinners``): on a machine whose cores share physical cores, the step is slower whenever
anything runs beside it, which no pipeline can avoid.

Last lines, one per network: ``net=<cnn|mlp> batch=<b> learner_steps_per_s=<x>
standalone_steps_per_s=<y> efficiency=<x/y> standalone_busy_steps_per_s=<z> efficiency_vs_busy=<x/z>``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, live_endpoints, print_machine, producer, real_chunks, wait_for_metric  # noqa: E402

# --net: (env, default batch, description)
NETS = {"cnn": ("ALE/Pong-v5", 32, "Nature dueling CNN (Pong)"),
        "mlp": ("CartPole-v1", 128, "CartPole dueling MLP (hidden 64)")}


def in_system(env: str, batch: int, threads: int, fill: int, rate: float, seconds: float) -> tuple[float, float]:
    """Median learner steps/s and wait fraction reported by the learner program in a live system."""
    from apex_zmq.wire import decode_telemetry
    ep, flags, tel = live_endpoints()
    spawn = mp.get_context("spawn")
    throttle, stop, out = spawn.Event(), spawn.Event(), spawn.Queue()
    procs: list = []
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--env", env, "--run-dir", tmp, *flags]  # the replay server sets the batch size
        try:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "replay_server", *common, "--batch-size", str(batch), "--capacity", str(fill),
                 "--min-size", str(fill)], cwd=ROOT))
            prod = spawn.Process(target=producer, args=(env, ep["experience"], 40, fill, rate, throttle, stop, out))
            prod.start()
            wait_for_metric(tel, "replay/size", fill, timeout=300)
            throttle.set()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "learner", *common, "--torch-threads", str(threads),
                 "--device", "cpu", "--checkpoint-period", "1e9"], cwd=ROOT))
            wait_for_metric(tel, "learner/steps", 20, timeout=300)  # warm-up
            rates, waits = [], []
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end:
                if tel.poll(500):
                    t = decode_telemetry(tel.recv_multipart())
                    if t.role == "learner":
                        rates.append(t.metrics["learner/steps_per_s"])
                        waits.append(t.metrics["perf/learner_wait_fraction"])
            return statistics.median(rates), statistics.median(waits)
        finally:
            stop.set()
            for p in procs:
                p.terminate()
                p.wait(30)
            prod.join(30)


def standalone(env: str, batch: int, threads: int, seconds: float) -> float:
    """Steps/s of the same training step on pre-made tensors."""
    import torch

    from apex_zmq import config as C
    from apex_zmq.envs import env_spec
    from apex_zmq.models import build_network
    from learner.dqn import DQNLearner, batch_from_sample
    from replay_server.replay import PrioritizedReplay
    torch.set_num_threads(threads)
    cfg = C.resolve(C.parse(C.LearnerConfig, ["--env", env], "learner"))
    spec = env_spec(env)
    replay = PrioritizedReplay(100_000)
    for c in real_chunks(env, 4):
        replay.add(c)
    b = batch_from_sample(replay.sample(batch, 0.4), spec.num_actions, torch.device("cpu"))
    learner = DQNLearner(build_network(spec, cfg.hidden), cfg.optimizer, cfg.lr, cfg.target_update,
                         cfg.grad_clip)
    for _ in range(5):
        learner.step(b)
    n, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < seconds:
        learner.step(b)
        n += 1
    return n / (time.monotonic() - t0)


def beside_spinners(threads: int, fn, *args):
    """``fn(*args)`` while a busy-looping process occupies each core the learner's threads leave.

    The standalone figure is measured with the other cores idle; in the system the replay server, the
    producer and the loader run on them. Where cores share a physical core (SMT siblings: a 2-vCPU cloud
    VM is often one), work on one slows the other, so this figure is the step's speed on the machine as
    the system leaves it at most, and ``in the system / this`` what the pipeline itself costs."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(max(0, (os.cpu_count() or 1) - threads))]
    try:
        time.sleep(0.5)
        return fn(*args)
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", choices=("both", *NETS), default="both",
                    help="cnn: Nature dueling CNN on Pong; mlp: CartPole MLP; both (default)")
    ap.add_argument("--batch", type=int, default=0, help="batch size (0: 32 for cnn, 128 for mlp)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the learner")
    ap.add_argument("--fill", type=int, default=50_000, help="transitions in the replay")
    ap.add_argument("--insert-rate", type=float, default=1000.0, help="transitions/s while measuring")
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    print_machine()
    results = []
    for net in (NETS if args.net == "both" else [args.net]):
        env, default_batch, what = NETS[net]
        batch = args.batch or default_batch
        sys_rate, wait = in_system(env, batch, args.threads, args.fill, args.insert_rate, args.seconds)
        print(f"{net}: in the system: {sys_rate:.1f} steps/s (median of per-second reports), "
              f"waiting for data {wait:.1%} of the time", flush=True)
        alone = standalone(env, batch, args.threads, args.seconds)
        print(f"{net}: standalone: {alone:.1f} steps/s", flush=True)
        busy = beside_spinners(args.threads, standalone, env, batch, args.threads, args.seconds)
        print(f"{net}: standalone with the other cores busy-looping: {busy:.1f} steps/s", flush=True)
        print(f"{net}: network={what} batch={batch} threads={args.threads} device=cpu", flush=True)
        results.append(f"net={net} batch={batch} learner_steps_per_s={sys_rate:.1f} "
                       f"standalone_steps_per_s={alone:.1f} efficiency={sys_rate / alone:.2f} "
                       f"standalone_busy_steps_per_s={busy:.1f} efficiency_vs_busy={sys_rate / busy:.2f}")
    for line in results:
        print(line)


if __name__ == "__main__":
    main()
