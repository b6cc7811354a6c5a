"""The bounds of apex_zmq/flow.py against real roles: a replay server (and a learner) over loopback TCP.

* ``test_samples_in_flight_stay_within_the_bound``: a real replay server and a slow consumer on the
  learner's side (a samples socket made as the learner makes its own). Whenever the consumer has
  stopped reading and the replay server has stopped sampling (everything between them is full), the
  batches the replay server has sampled minus those received are at most the stated bound, and more
  than the replay server's own queue (the kernels hold some: the bound is not met by accident).
* ``test_priorities_lag_stays_within_the_bound``: a real replay server and a real learner, this test
  the actor. The replay server's highest priorities lag over the whole run (``replay/priority_lag_max``:
  batches sampled whose update it had not applied, checked at every batch) is at most the stated bound,
  and the pipeline was full at some point.

No wall-clock assertions: every deadline only stops a test that would otherwise hang.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import cartpole_chunk, endpoint_flags, start_role, stop_all

from apex_zmq import config as C
from apex_zmq import flow, wire
from apex_zmq.transport import Sockets

CHUNK, BATCH, MIN_SIZE, PREFETCH = 50, 32, 200, 4
OBS_BYTES = 4 * 4  # CartPole: 4 float32




def _flags(port_base: int, tmp: Path) -> dict[str, list[str]]:
    """Each program's flags, and ./run.sh's (all of them), from which the bounds are computed."""
    common = ["--env", "CartPole-v1", "--run-dir", str(tmp), *endpoint_flags(port_base), "--telemetry-period", "0.1",
              "--samples-buffer", "16384", "--priorities-buffer", "8192"]
    replay = ["--batch-size", str(BATCH), "--prefetch", str(PREFETCH), "--capacity", "20000", "--min-size",
              str(MIN_SIZE)]
    return {"replay_server": common + replay, "learner": common + ["--checkpoint-period", "3600"],
            "run": common + replay}


class Roles:
    """This test's side of the sockets: the experience PUSH (an actor) and the telemetry SUB (the
    evaluator), plain pyzmq; and the replay server's reports."""

    def __init__(self, eps: dict[str, str]) -> None:
        self.ctx = zmq.Context()
        self.tel = self.ctx.socket(zmq.SUB)
        self.tel.setsockopt(zmq.SUBSCRIBE, b"")
        self.tel.bind(eps["telemetry"])
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.connect(eps["experience"])
        self.rng = np.random.default_rng(0)
        self.seq = 0

    def fill(self, chunks: int) -> None:
        for _ in range(chunks):
            self.push.send_multipart(cartpole_chunk(self.rng, self.seq))
            self.seq += 1

    def reports(self, role: str, since: float = 0.0, timeout_ms: int = 500) -> list[dict[str, float]]:
        """The reports of ``role`` made after ``since`` (time.time()) that have arrived, waiting up to
        ``timeout_ms`` for the first."""
        out = []
        while self.tel.poll(timeout_ms if not out else 0):
            t = wire.decode_telemetry(self.tel.recv_multipart())
            if t.role == role and t.time > since:
                out.append(t.metrics)
        return out

    def close(self) -> None:
        for s in (self.tel, self.push):
            s.close(0)
        self.ctx.term()


def test_samples_in_flight_stay_within_the_bound(tmp_path: Path, port_base: int) -> None:
    argv = _flags(port_base, tmp_path)
    cfg = C.parse(C.LaunchConfig, [*argv["run"], "--loader-threads", "0"], "run")
    link = flow.links(cfg, OBS_BYTES)["samples"]
    bound = 1 + link.messages_bound  # the batch the replay server holds waiting to send, and the connection's
    roles = Roles(C.loopback_endpoints(port_base))
    proc = start_role("replay_server", argv["replay_server"], tmp_path / "replay.log")
    socks = Sockets()
    consumer = socks.open(cfg, "learner", "samples", sync=True)  # as the learner makes it
    received, full = 0, []
    try:
        roles.fill(MIN_SIZE // CHUNK + 2)
        deadline = time.monotonic() + 120
        while len(full) < 4 and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "replay.log").read_text()[-2000:]
            for _ in range(3):  # takes a few, as a slow learner would (the first: the connection is up)
                assert consumer.poll(30_000), "no batch from the replay server"
                wire.decode_sample(consumer.recv_multipart())
                received += 1
            # Then sleeps: wait until the replay server's count, in reports made since, stops moving over
            # 3 of them (everything between the two is full).
            since, counts = time.time(), []
            while time.monotonic() < deadline and not (len(counts) >= 3 and len(set(counts[-3:])) == 1):
                counts += [r["replay/batches"] for r in roles.reports("replay", since)]
            in_flight = int(counts[-1]) - received
            assert in_flight <= bound, (in_flight, bound, link)
            full.append(in_flight)
        assert len(full) == 4, f"the replay server never held still: {full}"
    finally:
        socks.close()
        stop_all([proc])
        roles.close()
    # More than the replay server's own queue and the consumer's: the kernels held some.
    assert max(full) > 1 + PREFETCH + 1, (full, bound)


@pytest.mark.parametrize("loader_threads", [0, 2])
def test_priorities_lag_stays_within_the_bound(tmp_path: Path, port_base: int, loader_threads: int) -> None:
    argv = _flags(port_base, tmp_path)
    threads = ["--loader-threads", str(loader_threads)]
    cfg = C.parse(C.LaunchConfig, [*argv["run"], *threads], "run")
    plan = flow.links(cfg, OBS_BYTES)
    bound = flow.priority_lag_bound(cfg, plan)
    roles = Roles(C.loopback_endpoints(port_base))
    procs = [start_role("replay_server", argv["replay_server"], tmp_path / "replay.log"),
             start_role("learner", [*argv["learner"], *threads, "--torch-threads", "1"], tmp_path / "learner.log")]
    try:
        roles.fill(MIN_SIZE // CHUNK + 2)
        latest: dict[str, float] = {}
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and latest.get("replay/updated", 0) < 300 * BATCH:
            for name, p in zip(("replay", "learner"), procs):
                assert p.poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
            for r in roles.reports("replay"):
                latest = r
                assert r["replay/priority_lag_max"] <= bound, (r, bound)
        assert latest.get("replay/updated", 0) >= 300 * BATCH, f"the learner answered too few batches: {latest}"
    finally:
        stop_all(procs)
        roles.close()
    # The pipeline was full at some point (the learner is the slower side): the bound was tested.
    assert latest["replay/priority_lag_max"] > 1 + PREFETCH, (latest, bound)
