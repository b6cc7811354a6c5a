"""How long a replay snapshot stalls the replay server's event loop, with Atari transitions.

A ``ReplayService`` (the replay server's core) is filled to ``--transitions`` (its capacity) with real
Pong chunks: a pool of chunks made by the actor's own core (ale-py, epsilon ladder, n-step, lz4
4x84x84 stacks; random Q values in place of the network) is encoded once and inserted again and again,
each insert storing its own copy of the frames as a server does. Then an asyncio loop drives it as the
server's tasks do: a sampler takes batches of ``--batch`` back to back (``sample_frames``, encoded)
and applies a priority update for each (``on_priorities``, as the learner's updates arrive), an
inserter adds chunks at ``--insert-rate`` transitions/s (``on_experience``), and a ticker notes each
turn of the loop. A snapshot is taken and written meanwhile, in two ways, ``--rounds`` times each:

* old: the way before ``ReplaySnapshot``, kept verbatim below as the reference: the whole store is
  copied on the loop, then ``np.savez`` writes it in a thread;
* new: ``ReplayService.snapshot``, the server's own snapshot task: copy-on-write slices of 64Ki slots
  between loop turns, then a streaming write in a thread.

The pause is the longest gap between two loop turns from the snapshot's start until its file is
written (sampling a batch takes a turn milliseconds by itself: ``idle`` is the same window with no
snapshot, for reference). Wall-clock gaps also hold the time the process was not scheduled and the time the loop
waited for the GIL held by the writing thread; the CPU time the loop's thread spent in its longest turn
leaves out both, and the snapshot's own work on the loop (the old whole copy, or each new slice) is
timed apart. Every figure is the worst over the rounds.

    .venv/bin/python bench/replay_snapshot.py [--transitions 1000000] [--rounds 2]

Last line: ``snapshot_pause_max_ms=<new> old_pause_max_ms=<old> idle_pause_max_ms=<no snapshot>``, the
same as CPU time of the longest turn (``*_turn_cpu_max_ms``) and of the longest piece of snapshot work
on the loop (``*_step_cpu_max_ms``), then ``snapshot_s=<new: take + write> old_snapshot_s=<old>
transitions=<n>``.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, print_machine, real_chunks  # noqa: E402

sys.path.insert(0, str(ROOT))  # before bench/, whose replay_server.py would shadow the package

from apex_zmq.config import ReplayConfig  # noqa: E402
from apex_zmq.wire import PriorityUpdate, decode_sample, encode  # noqa: E402
from replay_server.main import ReplayService  # noqa: E402
from replay_server.replay import PrioritizedReplay  # noqa: E402

ENV = "ALE/Pong-v5"


# ----------------------------------------------------------------- the reference: the code as of commit 5808b12

def old_snapshot(r: PrioritizedReplay) -> dict[str, Any]:
    """``PrioritizedReplay.snapshot`` before slices: every per-slot array copied at once, on the loop."""
    cids = sorted(r._chunks)
    return {
        "meta": np.array([r.capacity, r.next_id, r._next_chunk, r.stale_updates], dtype=np.int64),
        "alpha": np.array([r.alpha, r.priority_eps]),
        "obs_spec": np.array([repr(r.obs_shape), str(r.obs_dtype)]),
        **{f"slot_{k}": getattr(r, k).copy() for k in r._SLOT_ARRAYS},
        "leaves": r.tree.get(np.arange(r.capacity)),
        "chunk_ids": np.array(cids, dtype=np.int64),
        "chunk_live": np.array([r._live[c] for c in cids], dtype=np.int64),
        "chunks": [r._chunks[c] for c in cids],
    }


def old_write_snapshot(state: dict[str, Any], path: Path) -> None:
    """``PrioritizedReplay.write_snapshot`` before streaming: ``np.savez`` of every array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: v for k, v in state.items() if k != "chunks"}
    for i, data in enumerate(state["chunks"]):
        arrays[f"c{i}"] = np.frombuffer(data, dtype=np.uint8)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


async def old_way(svc: ReplayService, steps: list[float]) -> None:
    """The server's snapshot task before slices; the CPU time of its copy goes to ``steps``."""
    t = time.thread_time()
    state = old_snapshot(svc.replay)
    steps.append(time.thread_time() - t)
    await asyncio.to_thread(old_write_snapshot, state, svc.snapshot_path)


