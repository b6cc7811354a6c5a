"""The CPU cost of each stage of the data path, per item and as cores needed for 1,000 learner steps/s.

Every stage runs its pure core in this process on real frames (ale-py games stepped by the actor's own
core with random Q values: ``_common.real_chunks``), each call timed with ``time.thread_time`` (CPU of the
thread doing the work) and ``time.perf_counter`` (wall); the figures are the medians per call (a machine
shared with other work inflates some calls):

  replay sample + update   ``PrioritizedReplay.sample(batch)`` + ``update(ids, priorities)`` on a replay
                           of ``--capacity`` Pong transitions (filled by re-adding a pool of real chunks),
                           per batch: the replay server's work per learner step, less the wire
  insert                   ``PrioritizedReplay.add(chunk)`` on that full replay (each add evicts), per
                           transition
  decode and assemble      the learner loader's work per batch, Pong and MsPacman: ``decode_sample`` of the
                           batch as it arrives, then ``batch_from_sample`` (lz4 decompression, obs /
                           next-obs stacks by ``index_select``) on the CPU; a GPU learner also pins and
                           copies the stacks, not counted here
  trainer loop             ``learner.main.train``, the training thread's loop, with a trivial step (fixed
                           priorities), a batch always ready and the updates encoded and pushed to an
                           in-process ZeroMQ socket: the loop's own cost per step (the CPU path of
                           ``learner.readback``; weights and checkpoint periods set beyond the run)
  loader scaling           decode and assemble in two threads against one: batches/s (wall), and the
                           loader threads' CPU per batch in each

Beside each stage, a memcpy (numpy ``copyto``) of the bytes it produces, in the same run: machines differ,
the ratio to memcpy less. "Cores for 1,000 steps/s" is CPU per item x items per second at 1,000 learner
steps/s of batch 512; inserts at ``--samples-per-insert`` sampled transitions per inserted one (default 1).

    nice -n 19 .venv/bin/python bench/datapath.py [--capacity 1000000] [--batch 512] [--seconds 3]

First line: the CPU (model, vector capabilities, cores). Last line: ``learner_batch_cpu_ms=<Pong batch>
mspacman_batch_cpu_ms=<x> replay_sample_update_ms=<x> loaders_scaling=<two loaders / one>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_machine, real_chunks  # noqa: E402

STEPS_PER_S = 1000   # the learner rate the cores are sized for
REFERENCE_BATCH = 512


@dataclass
class Timing:
    """CPU and wall seconds of each call; per call, the medians (robust to the bursts of a shared machine)."""

    cpu: list[float]
    wall: list[float]

    @property
    def calls(self) -> int:
        return len(self.cpu)

    @property
    def cpu_per_call(self) -> float:
        return float(np.median(self.cpu))

    @property
    def wall_per_call(self) -> float:
        return float(np.median(self.wall))


def timed(fn: Callable[[int], object], seconds: float, min_calls: int) -> Timing:
    """Call ``fn(i)`` for i = 0, 1, ... until ``min_calls`` calls and ``seconds`` of wall time; the CPU time
    is this thread's (``thread_time``: other threads and processes on the machine are not counted)."""
    fn(0)  # warm: first-call allocations and caches
    cpu, wall = [], []
    start = time.perf_counter()
    while len(cpu) < min_calls or time.perf_counter() - start < seconds:
        c, w = time.thread_time(), time.perf_counter()
        fn(len(cpu))
        cpu.append(time.thread_time() - c)
        wall.append(time.perf_counter() - w)
    return Timing(cpu, wall)


def memcpy_s(nbytes: float, least_s: float = 2e-3) -> float:
    """CPU seconds of one memcpy of ``nbytes`` (numpy ``copyto`` of touched buffers, called from Python as
    the stages are): the median of 5 rounds of enough copies to take ``least_s`` each."""
    nbytes = max(1, int(nbytes))
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    reps, rounds = 1, []
    while len(rounds) < 5:
        t = time.thread_time()
        for _ in range(reps):
            np.copyto(dst, src)
        dt = time.thread_time() - t
        if dt < least_s and reps < 1 << 20:
            reps *= 4  # too short to time: more copies per round
            continue
        rounds.append(dt / reps)
    return float(np.median(rounds))


