"""A removed item stays removed on the wire: a learner-side client written from PROTOCOL.md (pyzmq,
msgpack and numpy; experience from examples/foreign_actor.py) removes an item of a real replay
server, then keeps sending priority updates that name it with a huge priority. The item is in none of
the batches sampled after those messages, and the server's telemetry counts the removal
(``replay/removed``) and the ignored updates (``replay/removed_updates``)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import msgpack
import numpy as np
import zmq

from apex_zmq.config import loopback_endpoints
from conftest import ROOT, endpoint_flags, start_role, stop_all

ITEMS, BATCH = 64, 16
LATER_BATCHES = 10


def _foreign_actor():
    """examples/foreign_actor.py as a module (its encoder is the protocol's, not this project's)."""
    spec = importlib.util.spec_from_file_location("foreign_actor", ROOT / "examples" / "foreign_actor.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _arrays(frames: list[bytes], dtypes: dict[str, str]) -> tuple[dict, dict[str, np.ndarray]]:
    """A message's header and its named arrays (PROTOCOL.md 3: frame i + 1 is the i-th of ``a``)."""
    header = msgpack.unpackb(frames[0], raw=False)
    names = [name for name, _ in header["a"]]
    return header, {n: np.frombuffer(frames[1 + names.index(n)], dtypes[n]) for n in dtypes}


def _priorities(seq: int, inc: int, ids, priority, remove) -> list[bytes]:
    """A ``priorities`` message (PROTOCOL.md 5.3)."""
    arrays = [("ids", np.asarray(ids, "<i8")), ("priority", np.asarray(priority, "<f4")),
              ("remove", np.asarray(remove, "<i8"))]
    header = {"v": 2, "t": "priorities", "s": "learner", "q": seq, "inc": inc,
              "a": [[n, int(a.size)] for n, a in arrays]}
    return [msgpack.packb(header, use_bin_type=True)] + [a.tobytes() for _, a in arrays]


def test_update_naming_a_removed_item_does_not_bring_it_back(tmp_path: Path, port_base: int) -> None:
    eps = loopback_endpoints(port_base)
    ctx = zmq.Context()
    socks = []

    def sock(kind: int, ep: str, bind: bool = False) -> zmq.Socket:
        s = ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        if kind == zmq.SUB:
            s.setsockopt(zmq.SUBSCRIBE, b"")
        s.bind(ep) if bind else s.connect(ep)
        socks.append(s)
        return s

    tel = sock(zmq.SUB, eps["telemetry"], bind=True)  # in the evaluator's place
    log = tmp_path / "replay_server.log"
    replay = start_role("replay_server", [
        "--env", "CartPole-v1", "--run-dir", str(tmp_path / "run"), *endpoint_flags(port_base),
        "--telemetry-period", "0.2", "--capacity", "1000", "--min-size", str(ITEMS),
        "--batch-size", str(BATCH), "--prefetch", "2"], log)
    try:
        fa = _foreign_actor()
        obs = [np.random.default_rng(0).normal(size=4).astype(np.float32) for _ in range(ITEMS + 1)]
        sock(zmq.PUSH, eps["experience"]).send_multipart(fa.encode_experience(
            "foreign-0", 0, obs, np.arange(ITEMS), np.arange(1, ITEMS + 1), np.zeros(ITEMS), np.ones(ITEMS),
            np.full(ITEMS, 0.99), np.ones(ITEMS)))
        samples = sock(zmq.PULL, eps["samples"])
        prios = sock(zmq.PUSH, eps["priorities"])
        sample_dtypes = {"ids": "<i8"}

        def next_batch() -> tuple[dict, np.ndarray]:
            assert samples.poll(30_000), f"no batch from the replay server:\n{log.read_text()[-2000:]}"
            header, arrays = _arrays(samples.recv_multipart(), sample_dtypes)
            return header, arrays["ids"]

        header, ids = next_batch()
        inc, gone = header["inc"], int(ids[0])
        # The batch's update removing one item, then updates naming it as if it were live (a batch
        # sampled before the removal, or a client that keeps reporting it), at a priority that
        # would take nearly every draw.
        prios.send_multipart(_priorities(1, inc, ids, np.ones(len(ids)), [gone]))
        for q in range(2, 5):
            prios.send_multipart(_priorities(q, inc, [gone], [1e6], []))
        # Last, an id never stored: once replay/stale_updates counts it, everything before it on this
        # socket has been applied (one PUSH -> PULL pipe keeps order).
        prios.send_multipart(_priorities(5, inc, [10**9], [1.0], []))

        # Telemetry's q is the server's batch count when it reported: batches with a larger q were
        # sampled after every message above was applied.
        metrics, applied_at = {}, None
        deadline = time.monotonic() + 30
        while applied_at is None and time.monotonic() < deadline:
            if tel.poll(100):
                t = msgpack.unpackb(tel.recv_multipart()[0], raw=False)
                if t.get("role") == "replay" and t["m"].get("replay/stale_updates", 0) >= 1:
                    metrics, applied_at = t["m"], t["q"]
        assert applied_at is not None, f"the updates were not applied:\n{log.read_text()[-2000:]}"

        later = []
        while len(later) < LATER_BATCHES:
            header, ids = next_batch()
            if header["q"] > applied_at:
                later.append(ids)
        assert sum(gone in ids for ids in later) == 0, f"item {gone} came back: {later}"
        assert metrics["replay/removed"] == 1 and metrics.get("replay/removed_updates") == 3, metrics
        assert metrics["replay/stale_updates"] == 1 and metrics["replay/rejected_priorities"] == 0, metrics
        assert replay.poll() is None, log.read_text()[-2000:]
    finally:
        stop_all([replay])
        for s in socks:
            s.close()
        ctx.term()
