"""The weights relay as a real process: fan-out, the cache for late joiners, rejection of malformed
weights, one upstream connection however many local subscribers, CURVE on both sides, SIGTERM, and
a real learner -> relay -> actor chain.

A stand-in for the learner is an XPUB bound at the weights endpoint (a PUB that also shows the
subscriptions it receives, and whose socket monitor shows the connections it accepts); it publishes
real encoded ``Weights`` messages of the CartPole network.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from apex_zmq.keys import create as create_keys
from apex_zmq.wire import Telemetry, Weights, decode_telemetry, decode_weights, encode
from conftest import free_port_base, start_role, stop_all

WAIT_S = 20.0  # upper bound for process start-up and delivery on a loaded 2-core machine


def ep(port: int) -> str:
    return f"tcp://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def net_arrays() -> tuple[list[str], list[np.ndarray]]:
    """The CartPole network's parameters, as the learner sends them."""
    from apex_zmq.envs import env_spec
    from apex_zmq.models import build_network
    from apex_zmq.networks import state_arrays
    return state_arrays(build_network(env_spec("CartPole-v1"), 64))


def weights_msg(arrays: tuple[list[str], list[np.ndarray]], version: int) -> list:
    """An encoded weights message whose arrays are all shifted by ``version`` (each one distinct)."""
    names, values = arrays
    return encode(Weights(sender="learner", seq=version, version=version, names=names,
                          arrays=[(a + version).astype(a.dtype) for a in values]))


def assert_same(frames: list, expected: list) -> None:
    """``frames`` decode to exactly the weights of ``expected``."""
    got, want = decode_weights(frames), decode_weights(expected)
    assert (got.version, got.names) == (want.version, want.names)
    assert len(got.arrays) == len(want.arrays)
    for a, b in zip(got.arrays, want.arrays):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def recv(sock: zmq.Socket, timeout_s: float = WAIT_S) -> list[bytes]:
    """One message, or fail after ``timeout_s``."""
    assert sock.poll(int(timeout_s * 1000)), f"nothing received in {timeout_s:.0f}s"
    return sock.recv_multipart()


def wait_telemetry(tel: zmq.Socket, role: str, pred: Callable[[dict], bool],
                   timeout_s: float = WAIT_S) -> dict:
    """Read telemetry until a report of ``role`` satisfies ``pred``; return its metrics."""
    deadline = time.monotonic() + timeout_s
    last: dict = {}
    while (left := deadline - time.monotonic()) > 0:
        if tel.poll(int(left * 1000)):
            t = decode_telemetry(tel.recv_multipart())
            if t.role == role:
                last = t.metrics
                if pred(last):
                    return last
    raise AssertionError(f"{role} telemetry never satisfied the condition; last: {last}")


class Rig:
    """A stand-in learner, a telemetry sink, the relay process and local subscribers."""

    def __init__(self, tmp: Path, extra: list[str] = (),
                 server: Callable[[zmq.Socket], None] = lambda s: None) -> None:
        """``server`` configures the sockets the test binds (CURVE options) before they bind."""
        base = free_port_base(3)
        self.weights, self.local, self.telemetry = ep(base), ep(base + 1), ep(base + 2)
        self.ctx = zmq.Context()
        self.upstream = self.ctx.socket(zmq.XPUB)
        self.upstream.setsockopt(zmq.LINGER, 0)
        self.upstream.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription shows, duplicates too
        self.upstream_events = self.upstream.get_monitor_socket(zmq.EVENT_ACCEPTED)
        server(self.upstream)
        self.upstream.bind(self.weights)
        self.tel = self.ctx.socket(zmq.SUB)
        self.tel.setsockopt(zmq.LINGER, 0)
        self.tel.setsockopt(zmq.SUBSCRIBE, b"")
        server(self.tel)
        self.tel.bind(self.telemetry)
        self.log = tmp / "relay.log"
        self.proc = start_role("relay", ["--weights", self.weights, "--relay-weights", self.local,
                                         "--telemetry", self.telemetry, "--telemetry-period", "0.2",
                                         "--run-dir", str(tmp / "run"), *extra], self.log)
        self.subs: list[zmq.Socket] = []

    def relay_subscribed(self) -> None:
        """Wait for the relay's own upstream subscription (then it receives what is published)."""
        msg = recv(self.upstream)
        assert msg == [b"\x01"], msg

    def subscriber(self, configure: Callable[[zmq.Socket], None] = lambda s: None) -> zmq.Socket:
        """A local subscriber of the relay, as an actor's weights SUB."""
        s = self.ctx.socket(zmq.SUB)
        s.setsockopt(zmq.LINGER, 0)
        configure(s)
        s.setsockopt(zmq.SUBSCRIBE, b"")
        s.connect(self.local)
        self.subs.append(s)
        return s

    def relay_metrics(self, pred: Callable[[dict], bool]) -> dict:
        """The first relay report that satisfies ``pred``."""
        return wait_telemetry(self.tel, "relay", pred)

    def accepted(self) -> int:
        """Connections the stand-in learner has accepted so far."""
        n = 0
        while self.upstream_events.poll(0):
            n += recv_monitor_message(self.upstream_events)["event"] == zmq.EVENT_ACCEPTED
        return n

    def close(self) -> None:
        stop_all([self.proc])
        self.upstream.disable_monitor()
        self.ctx.destroy(linger=0)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.close()