@dataclass
class Stage:
    """One row of the table: a stage's calls (``items_per_call`` items and ``bytes_per_call`` bytes out each),
    and the items a 1,000 steps/s learner needs per second."""

    name: str
    unit: str
    timing: Timing
    items_per_call: float
    bytes_per_call: float
    items_per_s: float     # at STEPS_PER_S learner steps of REFERENCE_BATCH
    memcpy: float = field(init=False)  # per item

    def __post_init__(self) -> None:
        self.memcpy = memcpy_s(self.bytes_per_call) / self.items_per_call

    @property
    def cpu(self) -> float:
        """CPU seconds per item."""
        return self.timing.cpu_per_call / self.items_per_call

    @property
    def wall(self) -> float:
        return self.timing.wall_per_call / self.items_per_call

    @property
    def cores(self) -> float:
        return self.cpu * self.items_per_s

    def line(self) -> str:
        ratio = self.cpu / self.memcpy if self.memcpy > 0 else float("nan")
        return (f"{self.name:<30} {self.cpu * 1e6:>10.1f} us CPU/{self.unit:<10} {self.wall * 1e6:>10.1f} us wall "
                f"{self.bytes_per_call / self.items_per_call / 1e3:>9.1f} kB  memcpy {self.memcpy * 1e6:>8.2f} us "
                f"(CPU = memcpy x{ratio:.1f})  cores {self.cores:.2f}")


# ---------------------------------------------------------------------------------------------- replay
def fill(pool: list, capacity: int, seed: int = 0):
    """A ``PrioritizedReplay`` of ``capacity`` holding ``capacity`` transitions: the pool's chunks re-added."""
    from replay_server.replay import PrioritizedReplay
    replay = PrioritizedReplay(capacity, alpha=0.6, seed=seed)
    i = 0
    while replay.next_id < capacity:
        replay.add(pool[i % len(pool)])
        i += 1
    return replay


def replay_stages(pool: list, capacity: int, batch: int, spi: float, args) -> list[Stage]:
    """Sample + update per batch and insert per transition on a full replay of ``capacity``."""
    replay = fill(pool, capacity)
    rng = np.random.default_rng(0)
    new_prios = rng.random(batch).astype(np.float32) + 0.01
    sizes: list[int] = []

    def sample_update(i: int) -> None:
        s = replay.sample(batch, 0.4, seq=i)
        replay.update(s.ids, new_prios[:len(s.ids)])
        if len(sizes) < 64:
            sizes.append(len(s.frame_data))

    t = timed(sample_update, args.seconds, args.min_calls)
    sampled_per_s = REFERENCE_BATCH * STEPS_PER_S
    # out: the batch's frame table, which sampling joins from the stored blobs
    rows = [Stage("replay sample + update", "batch", t, 1, float(np.mean(sizes)), sampled_per_s / batch)]
    t = timed(lambda i: replay.add(pool[i % len(pool)]), args.seconds, args.min_calls)
    # out: the chunk's frame blobs, which add copies once; items: transitions per chunk
    per_chunk = float(np.mean([len(c.action) for c in pool]))
    rows.append(Stage("replay insert", "transition", t, per_chunk,
                      float(np.mean([len(c.frame_data) for c in pool])), sampled_per_s / spi))
    return rows


# ---------------------------------------------------------------------------------------------- loader
def encoded_batches(pool: list, batch: int, count: int) -> list[list]:
    """``count`` sampled batches of ``batch`` from a replay of the pool's transitions, encoded as they travel
    to the learner (the replay's sampling and frame tables, not the wire, decide what a loader gets)."""
    from apex_zmq.wire import encode
    replay = fill(pool, sum(len(c.action) for c in pool))
    return [encode(replay.sample(batch, 0.4, seq=i)) for i in range(count)]


def assemble(frames: list, spec):
    """The loader's work on one batch: decode, decompress, stack (``learner.main``'s ``receive``)."""
    import torch

    from apex_zmq.wire import decode_sample
    from learner.dqn import batch_from_sample
    return batch_from_sample(decode_sample(frames), spec.num_actions, torch.device("cpu"),
                             obs_spec=(spec.obs_shape, spec.obs_dtype))


