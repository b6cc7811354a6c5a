"""Replay server throughput over ZeroMQ with 1M Atari transitions, next to cpprb in-process.

Three processes, all real: the replay server (``python -m replay_server.main``, capacity
``--size``), a producer that fills it with real Pong chunks (made by the actor's own core with random
Q values; a pool of encoded chunks is resent) and then keeps pushing at ``--insert-rate``
transitions/s, and a consumer that receives batches of ``--batch`` (strict decode) and returns a
priority update for every batch. Batches/s is counted at the consumer over ``--seconds``, twice on the
same filled server: first as the server delivers them (lz4-compressed frame tables, decoded but not
decompressed), then with the consumer also decompressing and stacking each batch into obs / next-obs
tensors as the learner's loader does (``learner.dqn.batch_from_sample``, one thread, 1 torch thread),
which is the form cpprb hands over.

The reference is cpprb's ``PrioritizedReplayBuffer`` holding the same number of transitions of the
same frames (obs with ``next_of`` and ``stack_compress``, cpprb's memory-saving Atari layout),
timed on ``sample(batch)`` + ``update_priorities`` in this process, after the system above stopped.

    .venv/bin/python bench/replay_server.py [--size 1000000] [--batch 512] [--insert-rate 10000]
    .venv/bin/python bench/replay_server.py --shards 2 [--size 200000] ...

``--shards N``: sharded replay instead (and no cpprb). The same load on one replay server, then on N
shards (``--replay-shards N``, each holding ``--size / N``), with a cheap learner side: a consumer that
decodes each batch strictly (no decompression), draws the shard as the learner does
(``learner.shards.draw_shard``) and returns every priority update to the shard that sampled it. Last
line: ``shard_ratio=<batches/s with N shards / with one>``.

Last line: ``replay_batches_per_s=<x> [...] replay_stacked_batches_per_s=<z> [...] cpprb_batches_per_s=<y>
[...] ratio=<x/y> stacked_ratio=<z/y>``, each figure followed in brackets by what that side delivers.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ROOT, endpoints, feed, free_port_base, print_machine, producer, real_chunks,  # noqa: E402
                     wait_for_metric)

ENV = "ALE/Pong-v5"


def consumer(samples: str, priorities: str, start: mp.Event, stacked: mp.Event, stop: mp.Event,
             out: mp.Queue) -> None:
    """Receive batches, decode them strictly, send back one priority update per batch.

    Counts from ``start`` until ``stacked`` as delivered (frames left compressed), then from
    ``stacked`` until ``stop`` with each batch also decompressed and stacked as the learner's loader does.
    """
    import torch
    import zmq

    from apex_zmq.envs import env_spec
    from apex_zmq.wire import PriorityUpdate, decode_sample, encode
    from learner.dqn import batch_from_sample
    torch.set_num_threads(1)  # a loader thread's budget (the launcher gives each role 1 torch thread here)
    spec = env_spec(ENV)
    cpu_dev = torch.device("cpu")
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 4)
    pull.connect(samples)
    push = ctx.socket(zmq.PUSH)
    push.connect(priorities)
    rng = np.random.default_rng(0)
    counted, t0, phase = 0, None, "consumer_batches_per_s"
    while not stop.is_set():
        if phase == "consumer_batches_per_s" and stacked.is_set():  # switch: report, count afresh
            out.put((phase, counted / (time.monotonic() - t0) if t0 else 0.0))
            counted, t0, phase = 0, None, "consumer_stacked_batches_per_s"
        if not pull.poll(200):
            continue
        batch = decode_sample(pull.recv_multipart(copy=False))
        if phase == "consumer_stacked_batches_per_s":
            b = batch_from_sample(batch, spec.num_actions, cpu_dev, obs_spec=(spec.obs_shape, spec.obs_dtype))
            assert b.obs.shape == (len(batch.ids), *spec.obs_shape) and not len(b.bad_ids)
        push.send_multipart(encode(PriorityUpdate(sender="learner", seq=batch.seq, ids=batch.ids,
                                                  priority=rng.random(len(batch.ids)).astype(np.float32),
                                                  incarnation=batch.incarnation)))  # else dropped as stale
        if start.is_set():
            if t0 is None:
                t0 = time.monotonic()
            else:
                counted += 1
    out.put((phase, counted / (time.monotonic() - t0) if t0 else 0.0))


def shard_consumer(samples: list[str], priorities: list[str], start: mp.Event, stop: mp.Event,
                   out: mp.Queue) -> None:
    """The learner's side, cheap: strict decode, the learner's shard draw, one priority update per batch
    to the shard it came from; counts batches/s from ``start`` until ``stop``."""
    import zmq

    from apex_zmq.wire import PriorityUpdate, decode_sample, encode
    from learner.shards import draw_shard
    ctx = zmq.Context.instance()
    pulls, pushes = [], []
    for s_ep, p_ep in zip(samples, priorities):
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVHWM, 1)
        pull.connect(s_ep)
        push = ctx.socket(zmq.PUSH)
        push.connect(p_ep)
        pulls.append(pull)
        pushes.append(push)
    poller = zmq.Poller()
    for sk in pulls:
        poller.register(sk, zmq.POLLIN)
    masses: list[float | None] = [None] * len(pulls)
    rng = np.random.default_rng(0)
    counted, t0 = 0, None
    while not stop.is_set():
        ready = dict(poller.poll(0)) or dict(poller.poll(200))
        i = draw_shard(masses, [sk in ready for sk in pulls], rng)
        if i is None:
            continue
        batch = decode_sample(pulls[i].recv_multipart(copy=False))
        masses[i] = batch.mass
        pushes[batch.shard].send_multipart(encode(PriorityUpdate(
            sender="learner", seq=batch.seq, ids=batch.ids, priority=rng.random(len(batch.ids)).astype(np.float32),
            incarnation=batch.incarnation)))
        if start.is_set():
            if t0 is None:
                t0 = time.monotonic()
            else:
                counted += 1
    out.put(("shard_batches_per_s", counted / (time.monotonic() - t0) if t0 else 0.0))


def run_shards(shards: int, size: int, batch: int, rate: float, seconds: float, chunks: list) -> float:
    """Batches/s that ``shards`` replay servers (``size`` transitions in all) deliver to a cheap consumer."""
    import zmq

    from apex_zmq import config as C
    base = free_port_base()
    ep = endpoints(base)
    flags = [x for k, v in ep.items() for x in (f"--{k}", v)]
    cfg = C.ReplayConfig(env=ENV, replay_shards=shards, **ep)
    shard_eps = {name: C.shard_endpoints(cfg, name) for name in C.SHARD_ENDPOINTS}
    ctx = zmq.Context.instance()
    tel = ctx.socket(zmq.SUB)
    tel.setsockopt(zmq.SUBSCRIBE, b"")
    tel.bind(ep["telemetry"])
    spawn = mp.get_context("spawn")
    throttle, start, stop, out = spawn.Event(), spawn.Event(), spawn.Event(), spawn.Queue()
    per = size // shards
    with tempfile.TemporaryDirectory() as tmp:
        servers = [subprocess.Popen(
            [sys.executable, "-m", "replay_server", "--env", ENV, "--run-dir", tmp, *flags,
             "--replay-shards", str(shards), "--shard", str(i), "--capacity", str(per), "--min-size", str(per),
             "--batch-size", str(batch), "--telemetry-period", "1"], cwd=ROOT) for i in range(shards)]
        prod = spawn.Process(target=feed, args=(shard_eps["experience"], chunks, size, rate, throttle, stop, out))
        cons = spawn.Process(target=shard_consumer, args=(shard_eps["samples"], shard_eps["priorities"], start,
                                                          stop, out))
        prod.start()
        cons.start()
        try:
            t0 = time.monotonic()
            # Round robin over the shards splits the fill about evenly, not exactly (each holds at most
            # ``per``): 90% of a shard's share is filled enough.
            for i in range(shards):
                wait_for_metric(tel, f"replay/{i}/size" if shards > 1 else "replay/size", int(0.9 * per),
                                timeout=300)
            print(f"{shards} shard(s): filled {size} transitions in {time.monotonic() - t0:.0f}s", flush=True)
            throttle.set()
            time.sleep(3)
            start.set()
            time.sleep(seconds)
            stop.set()
            results = dict(out.get(timeout=30) for _ in range(3))
            prod.join(30)
            cons.join(30)
        finally:
            stop.set()
            for s in servers:
                s.terminate()
            for s in servers:
                s.wait(30)
            for p in (prod, cons):
                if p.is_alive():
                    p.kill()
    print(f"{shards} shard(s): {results['shard_batches_per_s']:.1f} batches/s of {batch} at the consumer; "
          f"producer {results['producer_rate']:.0f} transitions/s", flush=True)
    return results["shard_batches_per_s"]


def run_system(size: int, batch: int, rate: float, seconds: float) -> tuple[float, float, dict]:
    """Batches/s of the replay server process at ``size`` transitions under load, as delivered and
    with the consumer decompressing and stacking each batch."""
    import zmq

    from apex_zmq.wire import decode_telemetry
    base = free_port_base()
    ep = endpoints(base)
    flags = [x for k, v in ep.items() for x in (f"--{k}", v)]
    ctx = zmq.Context.instance()
    tel = ctx.socket(zmq.SUB)
    tel.setsockopt(zmq.SUBSCRIBE, b"")
    tel.bind(ep["telemetry"])
    spawn = mp.get_context("spawn")
    throttle, start, stacked, stop, out = spawn.Event(), spawn.Event(), spawn.Event(), spawn.Event(), spawn.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [sys.executable, "-m", "replay_server", "--env", ENV, "--run-dir", tmp, *flags,
             "--capacity", str(size), "--min-size", str(size), "--batch-size", str(batch),
             "--telemetry-period", "1"], cwd=ROOT)
        prod = spawn.Process(target=producer, args=(ENV, ep["experience"], 40, size, rate, throttle, stop, out))
        cons = spawn.Process(target=consumer, args=(ep["samples"], ep["priorities"], start, stacked, stop, out))
        prod.start()
        cons.start()
        try:
            t0 = time.monotonic()
            wait_for_metric(tel, "replay/size", size, timeout=600)
            print(f"filled {size} transitions in {time.monotonic() - t0:.0f}s", flush=True)
            throttle.set()
            time.sleep(3)  # let the paced producer and sampling settle
            start.set()
            tel_rates: list[dict] = []  # server telemetry while the consumer takes batches as delivered
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end:
                if tel.poll(500):
                    tel_rates.append(decode_telemetry(tel.recv_multipart()).metrics)
            stacked.set()
            time.sleep(1)
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end:
                if tel.poll(500):
                    tel.recv_multipart()  # drained, not used
            stop.set()
            results = dict(out.get(timeout=30) for _ in range(4))
            prod.join(30)
            cons.join(30)
        finally:
            stop.set()
            server.terminate()
            server.wait(30)
            for p in (prod, cons):
                if p.is_alive():
                    p.kill()
    med = {k: float(np.median([m[k] for m in tel_rates if k in m]))
           for k in ("replay/inserted_per_s", "replay/sampled_per_s", "replay/updated_per_s", "replay/size")}
    results.update(med)
    return results["consumer_batches_per_s"], results["consumer_stacked_batches_per_s"], results


def run_cpprb(size: int, batch: int, seconds: float) -> float:
    """sample(batch) + update_priorities(batch) per second of cpprb holding ``size`` transitions."""
    try:
        from cpprb import PrioritizedReplayBuffer
    except ImportError:
        raise SystemExit("cpprb is needed for the reference: .venv/bin/pip install -r requirements-bench.txt")

    from apex_zmq.wire import decompress_frames
    chunks = real_chunks(ENV, 8, frames_once=False)  # whole stacks: cpprb stores them itself
    frames = np.concatenate([decompress_frames(c.frame_data, c.frame_offsets, c.obs_shape, c.obs_dtype)
                             for c in chunks])
    rb = PrioritizedReplayBuffer(size, {"obs": {"shape": (4, 84, 84), "dtype": np.uint8},
                                        "act": {"dtype": np.int64}, "rew": {}, "done": {}},
                                 next_of="obs", stack_compress="obs", alpha=0.6)
    step = 1000
    rng = np.random.default_rng(0)
    t0 = time.monotonic()
    for start in range(0, size, step):
        idx = (np.arange(start, start + step) % (len(frames) - 1))
        rb.add(obs=frames[idx], next_obs=frames[idx + 1], act=rng.integers(0, 6, step),
               rew=rng.random(step), done=np.zeros(step), priorities=rng.random(step) + 0.01)
    print(f"cpprb: filled {rb.get_stored_size()} transitions in {time.monotonic() - t0:.0f}s", flush=True)
    for _ in range(5):
        s = rb.sample(batch, beta=0.4)
        rb.update_priorities(s["indexes"], rng.random(batch) + 0.01)
    n, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < seconds:
        s = rb.sample(batch, beta=0.4)
        rb.update_priorities(s["indexes"], rng.random(batch) + 0.01)
        n += 1
    return n / (time.monotonic() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--insert-rate", type=float, default=10_000.0, help="transitions/s while measuring")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--shards", type=int, default=0, help="sharded replay: N shards against one (no cpprb)")
    args = ap.parse_args()
    print_machine()
    if args.shards:
        chunks = real_chunks(ENV, 40)  # made once: both runs resend the same real Pong chunks
        one = run_shards(1, args.size, args.batch, args.insert_rate, args.seconds, chunks)
        many = run_shards(args.shards, args.size, args.batch, args.insert_rate, args.seconds, chunks)
        print(f"one_shard_batches_per_s={one:.1f} shards_batches_per_s={many:.1f} [{args.shards} shards] "
              f"shard_ratio={many / one if one else float('nan'):.2f}")
        return
    ours, stacked, r = run_system(args.size, args.batch, args.insert_rate, args.seconds)
    print(f"replay server: {ours:.0f} batches/s of {args.batch} at the consumer; producer "
          f"{r['producer_rate']:.0f} transitions/s; server telemetry medians: "
          f"inserted {r['replay/inserted_per_s']:.0f}/s, sampled {r['replay/sampled_per_s']:.0f}/s, "
          f"updated {r['replay/updated_per_s']:.0f}/s, size {r['replay/size']:.0f}", flush=True)
    if not r["replay/updated_per_s"] > 0:
        print("WARNING: the server applied no priority updates (telemetry replay/updated_per_s is 0): "
              "the consumer's updates were dropped, so the figures below are not the real workload", flush=True)
    print(f"replay server, consumer decompressing and stacking each batch (batch_from_sample, 1 thread): "
          f"{stacked:.0f} batches/s of {args.batch}", flush=True)
    ref = run_cpprb(args.size, args.batch, args.seconds)
    print(f"cpprb PrioritizedReplayBuffer: {ref:.0f} batches/s (sample + update_priorities, in-process)")
    print(f"replay_batches_per_s={ours:.0f} [lz4-compressed frame tables over ZeroMQ] "
          f"replay_stacked_batches_per_s={stacked:.0f} [over ZeroMQ, decompressed and stacked by the consumer "
          f"as the learner's loader does] cpprb_batches_per_s={ref:.0f} [decompressed obs/next-obs stacks "
          f"in-process] ratio={ours / ref:.2f} stacked_ratio={stacked / ref:.2f}")


if __name__ == "__main__":
    main()
