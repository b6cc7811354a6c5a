"""Helpers shared by the benchmarks: real Atari chunks, ports, telemetry."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Moved to the front even when already on the path (PYTHONPATH=ROOT puts it behind the script's bench/), the
# root ahead of bench/: bench/replay_server.py would otherwise hide the replay_server package.
for p in (str(ROOT / "tests"), str(ROOT)):
    if p in sys.path:
        sys.path.remove(p)
    sys.path.insert(0, p)

from conftest import endpoint_flags, free_port_base  # noqa: E402,F401


def machine_line() -> str:
    """The machine in one line: CPU model, vector capabilities (AVX2, AVX-512, VNNI, BF16, AMX), cores."""
    from apex_zmq import cpu
    return f"cpu: {cpu.detect().describe()}"


def print_machine() -> None:
    """Print ``machine_line()``: every benchmark's first line, so each figure names its machine."""
    print(machine_line(), flush=True)


def real_chunks(env: str, count: int, envs: int = 32, acting_dtype: str = "auto", frames_once: bool = False) -> list:
    """``count`` real experience chunks from ``env``, made by the actor's own core (``frames_once``
    False: Atari observations as whole stacks, not the stack layout).

    Random Q values stand in for the network (a random policy that still goes through the epsilon
    ladder, n-step returns, priorities and lz4), so the frames are real game frames.
    """
    import torch

    from actor.main import ActorCore
    from apex_zmq import config as C
    cfg = C.resolve(C.parse(C.ActorConfig, ["--env", env, "--run-dir", tempfile.gettempdir(),
                                            "--envs-per-actor", str(envs), "--env-threads", "2",
                                            "--acting-dtype", acting_dtype,
                                            "--frames-once" if frames_once else "--no-frames-once"], "actor"))
    core = ActorCore(cfg)
    n_actions = core.spec.num_actions
    core.policy = lambda obs: torch.randn(len(obs), n_actions)
    chunks = []
    try:
        while len(chunks) < count:
            c = core.step()
            if c is not None:
                chunks.append(c)
    finally:
        core.close()
    return chunks


def complete_rows(path: Path) -> list[dict]:
    """The rows of a CSV that another process appends to (a half-written last line is left out)."""
    import csv
    import io

    if not path.exists():
        return []
    text = path.read_text()
    if not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    return list(csv.DictReader(io.StringIO(text)))


def stop_launcher(proc) -> None:
    """Ctrl-C a ./run.sh launcher started in its own process group (every role stops cleanly), killing
    the group if it has not exited within a minute."""
    import os
    import signal
    import subprocess

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def endpoints(base: int) -> dict[str, str]:
    """Endpoint by name (experience, samples, ...) for ports from ``base``."""
    flags = endpoint_flags(base)
    return {k.lstrip("-"): v for k, v in zip(flags[0::2], flags[1::2])}


def live_endpoints():
    """Endpoints on free loopback ports, their flags, and a SUB already bound to the telemetry one."""
    import zmq
    ep = endpoints(free_port_base())
    flags = [x for k, v in ep.items() for x in (f"--{k}", v)]
    tel = zmq.Context.instance().socket(zmq.SUB)
    tel.setsockopt(zmq.SUBSCRIBE, b"")
    tel.bind(ep["telemetry"])
    return ep, flags, tel


def wait_for_metric(tel, key: str, target: float, timeout: float) -> dict:
    """Read telemetry until ``key`` >= ``target``; returns that report's metrics."""
    from apex_zmq.wire import decode_telemetry
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tel.poll(1000):
            m = decode_telemetry(tel.recv_multipart()).metrics
            if m.get(key, float("-inf")) >= target:
                return m
    raise RuntimeError(f"{key} did not reach {target} in {timeout:.0f}s")


def producer(env: str, endpoint: str, pool_chunks: int, fill: int, rate: float,
             throttle, stop, out) -> None:
    """A process body: push ``fill`` transitions as fast as possible, then, once ``throttle`` is
    set, ``rate`` transitions/s until ``stop`` (multiprocessing Events); results go to ``out``.

    A pool of ``pool_chunks`` real chunks is encoded once and resent.
    """
    feed(endpoint, real_chunks(env, pool_chunks), fill, rate, throttle, stop, out)


def feed(endpoint: str | list[str], chunks: list, fill: int, rate: float, throttle, stop, out) -> None:
    """``producer`` on pre-made chunks (encoded once and resent)."""
    import zmq

    from apex_zmq.wire import encode
    n_per = [len(c.action) for c in chunks]
    pool = [encode(c) for c in chunks]
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 64)
    for ep in [endpoint] if isinstance(endpoint, str) else endpoint:  # several: replay shards, round robin
        push.connect(ep)
    sent, i = 0, 0
    out.put(("pool", sum(n_per)))
    while sent < fill and not stop.is_set():
        push.send_multipart(pool[i % len(pool)], copy=False)
        sent += n_per[i % len(pool)]
        i += 1
    throttle.wait()
    t0, steady = time.monotonic(), 0
    while not stop.is_set():
        push.send_multipart(pool[i % len(pool)], copy=False)
        steady += n_per[i % len(pool)]
        i += 1
        ahead = t0 + steady / rate - time.monotonic()
        if ahead > 0:
            stop.wait(ahead)  # paced, not a busy wait
    out.put(("producer_rate", steady / (time.monotonic() - t0)))
    push.close(0)


def publish_weights(endpoint: str, env_id: str, hidden: int, period: float, stop) -> None:
    """Act as the learner's weights publisher: a changed network as a new version every ``period`` s
    (actors adopt each one, as in a run)."""
    import torch
    import zmq

    from apex_zmq.envs import env_spec
    from apex_zmq.models import build_network
    from apex_zmq.networks import state_arrays
    from apex_zmq.wire import Weights, encode
    net = build_network(env_spec(env_id), hidden)
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.bind(endpoint)
    try:
        version = 0
        while not stop.wait(period):
            version += 1
            with torch.no_grad():  # changed weights, as after learner steps
                for p in net.parameters():
                    p.mul_(1.01)
            names, arrays = state_arrays(net)
            pub.send_multipart(encode(Weights(sender="learner", seq=version, version=version,
                                              names=names, arrays=arrays)))
    finally:
        pub.close(linger=0)