def loader_stage(game: str, frames: list[list], spec, batch: int, args) -> Stage:
    """Decode and assemble per batch of one game, on this thread with one torch thread (a loader's)."""
    t = timed(lambda i: assemble(frames[i % len(frames)], spec), args.seconds, args.min_calls)
    out_bytes = 2 * batch * int(np.prod(spec.obs_shape))  # obs and next-obs stacks, uint8
    return Stage(f"decode + assemble ({game})", "batch", t, 1, out_bytes, STEPS_PER_S * REFERENCE_BATCH / batch)


def loader_scaling(frames: list[list], spec, per_thread: int) -> dict[int, tuple[float, float]]:
    """{threads: (batches/s wall, CPU s per batch of the loader threads)} for 1 and 2 loader threads, each
    assembling ``per_thread`` batches after one to warm up (lz4 and torch release the GIL; the rest holds it)."""
    import torch
    out = {}
    for threads in (1, 2):
        go = threading.Barrier(threads + 1)
        cpu = [0.0] * threads

        def work(k: int) -> None:
            torch.set_num_threads(1)  # as a loader thread
            assemble(frames[k % len(frames)], spec)  # a new thread's first batch: its allocations
            go.wait()
            c = time.thread_time()
            for i in range(per_thread):
                assemble(frames[(i + k) % len(frames)], spec)
            cpu[k] = time.thread_time() - c

        workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        for w in workers:
            w.start()
        go.wait()
        w0 = time.perf_counter()
        for w in workers:
            w.join()
        wall = time.perf_counter() - w0
        out[threads] = (threads * per_thread / wall, sum(cpu) / (threads * per_thread))
    return out


# ----------------------------------------------------------------------------------------- trainer loop
class TrivialRule:
    """A learning rule whose step costs nothing: fixed priorities and loss."""

    def __init__(self, batch: int) -> None:
        import torch
        self.steps = 0
        self._out = (torch.rand(batch), torch.tensor(0.5))

    def step_tensors(self, b):
        self.steps += 1
        return self._out


