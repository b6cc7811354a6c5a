"""Gradient updates/s applied by the learner as the asynchronous family's parameter server, against the
same optimizer step in-process, with 1, 2 and 4 pushing clients.

System: the real learner program (``python -m learner --algo a3c --env ALE/Pong-v5 --hidden 256
--torch-threads 1 --device cpu``, a temporary ``--run-dir``): its PULL on ``--gradients`` takes
gradients messages, ``wire.decode_gradients`` validates them, ``ParameterServer.apply`` steps the shared
RMSProp (gradient-norm clip included), and it publishes its weights every ``--weights-period`` (the
Atari preset's 0.1 s). Its updates/s is read from its own telemetry (``learner/updates_per_s``, a SUB
bound on its ``--telemetry`` endpoint): the median of the per-second reports over ``--seconds`` per
client count, after ``--warmup`` seconds.

Clients: N separate processes (``--clients``, default 1,2,4), each a PUSH connected to the learner's
gradients endpoint (high-water mark 2 and IMMEDIATE, as an actor-learner's) that sends valid gradients
messages as fast as backpressure allows. The gradients are real: A3C's loss on random Pong frames
(80 steps, t_max 5 x 16 envs), backpropagated through the same network, ``--pool`` of them computed
once in this process and shipped to every client; a client re-encodes only the header per message
(``wire.encode`` references the arrays, no copy). Each client subscribes to the learner's weights
(high-water mark 2, as an actor-learner) and reads only their header, so every gradient names the
learner's incarnation (a gradient from another learner process is dropped as stale) and the newest
weights version the client has seen. Staleness: the clients compute nothing, so gradients queue at the
learner (its PULL high-water mark 16, the clients' 2 each, kernel buffers) and the learner publishes
only every 0.1 s: a gradient can be more than the preset's 32 updates old when it is applied. The
bench passes ``--max-staleness 1000000000`` so none is dropped and every message received costs a full
update (the staleness the learner saw is printed: ``learner/staleness`` and ``learner/staleness_max``).

In-process: the same ``ParameterServer`` (built by ``learner.algos.make_rule`` from the same flags),
``apply`` on the same decoded messages in a loop (each stamped with the server's current version), same
torch threads (1), for ``--seconds``, after the system part (the learner stopped). Also printed, not
used in the efficiency: decode (``wire.decode_gradients`` on the encoded frames) plus apply.

The network: Mnih et al. 2016's Atari network (16 8x8/4 and 32 4x4/2 convolutions, 256 hidden units,
policy and value heads: 677,943 parameters, a 2.7 MB float32 gradient). ``--hidden 256`` is passed
explicitly: the learner's Atari preset has ``hidden`` 512 (Ape-X's dueling head), which would make it
1,343,543 parameters.

    .venv/bin/python bench/gradient_server.py [--clients 1,2,4] [--seconds 10] [--dtype float32|bfloat16]

Last line: ``inprocess_updates_per_s=<y> updates_per_s_<N>=<x> efficiency_<N>=<x/y> ...`` for each N.
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
from _common import ROOT, endpoints, free_port_base, print_machine  # noqa: E402

ENV = "ALE/Pong-v5"
ALGO = "a3c"
T_MAX, ENVS = 5, 16  # the Atari preset's t_max and envs per actor-learner: 80 steps per gradient
NO_STALENESS_LIMIT = 1_000_000_000
CLIENT_HWM = 2  # an actor-learner's gradients PUSH and weights SUB (actor/actor_learner.py)


def learner_flags(hidden: int, run_dir: str) -> list[str]:
    """The flags shared by the learner process and the in-process server."""
    return ["--env", ENV, "--algo", ALGO, "--hidden", str(hidden), "--run-dir", run_dir, "--torch-threads", "1",
            "--device", "cpu", "--max-staleness", str(NO_STALENESS_LIMIT)]


def gradient_pool(hidden: int, count: int, dtype: str) -> list[tuple[list[str], list, float, float]]:
    """``count`` real A3C gradients (names, arrays, loss, entropy) on random Pong frames, as a client sends them."""
    import torch

    from apex_zmq.asyncrl import a3c_loss, gradient_arrays
    from apex_zmq.envs import env_spec
    from apex_zmq.models import build_network
    spec = env_spec(ENV)
    net = build_network(spec, hidden, ALGO)
    gen = torch.Generator().manual_seed(0)
    pool = []
    n = T_MAX * ENVS
    for _ in range(count):
        obs = torch.randint(0, 256, (n, *spec.obs_shape), dtype=torch.uint8, generator=gen)
        actions = torch.randint(0, spec.num_actions, (n,), generator=gen)
        returns = torch.randn(n, generator=gen)
        net.zero_grad(set_to_none=True)
        logits, values = net(obs)
        loss, entropy = a3c_loss(logits, values, actions, returns, torch.ones(n, dtype=torch.bool), 0.01, 0.5)
        loss.backward()
        names, arrays = gradient_arrays(net, dtype)
        pool.append((names, arrays, float(loss.detach()), float(entropy)))
    return pool


def client(index: int, gradients_ep: str, weights_ep: str, pool: list, dtype: str, stop, out) -> None:
    """Process body: push gradients at the learner's newest weights as fast as backpressure allows."""
    import msgpack
    import zmq

    from apex_zmq.wire import Gradients, encode
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, CLIENT_HWM)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(weights_ep)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, CLIENT_HWM)
    push.setsockopt(zmq.IMMEDIATE, 1)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(gradients_ep)
    version = incarnation = -1
    sent = 0
    while not stop.is_set():
        while sub.poll(0 if version >= 0 else 200):  # the newest weights' header (no array is read)
            h = msgpack.unpackb(sub.recv_multipart(copy=False)[0].bytes, raw=False)
            if h.get("t") == "weights":
                version, incarnation = int(h["version"]), int(h["inc"])
        if version < 0:
            continue
        names, arrays, loss, entropy = pool[sent % len(pool)]
        msg = encode(Gradients(sender=f"bench-{index}", seq=sent, version=version, names=names, arrays=arrays,
                               dtype=dtype, incarnation=incarnation, steps=T_MAX * ENVS, loss=loss,
                               entropy=entropy))
        while not stop.is_set():
            if push.poll(100, zmq.POLLOUT):
                push.send_multipart(msg, copy=False)
                sent += 1
                break
    out.put((index, sent))
    ctx.destroy(linger=0)