async def new_way(svc: ReplayService, steps: list[float]) -> None:
    """``ReplayService.snapshot``, the server's snapshot task; the CPU time of each slice copied on the
    loop goes to ``steps`` (the snapshot's ``copy`` is timed, nothing else changes)."""
    begin = svc.replay.begin_snapshot

    def timed_begin():
        snap = begin()
        copy = snap.copy

        def timed_copy(n: int) -> bool:
            t = time.thread_time()
            done = copy(n)
            steps.append(time.thread_time() - t)
            return done
        snap.copy = timed_copy
        return snap
    svc.replay.begin_snapshot = timed_begin
    try:
        await svc.snapshot()
    finally:
        del svc.replay.begin_snapshot  # the method again


# ----------------------------------------------------------------- the loop under load


def encoded_chunks(env: str, count: int) -> tuple[list[list[bytes]], int]:
    """``count`` real chunks of ``env``, encoded for the wire; and the transitions in each."""
    chunks = real_chunks(env, count)
    return [[bytes(f) for f in encode(c)] for c in chunks], len(chunks[0].action)


@dataclass
class Window:
    """What the loop did while one snapshot was taken and written."""

    seconds: float = 0.0
    pause_max: float = 0.0      # longest gap between two loop turns
    cpu_max: float = 0.0        # most CPU time the loop's thread spent in one turn
    sample_gap_max: float = 0.0  # longest gap between two sampled batches
    batches: int = 0
    inserted: int = 0
    gaps: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)  # CPU of each piece of snapshot work on the loop


async def under_load(svc: ReplayService, pool: list[list], per_chunk: int, rate: float,
                     snapshot: Callable[[ReplayService, list[float]], Awaitable[None]] | None,
                     idle_s: float) -> Window:
    """Run sampling, updates and inserts on this loop while ``snapshot()`` runs (or, without one,
    for ``idle_s``); measure the loop's turns over that window."""
    w = Window()
    stop = asyncio.Event()
    measuring = False
    rng = np.random.default_rng(0)

    async def ticker() -> None:
        last, last_cpu = time.perf_counter(), time.thread_time()
        while not stop.is_set():
            await asyncio.sleep(0)
            now, now_cpu = time.perf_counter(), time.thread_time()
            if measuring:
                w.gaps.append(now - last)
                w.cpu.append(now_cpu - last_cpu)
            last, last_cpu = now, now_cpu

    async def sampler() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            s = decode_sample(svc.sample_frames())
            svc.on_priorities(encode(PriorityUpdate(sender="learner", seq=s.seq, ids=s.ids,
                                                    priority=rng.random(len(s.ids)).astype(np.float32),
                                                    incarnation=s.incarnation)))
            now = time.perf_counter()
            if measuring:
                w.batches += 1
                w.sample_gap_max = max(w.sample_gap_max, now - last)
            last = now
            await asyncio.sleep(0)

    async def inserter() -> None:
        i, t0 = 0, time.perf_counter()
        while not stop.is_set():
            svc.on_experience(pool[i % len(pool)])
            i += 1
            if measuring:
                w.inserted += per_chunk
            await asyncio.sleep(max(0.0, t0 + i * per_chunk / rate - time.perf_counter()))

    tasks = [asyncio.create_task(t()) for t in (ticker, sampler, inserter)]
    await asyncio.sleep(0.5)  # settled
    measuring = True
    t0 = time.perf_counter()
    if snapshot is None:
        await asyncio.sleep(idle_s)
    else:
        await snapshot(svc, w.steps)
    w.seconds = time.perf_counter() - t0
    measuring = False
    stop.set()
    await asyncio.gather(*tasks)
    w.pause_max = max(w.gaps, default=0.0)
    w.cpu_max = max(w.cpu, default=0.0)
    return w


