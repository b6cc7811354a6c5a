"""Shared helpers for tests that start real role processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from apex_zmq.launch import role_module

ROOT = Path(__file__).resolve().parent.parent


def free_port_base(count: int = 7) -> int:
    """A port p such that p..p+count-1 are all free on loopback right now."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count >= 65535:
            continue
        socks = []
        try:
            for p in range(base, base + count):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError("no run of free loopback ports found")


def endpoint_flags(base: int) -> list[str]:
    """The five endpoint flags on loopback ports from ``base``."""
    from apex_zmq.config import loopback_endpoints
    flags: list[str] = []
    for name, ep in loopback_endpoints(base).items():
        flags += [f"--{name}", ep]
    return flags


def start_role(role: str, args: list[str], log: Path) -> subprocess.Popen:
    """Start ``python -m <role> args`` (apex_zmq.launch.role_module) with output to ``log``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    f = open(log, "wb")
    return subprocess.Popen([sys.executable, "-m", role_module(role), *args], stdout=f,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, env=env)


def stop_all(procs: list[subprocess.Popen], timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.fixture
def port_base() -> int:
    return free_port_base()


def cartpole_chunk(rng: np.random.Generator, seq: int, n: int = 50) -> list:
    """The wire frames of one experience chunk of ``n`` CartPole-shaped transitions (random data)."""
    from apex_zmq import wire
    obs = rng.normal(size=(n + 1, 4)).astype(np.float32)
    data, offsets = wire.frame_table(wire.compress_obs(obs))
    return wire.encode(wire.ExperienceChunk(
        sender="test-actor", seq=seq, obs_shape=(4,), obs_dtype="float32", frame_data=data, frame_offsets=offsets,
        obs_idx=np.arange(n, dtype=np.int32), next_idx=np.arange(1, n + 1, dtype=np.int32),
        action=rng.integers(0, 2, n).astype(np.int32), ret=np.ones(n, np.float32),
        disc=np.full(n, 0.99, np.float32), priority=np.ones(n, np.float32)))