def in_system(hidden: int, counts: list[int], pool: list, dtype: str, seconds: float, warmup: float) -> dict:
    """Per client count: median learner/updates_per_s and the staleness and drops over the window."""
    import zmq

    from apex_zmq.wire import decode_telemetry
    ep = endpoints(free_port_base(7))  # seven: the gradients endpoint is the base's seventh port
    tel = zmq.Context.instance().socket(zmq.SUB)
    tel.setsockopt(zmq.SUBSCRIBE, b"")
    tel.bind(ep["telemetry"])
    spawn = mp.get_context("spawn")
    results: dict[int, dict] = {}

    def reports(until: float):
        while time.monotonic() < until:
            if tel.poll(200):
                t = decode_telemetry(tel.recv_multipart())
                if t.role == "learner":
                    yield t.metrics

    with tempfile.TemporaryDirectory(prefix="gradient-server-") as tmp:
        log = open(Path(tmp, "learner.log"), "wb")
        flags = [x for k in ("gradients", "weights", "telemetry") for x in (f"--{k}", ep[k])]
        learner = subprocess.Popen([sys.executable, "-m", "learner", *learner_flags(hidden, tmp), *flags,
                                    "--checkpoint-period", "1e9"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
        try:
            for _ in reports(time.monotonic() + 120):  # the learner is up once it reports
                break
            else:
                raise RuntimeError(f"the learner sent no telemetry in 120 s:\n{Path(tmp, 'learner.log').read_text()}")
            for n in counts:
                stop, out = spawn.Event(), spawn.Queue()
                clients = [spawn.Process(target=client, args=(i, ep["gradients"], ep["weights"], pool, dtype, stop, out),
                                         daemon=True) for i in range(n)]
                for p in clients:
                    p.start()
                try:
                    first = None
                    for m in reports(time.monotonic() + 120):  # until the first gradient is applied
                        if m.get("learner/updates_per_s", 0) > 0:
                            first = m
                            break
                    if first is None:
                        raise RuntimeError(f"{n} clients: no gradient applied in 120 s")
                    for _ in reports(time.monotonic() + warmup):
                        pass
                    window = list(reports(time.monotonic() + seconds))
                finally:
                    stop.set()
                    for p in clients:
                        p.join(10)
                        if p.is_alive():
                            p.kill()
                sent = sum(out.get(timeout=5)[1] for _ in clients) if all(p.exitcode == 0 for p in clients) else -1
                if len(window) < 2:
                    raise RuntimeError(f"{n} clients: {len(window)} learner reports in {seconds} s")
                a, b = window[0], window[-1]
                applied = b["learner/gradients_applied"] - a["learner/gradients_applied"]
                results[n] = {
                    "rate": statistics.median(m["learner/updates_per_s"] for m in window),
                    "reports": len(window),
                    "staleness": statistics.median(m.get("learner/staleness", 0.0) for m in window),
                    "staleness_max": b["learner/staleness_max"],
                    "stale": b["learner/stale_dropped"] - a["learner/stale_dropped"],
                    "rejected": b["learner/rejected"] - a["learner/rejected"],
                    "applied": applied, "sent": sent}
                # Drain what the clients left queued at the learner, so the next count starts clean.
                for m in reports(time.monotonic() + 30):
                    if m.get("learner/updates_per_s", 0) == 0:
                        break
        finally:
            learner.terminate()
            try:
                learner.wait(30)
            except subprocess.TimeoutExpired:
                learner.kill()
                learner.wait()
            log.close()
            tel.close(0)
    return results


def in_process(hidden: int, pool: list, dtype: str, seconds: float) -> tuple[float, float]:
    """(apply/s, decode+apply/s) of the same ParameterServer on the same messages, 1 torch thread."""
    import torch

    from apex_zmq import config as C
    from apex_zmq.envs import env_spec
    from apex_zmq.wire import Gradients, decode_gradients, encode
    from learner.algos import make_rule
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = C.parse(C.LearnerConfig, learner_flags(hidden, tmp), "learner")
    server = make_rule(env_spec(ENV), cfg, torch.device("cpu"))
    frames = [encode(Gradients(sender="bench", seq=i, version=0, names=names, arrays=arrays, dtype=dtype,
                               steps=T_MAX * ENVS, loss=loss, entropy=entropy))
              for i, (names, arrays, loss, entropy) in enumerate(pool)]
    # As the learner receives them: one buffer per frame (recv_multipart(copy=False) gives zmq Frames).
    frames = [[bytes(memoryview(f)) for f in msg] for msg in frames]
    decoded = [decode_gradients(f) for f in frames]

    def loop(step) -> float:
        for i in range(5):
            step(i)
        n, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < seconds:
            step(n)
            n += 1
        return n / (time.monotonic() - t0)

    def apply(i: int) -> None:
        g = decoded[i % len(decoded)]
        g.version = server.steps  # at the current weights: never stale
        assert server.apply(g) == "applied"

    def decode_apply(i: int) -> None:
        g = decode_gradients(frames[i % len(frames)])
        g.version = server.steps
        assert server.apply(g) == "applied"

    return loop(apply), loop(decode_apply)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,2,4", help="pushing client counts, comma-separated")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per client count (and in-process)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds after the first applied gradient not measured")
    ap.add_argument("--hidden", type=int, default=256, help="hidden units (256: Mnih et al. 2016's Atari network)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="gradients on the wire")
    ap.add_argument("--pool", type=int, default=4, help="distinct gradients messages the clients cycle through")
    args = ap.parse_args()
    counts = [int(c) for c in args.clients.split(",") if c.strip()]
    if not counts or min(counts) < 1 or args.seconds <= 0 or args.pool < 1:
        ap.error("--clients must be counts >= 1, --seconds > 0, --pool >= 1")
    print_machine()
    import torch
    torch.set_num_threads(1)
    pool = gradient_pool(args.hidden, args.pool, args.dtype)
    params = sum(a.size for a in pool[0][1])
    nbytes = sum(a.nbytes for a in pool[0][1])
    print(f"network: {ENV} --algo {ALGO} --hidden {args.hidden}: {params:,} parameters; gradients {args.dtype}, "
          f"{nbytes / 1e6:.2f} MB per message; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} "
          f"at start", flush=True)
    sys_res = in_system(args.hidden, counts, pool, args.dtype, args.seconds, args.warmup)
    for n, r in sys_res.items():
        print(f"{n} client(s): {r['rate']:.1f} updates/s (median of {r['reports']} learner reports; "
              f"{r['applied']:.0f} applied in the window, {r['sent']} sent in all); staleness median "
              f"{r['staleness']:.1f}, max {r['staleness_max']:.0f} updates; dropped as stale {r['stale']:.0f}, "
              f"rejected {r['rejected']:.0f}", flush=True)
    alone, alone_decode = in_process(args.hidden, pool, args.dtype, args.seconds)
    print(f"in-process: ParameterServer.apply {alone:.1f} updates/s; decode_gradients + apply "
          f"{alone_decode:.1f} /s (1 torch thread)", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"inprocess_updates_per_s={alone:.1f} " + " ".join(
        f"updates_per_s_{n}={r['rate']:.1f} efficiency_{n}={r['rate'] / alone:.2f}" for n, r in sys_res.items()))


if __name__ == "__main__":
    main()