def describe(name: str, w: Window) -> str:
    g = np.array(w.gaps) * 1e3
    return (f"{name}: {w.seconds:.2f}s; loop pause max {w.pause_max * 1e3:.1f} ms (p99 {np.percentile(g, 99):.1f}, "
            f"{len(g)} turns); most CPU in one turn {w.cpu_max * 1e3:.1f} ms"
            + (f", of which snapshot work on the loop at most {max(w.steps) * 1e3:.1f} ms "
               f"({len(w.steps)} pieces, {sum(w.steps) * 1e3:.0f} ms in all)" if w.steps else "")
            + f"; longest gap between batches {w.sample_gap_max * 1e3:.1f} ms; "
            f"{w.batches} batches sampled and {w.inserted} transitions inserted meanwhile")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transitions", type=int, default=1_000_000, help="replay capacity, filled")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--insert-rate", type=float, default=10_000.0, help="transitions/s while measuring")
    ap.add_argument("--pool", type=int, default=4, help="real chunks made once and inserted again and again")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print_machine()
    t0 = time.monotonic()
    # Made in a child process: torch and the actor core would leave this one with five times the Python
    # objects of a replay server, and its garbage collector's full passes would cost five times as much.
    with mp.get_context("spawn").Pool(1) as child:
        pool, per_chunk = child.apply(encoded_chunks, (ENV, args.pool))
    print(f"{args.pool} real {ENV} chunks of {per_chunk} transitions in {time.monotonic() - t0:.0f}s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        svc = ReplayService(ReplayConfig(env=ENV, capacity=args.transitions, batch_size=args.batch,
                                         min_size=args.batch, run_dir=tmp, snapshot_period=1.0))
        t0, i = time.monotonic(), 0
        while svc.replay.size < args.transitions:
            svc.on_experience(pool[i % len(pool)])
            i += 1
        r = svc.replay
        slot_mb = (sum(getattr(r, k).nbytes for k in r._SLOT_ARRAYS) + 8 * r.capacity) / 2**20
        print(f"filled {r.size} transitions in {time.monotonic() - t0:.0f}s: {r.stored_bytes / 2**20:.0f} MiB "
              f"of lz4 frames in {len(r._chunks)} chunks, {slot_mb:.0f} MiB of per-slot arrays and leaves",
              flush=True)

        def run(snapshot: Callable[[ReplayService, list[float]], Awaitable[None]] | None,
                idle_s: float = 0.0) -> Window:
            return asyncio.run(under_load(svc, pool, per_chunk, args.insert_rate, snapshot, idle_s))

        old: list[Window] = []
        new: list[Window] = []
        idle = run(None, idle_s=3.0)
        print(describe("no snapshot", idle), flush=True)
        for k in range(args.rounds):
            old.append(run(old_way))
            print(describe(f"old (whole copy on the loop, np.savez in a thread), round {k + 1}", old[-1]), flush=True)
            new.append(run(new_way))
            print(describe(f"new (copy-on-write slices, streamed write in a thread), round {k + 1}", new[-1]),
                  flush=True)
        size_mb = svc.snapshot_path.stat().st_size / 2**20
        back = PrioritizedReplay.load_snapshot(svc.snapshot_path, args.transitions, svc.cfg.alpha)
        assert back.size == args.transitions and back.next_id <= svc.replay.next_id
        print(f"snapshot file {size_mb:.0f} MiB; restores {back.size} transitions", flush=True)

    def worst(ws: list[Window], attr: str) -> float:
        return max(getattr(w, attr) for w in ws)
    print(f"snapshot_pause_max_ms={worst(new, 'pause_max') * 1e3:.1f} "
          f"old_pause_max_ms={worst(old, 'pause_max') * 1e3:.1f} "
          f"idle_pause_max_ms={idle.pause_max * 1e3:.1f} "
          f"snapshot_turn_cpu_max_ms={worst(new, 'cpu_max') * 1e3:.1f} "
          f"old_turn_cpu_max_ms={worst(old, 'cpu_max') * 1e3:.1f} "
          f"idle_turn_cpu_max_ms={idle.cpu_max * 1e3:.1f} "
          f"snapshot_step_cpu_max_ms={max(max(w.steps) for w in new) * 1e3:.1f} "
          f"old_step_cpu_max_ms={max(max(w.steps) for w in old) * 1e3:.1f} "
          f"snapshot_s={worst(new, 'seconds'):.2f} old_snapshot_s={worst(old, 'seconds'):.2f} "
          f"transitions={args.transitions}")


if __name__ == "__main__":
    main()