def test_fans_out_intact_with_one_upstream_connection(rig: Rig, net_arrays) -> None:
    rig.relay_subscribed()
    subs = [rig.subscriber() for _ in range(6)]
    rig.relay_metrics(lambda m: m["relay/subscriptions"] >= len(subs))
    msg = weights_msg(net_arrays, 11)
    rig.upstream.send_multipart(msg)
    for s in subs:
        assert_same(recv(s), msg)
    # The learner's side: one connection and one subscription, whatever the number of local actors
    # (the relay does not pass its subscribers' subscriptions up).
    assert rig.accepted() == 1
    assert not rig.upstream.poll(200), f"more subscriptions upstream: {rig.upstream.recv_multipart()}"
    m = rig.relay_metrics(lambda m: m["relay/forwarded"] >= 1)
    assert m["relay/forwarded"] == 1 and m["relay/rejected"] == 0 and m["relay/weights_version"] == 11
    assert m["relay/forwarded_bytes"] == sum(memoryview(f).nbytes for f in msg)


def test_late_subscriber_gets_cached_weights_at_once(rig: Rig, net_arrays) -> None:
    rig.relay_subscribed()
    early = rig.subscriber()
    rig.relay_metrics(lambda m: m["relay/subscriptions"] >= 1)
    msg = weights_msg(net_arrays, 5)
    rig.upstream.send_multipart(msg)
    assert_same(recv(early), msg)  # the relay has it now
    # The stand-in never publishes again: whatever the late subscriber gets is the relay's cache.
    t0 = time.monotonic()
    late = rig.subscriber()
    assert_same(recv(late, timeout_s=2.0), msg)
    latency = time.monotonic() - t0
    assert latency < 1.0, f"cached weights took {latency:.2f}s (the learner republishes every 2 s)"
    m = rig.relay_metrics(lambda m: m["relay/resent"] >= 1)
    assert m["relay/forwarded"] == 1 and m["relay/subscriptions"] == 2
    # A newer version is forwarded to both (the resend may have reached the early one too).
    newer = weights_msg(net_arrays, 6)
    rig.upstream.send_multipart(newer)
    for s in (early, late):
        got = decode_weights(recv(s))
        if got.version == 5:  # the resend of the cached version, then the new one
            got = decode_weights(recv(s))
        assert got.version == 6


def test_malformed_weights_are_dropped_and_counted(rig: Rig, net_arrays) -> None:
    rig.relay_subscribed()
    sub = rig.subscriber()
    rig.relay_metrics(lambda m: m["relay/subscriptions"] >= 1)
    good = weights_msg(net_arrays, 3)
    truncated = list(good)
    truncated[1] = bytes(truncated[1])[:-4]  # an array frame shorter than its declared shape
    bad = [
        [b"junk"],
        truncated,
        good[:-1],  # a frame missing
        encode(Telemetry(sender="learner", seq=1, role="learner", time=1.0)),  # wrong type
    ]
    for frames in bad:
        rig.upstream.send_multipart(frames)
    rig.upstream.send_multipart(good)
    # Delivery is in order, so a forwarded malformed message would arrive before the good one.
    assert_same(recv(sub), good)
    m = rig.relay_metrics(lambda m: m["relay/rejected"] >= len(bad))
    assert m["relay/rejected"] == len(bad) and m["relay/forwarded"] == 1
    assert m["relay/weights_version"] == 3
    # The cache holds the good message, not a rejected one.
    assert_same(recv(rig.subscriber()), good)


def test_sigterm_stops_cleanly(rig: Rig) -> None:
    rig.relay_subscribed()
    rig.proc.terminate()
    assert rig.proc.wait(10) == 0, rig.log.read_text()
    assert "relay: stopped" in rig.log.read_text()


def test_non_loopback_bind_needs_keys_or_insecure(tmp_path: Path) -> None:
    p = start_role("relay", ["--relay-weights", "tcp://0.0.0.0:5556", "--run-dir", str(tmp_path)],
                   tmp_path / "relay.log")
    try:
        assert p.wait(20) != 0
    finally:
        stop_all([p])
    assert "refusing to bind tcp://0.0.0.0:5556" in (tmp_path / "relay.log").read_text()