def trainer_loop_stage(batch: int, args) -> Stage:
    """``learner.main.train`` with a trivial step: per step, its bookkeeping, the update's FIFO, encoding and
    a ZeroMQ send (an in-process PULL drained by another thread, whose CPU is not counted)."""
    import torch
    import zmq

    from apex_zmq.transport import send_until
    from learner.dqn import Batch
    from learner.main import MAX_PENDING, train
    from learner.readback import CpuCopier, PendingUpdates
    ctx = zmq.Context.instance()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.bind("inproc://datapath-priorities")
    push.connect("inproc://datapath-priorities")
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            if pull.poll(100):
                pull.recv_multipart(copy=False)

    drainer = threading.Thread(target=drain)
    drainer.start()
    z = torch.zeros(batch)
    b = Batch(obs=z, action=z.long(), ret=z, disc=z, next_obs=z, weight=z, ids=np.arange(batch, dtype=np.int64))
    steps = 200
    cpu, wall = [], []
    try:
        while len(cpu) < args.min_calls or sum(wall) < args.seconds:
            cfg = SimpleNamespace(max_learner_steps=steps, weights_period=1e9, checkpoint_period=1e9)
            core = SimpleNamespace(cfg=cfg, learner=TrivialRule(batch), resumed_from=-1, wait_s=0.0, train_s=0.0,
                                   bad_items=0, loss=float("nan"), weights=lambda seq: [], save=lambda: None)
            pending = PendingUpdates(CpuCopier(), MAX_PENDING, 1)
            c0, w0 = time.thread_time(), time.perf_counter()
            train(core, lambda: b, lambda msg: send_until(push, msg, stop), lambda frames: None, stop.is_set,
                  pending)
            cpu.append(time.thread_time() - c0)
            wall.append(time.perf_counter() - w0)
    finally:
        stop.set()
        drainer.join()
        push.close(0)
        pull.close(0)
    # per call: a round of ``steps`` steps (each update: ids int64 + priorities float32)
    return Stage("trainer loop (trivial step)", "step", Timing(cpu, wall), steps, steps * batch * 12, STEPS_PER_S)


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capacity", type=int, default=1_000_000, help="Pong transitions in the replay")
    ap.add_argument("--batch", type=int, default=REFERENCE_BATCH)
    ap.add_argument("--chunks", type=int, default=40, help="real chunks made per game (the pool)")
    ap.add_argument("--envs", type=int, default=32, help="envs of the actor core making them")
    ap.add_argument("--batches", type=int, default=8, help="distinct sampled batches the loader stages cycle")
    ap.add_argument("--seconds", type=float, default=3.0, help="least wall time per stage")
    ap.add_argument("--min-calls", type=int, default=5, help="least calls per stage")
    ap.add_argument("--scaling-batches", type=int, default=20, help="batches per loader thread")
    ap.add_argument("--samples-per-insert", type=float, default=1.0,
                    help="sampled transitions per inserted one, for the insert stage's cores")
    args = ap.parse_args(argv)
    print_machine()
    import torch

    from apex_zmq.envs import env_spec
    torch.set_num_threads(1)  # the loader's and the replay's budget: one thread each
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; batch {args.batch}; "
          f"cores sized for {STEPS_PER_S} learner steps/s at batch {REFERENCE_BATCH}, inserts at "
          f"{args.samples_per_insert:g} sampled per inserted transition", flush=True)
    pools, specs = {}, {}
    for game, env in (("pong", "ALE/Pong-v5"), ("mspacman", "ALE/MsPacman-v5")):
        t = time.perf_counter()
        pools[game], specs[game] = real_chunks(env, args.chunks, args.envs), env_spec(env)
        n = sum(len(c.action) for c in pools[game])
        size = sum(len(c.frame_data) for c in pools[game]) / n
        print(f"{env}: {n} real transitions in {time.perf_counter() - t:.0f}s, {size:.0f} compressed frame "
              f"bytes per transition", flush=True)
    # The loader stages first, in a process that has not yet held the large replay: measured after it (freed),
    # Pong's batch cost 3x its CPU here (31 ms against 9.5-11 ms; most likely the allocator's state, each
    # batch allocating ~60 MB afresh), which a learner process (no replay in it) does not pay.
    frames = {g: encoded_batches(pools[g], args.batch, args.batches) for g in pools}
    rows = [loader_stage(g, frames[g], specs[g], args.batch, args) for g in ("pong", "mspacman")]
    scale = loader_scaling(frames["pong"], specs["pong"], args.scaling_batches)
    rows.append(trainer_loop_stage(args.batch, args))
    rows = replay_stages(pools["pong"], args.capacity, args.batch, args.samples_per_insert, args) + rows
    print(f"per item: CPU (this thread), wall, bytes produced, a memcpy of those bytes in this run, cores for "
          f"{STEPS_PER_S} learner steps/s x {REFERENCE_BATCH}", flush=True)
    for r in rows:
        print(r.line(), flush=True)
    print(f"cores for {STEPS_PER_S} steps/s x {REFERENCE_BATCH}, all stages above (Pong loader): "
          f"{sum(r.cores for r in rows if 'mspacman' not in r.name):.1f}", flush=True)
    (one, cpu1), (two, cpu2) = scale[1], scale[2]
    print(f"loader threads (Pong): 1 thread {one:.1f} batches/s ({cpu1 * 1e3:.1f} ms CPU per batch), 2 threads "
          f"{two:.1f} batches/s ({cpu2 * 1e3:.1f} ms CPU per batch): x{two / one:.2f}", flush=True)
    by = {r.name: r for r in rows}
    print(f"learner_batch_cpu_ms={by['decode + assemble (pong)'].cpu * 1e3:.2f} "
          f"mspacman_batch_cpu_ms={by['decode + assemble (mspacman)'].cpu * 1e3:.2f} "
          f"replay_sample_update_ms={by['replay sample + update'].cpu * 1e3:.3f} loaders_scaling={two / one:.2f}")


if __name__ == "__main__":
    main()
