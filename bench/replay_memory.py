"""Resident memory of the replay server process per stored Atari transition.

For each game, a real replay server process (``python -m replay_server.main``) is filled to
``--transitions`` (its capacity) with real frames: this benchmark runs the actor's own core
(``ActorCore``: ale-py ``AtariVectorEnv``, epsilon ladder, n-step chunks, lz4) with random Q values
in place of the network, and pushes the chunks over ZeroMQ. The per-transition figure is

    (RSS of the full server - RSS of an empty server of the same env with capacity 1) / transitions

so it includes everything the server holds per item: compressed frames, per-item arrays, the
sum-tree and any Python objects.

    .venv/bin/python bench/replay_memory.py [--transitions 100000] [--actor-args='--frames-once --frames-hc 4']

Last line: ``bytes_per_transition_mspacman=<x> bytes_per_transition_pong=<y>``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from conftest import endpoint_flags, free_port_base  # noqa: E402

from actor.main import ActorCore  # noqa: E402
from apex_zmq import config as C  # noqa: E402
from apex_zmq.wire import decode_telemetry, encode  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from _common import print_machine  # noqa: E402


def rss_bytes(pid: int) -> int:
    """Resident set size of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Server:
    """A replay server process with a telemetry socket to watch its size."""

    def __init__(self, env: str, capacity: int, tmp: str) -> None:
        self.base = free_port_base()
        self.ctx = zmq.Context.instance()
        self.tel = self.ctx.socket(zmq.SUB)
        self.tel.setsockopt(zmq.SUBSCRIBE, b"")
        self.tel.bind(f"tcp://127.0.0.1:{self.base + 4}")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "replay_server", "--env", env, "--run-dir", tmp,
             *endpoint_flags(self.base), "--capacity", str(capacity), "--min-size", str(capacity), "--batch-size", "1",
             "--telemetry-period", "0.5"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def size(self, timeout: float = 30.0) -> int:
        """The size from the next telemetry report."""
        if not self.tel.poll(int(timeout * 1000)):
            self.proc.kill()
            raise RuntimeError(f"replay server sent no telemetry: {self.proc.communicate()[1].decode()[-2000:]}")
        while True:  # newest report
            t = decode_telemetry(self.tel.recv_multipart())
            if not self.tel.poll(0):
                return int(t.metrics["replay/size"])

    def settle_rss(self) -> int:
        """RSS once it stops changing."""
        prev = -1
        for _ in range(20):
            time.sleep(0.5)
            r = rss_bytes(self.proc.pid)
            if abs(r - prev) < 64 * 1024:
                return r
            prev = r
        return r

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)
        self.tel.close()


def fill(env: str, transitions: int, envs: int, actor_args: list[str]) -> tuple[int, int, float]:
    """Fill a server with ``transitions``; returns (rss_full, size, seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(env, transitions, tmp)
        try:
            server.size()  # up and reporting
            cfg = C.resolve(C.parse(C.ActorConfig, ["--env", env, "--run-dir", tmp, "--envs-per-actor",
                                                    str(envs), "--env-threads", "2", *actor_args,
                                                    *endpoint_flags(server.base)], "actor"))
            core = ActorCore(cfg)
            n_actions = core.spec.num_actions
            core.policy = lambda obs: torch.randn(len(obs), n_actions)  # random policy, real frames
            push = server.ctx.socket(zmq.PUSH)
            push.connect(cfg.experience)
            sent, t0 = 0, time.monotonic()
            while sent < transitions:
                chunk = core.step()
                if chunk is not None:
                    push.send_multipart(encode(chunk), copy=False)
                    sent += len(chunk.action)
            while (size := server.size()) < transitions:
                pass
            seconds = time.monotonic() - t0
            push.close()
            core.close()
            return server.settle_rss(), size, seconds
        finally:
            server.close()


def empty_rss(env: str) -> int:
    """RSS of a replay server for ``env`` that holds nothing (capacity 1)."""
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(env, 1, tmp)
        try:
            server.size()
            return server.settle_rss()
        finally:
            server.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transitions", type=int, default=100_000)
    ap.add_argument("--envs", type=int, default=32)
    ap.add_argument("--actor-args", default="", help="more actor flags, e.g. '--frames-once' or '--frames-once --frames-hc 4'")
    args = ap.parse_args()
    print_machine()
    results = {}
    for env in ("ALE/MsPacman-v5", "ALE/Pong-v5"):
        base = empty_rss(env)
        full, size, secs = fill(env, args.transitions, args.envs, args.actor_args.split())
        per = (full - base) / size
        name = env.split("/")[1].split("-")[0].lower()
        results[name] = per
        print(f"{env}: {size} transitions in {secs:.0f}s; RSS empty {base / 2**20:.0f} MiB, "
              f"full {full / 2**20:.0f} MiB; {per:.0f} bytes/transition; "
              f"2M transitions -> {per * 2e6 / 2**30:.2f} GiB", flush=True)
    print(f"bytes_per_transition_mspacman={results['mspacman']:.0f} "
          f"bytes_per_transition_pong={results['pong']:.0f}")


if __name__ == "__main__":
    main()