def test_curve_on_both_sides(tmp_path: Path, net_arrays) -> None:
    keys = tmp_path / "keys"
    create_keys(keys, clients=1)
    server_public, server_secret = zmq.auth.load_certificate(keys / "server.key_secret")
    client_public, client_secret = zmq.auth.load_certificate(keys / "client.key_secret")
    rogue_public, rogue_secret = zmq.curve_keypair()

    def server(s: zmq.Socket) -> None:
        # CURVE servers as the learner and the evaluator are, without a ZAP handler: the relay's
        # side is what this test checks (it must speak CURVE upstream or nothing gets through).
        s.setsockopt(zmq.CURVE_SERVER, 1)
        s.setsockopt(zmq.CURVE_PUBLICKEY, server_public)
        s.setsockopt(zmq.CURVE_SECRETKEY, server_secret)

    def client(public: bytes, secret: bytes) -> Callable[[zmq.Socket], None]:
        def configure(s: zmq.Socket) -> None:
            s.setsockopt(zmq.CURVE_SERVERKEY, server_public)
            s.setsockopt(zmq.CURVE_PUBLICKEY, public)
            s.setsockopt(zmq.CURVE_SECRETKEY, secret)
        return configure

    r = Rig(tmp_path, ["--keys", str(keys)], server)
    try:
        r.relay_subscribed()  # arrived over CURVE
        actor = r.subscriber(client(client_public, client_secret))
        plain = r.subscriber()
        rogue = r.subscriber(client(rogue_public, rogue_secret))  # not in authorized/
        r.relay_metrics(lambda m: m["relay/subscriptions"] >= 1)
        msg = weights_msg(net_arrays, 9)
        r.upstream.send_multipart(msg)
        assert_same(recv(actor), msg)
        # By now the relay has sent to every subscriber it admitted: the others got nothing.
        assert not plain.poll(500) and not rogue.poll(0)
        assert r.relay_metrics(lambda m: True)["relay/subscriptions"] == 1
    finally:
        r.close()


def test_real_learner_to_actor_through_relay(tmp_path: Path) -> None:
    """A real learner publishes; a CartPole actor whose --weights is the relay adopts them."""
    base = free_port_base(6)
    learner_w, local, tel_ep, experience, samples, prios = (ep(base + i) for i in range(6))
    common = ["--env", "CartPole-v1", "--run-dir", str(tmp_path / "run"), "--telemetry", tel_ep,
              "--telemetry-period", "0.25"]
    ctx = zmq.Context()
    tel = ctx.socket(zmq.SUB)
    tel.setsockopt(zmq.LINGER, 0)
    tel.setsockopt(zmq.SUBSCRIBE, b"")
    tel.bind(tel_ep)
    # A stand-in replay server that takes (and never reads) experience: the actor adopts new weights
    # between steps, and its steps would block on a missing replay server (its queue is far larger
    # than what one actor sends in this test).
    replay = ctx.socket(zmq.PULL)
    replay.setsockopt(zmq.LINGER, 0)
    replay.bind(experience)
    procs: list[subprocess.Popen] = []
    try:
        # No replay server: the learner publishes its initial weights (version 0) without training.
        procs.append(start_role("learner", [*common, "--weights", learner_w, "--samples", samples,
                                            "--priorities", prios, "--device", "cpu"],
                                tmp_path / "learner.log"))
        procs.append(start_role("relay", [*common, "--weights", learner_w, "--relay-weights", local],
                                tmp_path / "relay.log"))
        procs.append(start_role("actor", [*common, "--weights", local, "--experience", experience,
                                          "--num-actors", "1", "--actor-index", "0"],
                                tmp_path / "actor.log"))
        try:
            m = wait_telemetry(tel, "actor", lambda m: m["actor/weights_version"] >= 0, timeout_s=60)
        except AssertionError:
            logs = {n: (tmp_path / f"{n}.log").read_text()[-1500:] for n in ("learner", "relay", "actor")}
            raise AssertionError(f"actor got no weights through the relay; logs: {logs}") from None
        assert m["actor/weights_version"] == 0
        assert wait_telemetry(tel, "relay", lambda m: m["relay/forwarded"] >= 1)["relay/rejected"] == 0
    finally:
        stop_all(procs)
        ctx.destroy(linger=0)


def test_relay_config_from_flags_and_file(tmp_path: Path) -> None:
    from apex_zmq import config as C
    assert C.parse(C.RelayConfig, [], "relay").relay_weights == "tcp://127.0.0.1:5556"
    f = tmp_path / "host.toml"
    f.write_text('env = "CartPole-v1"\n[relay]\nrelay_weights = "tcp://127.0.0.1:7001"\n'
                 '[actor]\nweights = "tcp://127.0.0.1:7001"\n')
    cfg = C.parse(C.RelayConfig, ["--config", str(f), "--weights", "tcp://10.0.0.1:5554"], "relay")
    assert (cfg.relay_weights, cfg.weights, cfg.env) == ("tcp://127.0.0.1:7001", "tcp://10.0.0.1:5554",
                                                         "CartPole-v1")
    with pytest.raises(SystemExit, match="--relay-weights: must differ from --weights"):
        C.parse(C.RelayConfig, ["--weights", "tcp://127.0.0.1:7001", "--relay-weights",
                                "tcp://127.0.0.1:7001"], "relay")
