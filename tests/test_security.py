"""CURVE security with real processes, real sockets and real keys (no mocks).

``test_only_authorized_clients_get_through`` runs a replay server and a learner with ``--keys``
(the replay server binding its experience socket on 0.0.0.0) and plays the evaluator's part itself:
it binds the telemetry SUB as a CURVE server through ``transport.Sockets``, as the evaluator does,
and reads the replay server's counters from its reports. Three rogue clients (no key, a fresh key
that was never authorized, and a client key revoked by deleting it from ``authorized/``) push
experience and priorities and try to pull samples and subscribe to weights: the counters do not
move and they receive nothing. A client with an authorized key then does all of it and gets through,
so the test can tell the two apart.

``test_only_authorized_clients_push_gradients`` does the same for the asynchronous family's learner:
rogue clients push gradients that would be applied (the right weights version and incarnation) and
nothing reaches it; an authorized client's gradient is applied.
"""

from __future__ import annotations

import asyncio
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq
import zmq.asyncio
from conftest import ROOT, free_port_base, start_role, stop_all

from apex_zmq import keys as K
from apex_zmq import wire
from apex_zmq.config import loopback_endpoints
from apex_zmq.transport import Sockets

NO_TRAFFIC_S = 3.0  # how long rogue traffic gets to arrive (three replay reports)


# --------------------------------------------------------------------------- apex-zmq keys


def test_keys_command_layout_permissions_and_overwrite(tmp_path: Path) -> None:
    from apex_zmq.cli import main as cli
    d = tmp_path / "keys"
    assert cli(["keys", str(d), "--clients", "2"]) == 0
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(d) == 0o700 and mode(d / "authorized") == 0o700 and mode(d / "clients" / "client-1") == 0o700
    secrets = [d / "server.key_secret", d / "client.key_secret", *(d / "clients").glob("*/client.key_secret")]
    assert len(secrets) == 4 and all(mode(p) == 0o600 for p in secrets)
    assert sorted(p.name for p in (d / "authorized").iterdir()) == ["client-1.key", "client-2.key", "client.key"]
    # A client host's directory: the server public key and its own pair, nothing secret of others.
    assert sorted(p.name for p in (d / "clients" / "client-2").iterdir()) == \
        ["client.key", "client.key_secret", "server.key"]
    store = K.KeyStore(d / "clients" / "client-2")
    assert store.server_public() == K.KeyStore(d).server_pair()[0]
    assert store.client_pair()[0] == zmq.auth.load_certificate(d / "authorized" / "client-2.key")[0]
    assert len(K.KeyStore(d).authorized()) == 3
    with pytest.raises(SystemExit, match="server.key_secret is missing"):
        store.server_pair()  # an actor host cannot act as a server

    before = (d / "server.key_secret").read_bytes()
    with pytest.raises(SystemExit, match="--force"):
        cli(["keys", str(d)])
    assert (d / "server.key_secret").read_bytes() == before
    assert cli(["keys", str(d), "--force"]) == 0
    assert (d / "server.key_secret").read_bytes() != before
    # --force replaces everything: the old client keys are no longer authorized.
    assert sorted(p.name for p in (d / "authorized").iterdir()) == ["client.key"]
    assert not list((d / "clients").iterdir())


def test_secret_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    K.create(tmp_path / "k")
    (tmp_path / "k" / "server.key_secret").chmod(0o644)
    with pytest.raises(SystemExit, match="chmod 600"):
        K.KeyStore(tmp_path / "k").server_pair()


# --------------------------------------------------------------------------- binding rules


def _replay_argv(run_dir: Path, eps: dict[str, str], *extra: str) -> list[str]:
    flags = ["--env", "CartPole-v1", "--run-dir", str(run_dir), "--capacity", "4096", "--batch-size", "16",
             "--min-size", "64", "--prefetch", "2"]
    for name, ep in eps.items():
        flags += [f"--{name}", ep]
    return [*flags, *extra]


def test_non_loopback_bind_needs_keys_or_insecure(tmp_path: Path) -> None:
    eps = loopback_endpoints(free_port_base())
    eps["experience"] = eps["experience"].replace("127.0.0.1", "0.0.0.0")
    r = subprocess.run([sys.executable, "-m", "replay_server", *_replay_argv(tmp_path, eps)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "refusing to bind tcp://0.0.0.0" in r.stderr and "--keys" in r.stderr and "--insecure" in r.stderr, \
        r.stderr[-2000:]
    # With keys the same address binds: test_only_authorized_clients_get_through runs on it.


# --------------------------------------------------------------------------- who gets through


def _chunk(rng: np.random.Generator, n: int = 8) -> list:
    """A valid CartPole experience chunk of n transitions."""
    data, offsets = wire.frame_table(wire.compress_obs(rng.standard_normal((n + 1, 4)).astype(np.float32)))
    return wire.encode(wire.ExperienceChunk(
        sender="client", seq=1, obs_shape=(4,), obs_dtype="float32", frame_data=data, frame_offsets=offsets,
        obs_idx=np.arange(n, dtype=np.int32), next_idx=np.arange(1, n + 1, dtype=np.int32),
        action=rng.integers(0, 2, n).astype(np.int32), ret=np.ones(n, np.float32),
        disc=np.full(n, 0.97, np.float32), priority=np.ones(n, np.float32)))


def _priorities(ids: np.ndarray, incarnation: int = 0) -> list:
    return wire.encode(wire.PriorityUpdate(sender="client", seq=1, ids=ids.astype(np.int64),
                                           priority=np.full(len(ids), 5.0, np.float32), incarnation=incarnation))


MALFORMED = [b"\x81\xa1v\x01", b"not a message"]  # a header without a type, and a stray frame


class Telemetry:
    """The test's telemetry server: reports from the roles, decoded like the evaluator does."""

    def __init__(self, sock: zmq.asyncio.Socket, procs: dict[str, subprocess.Popen], logs: Path) -> None:
        self.sock, self.procs, self.logs = sock, procs, logs

    async def report(self, role: str, since: float, timeout: float = 60.0) -> dict[str, float]:
        """The metrics of the first report of ``role`` sent after ``since`` (wall clock)."""
        deadline = time.monotonic() + timeout
        while True:
            for name, p in self.procs.items():
                assert p.poll() is None, f"{name} exited {p.returncode}: {(self.logs / name).read_text()[-3000:]}"
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no {role} report within {timeout:.0f}s (is its telemetry CURVE client rejected?)")
            try:
                frames = await asyncio.wait_for(self.sock.recv_multipart(), min(left, 1.0))
            except asyncio.TimeoutError:
                continue
            t = wire.decode_telemetry(frames)
            if t.role == role and t.time > since:
                return t.metrics


async def _try_send(sock: zmq.asyncio.Socket, frames: list) -> None:
    """Send, or give up soon: the project's sockets (ZMQ_IMMEDIATE) queue nothing before a handshake
    succeeds, so the revoked client's sends block; the others queue and keep retrying."""
    try:
        await asyncio.wait_for(sock.send_multipart(frames), 0.2)
    except asyncio.TimeoutError:
        pass


async def _nothing_arrives(sock: zmq.asyncio.Socket, what: str) -> None:
    assert not await sock.poll(100), f"{what} received a message"


def _rogue_socket(ctx: zmq.asyncio.Context, kind: int, endpoint: str,
                  curve: tuple[bytes, bytes, bytes] | None) -> zmq.asyncio.Socket:
    """A socket outside the project's transport: NULL security, or CURVE with ``curve`` =
    (server public key, client public key, client secret key)."""
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        s.curve_serverkey, s.curve_publickey, s.curve_secretkey = curve
    if kind == zmq.SUB:
        s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(endpoint)
    return s


def test_only_authorized_clients_get_through(tmp_path: Path) -> None:
    keydir = tmp_path / "keys"
    K.create(keydir, clients=2)
    (keydir / "authorized" / "client-2.key").unlink()  # revoke client-2 (before the roles start)
    eps = loopback_endpoints(free_port_base())
    # The experience socket binds every interface: allowed because the run has keys.
    eps_replay = dict(eps, experience=eps["experience"].replace("127.0.0.1", "0.0.0.0"))
    unused = loopback_endpoints(free_port_base())  # the learner trains on nothing: counters stay ours
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = {"replay": start_role("replay_server", _replay_argv(tmp_path / "run", eps_replay, "--keys", str(keydir)),
                                  logs / "replay"),
             "learner": start_role("learner", ["--env", "CartPole-v1", "--run-dir", str(tmp_path / "run"),
                                               "--keys", str(keydir), "--weights", eps["weights"],
                                               "--telemetry", eps["telemetry"], "--samples", unused["samples"],
                                               "--priorities", unused["priorities"], "--weights-period", "0.2"],
                                   logs / "learner")}
    try:
        asyncio.run(_scenario(keydir, eps, procs, logs))
    finally:
        stop_all(list(procs.values()))
    for name, p in procs.items():
        assert p.returncode == 0, f"{name} exited {p.returncode}: {(logs / name).read_text()[-3000:]}"
    # The operator can see who was turned away: the unknown and the revoked key (a client without
    # CURVE never gets as far as the authenticator).
    refused = (logs / "replay").read_text().count("refused a CURVE client with key")
    assert refused == 2, (logs / "replay").read_text()[-3000:]


async def _scenario(keydir: Path, eps: dict[str, str], procs: dict[str, subprocess.Popen], logs: Path) -> None:
    rng = np.random.default_rng(7)
    server = Sockets(keys=str(keydir))  # like the evaluator: a CURVE server with the ZAP authenticator
    rogue_ctx = zmq.asyncio.Context()
    clients: list[Sockets] = []
    try:
        tel_sock = server.bind(zmq.SUB, eps["telemetry"], hwm=1000)
        tel_sock.setsockopt(zmq.SUBSCRIBE, b"")
        tel = Telemetry(tel_sock, procs, logs)
        start = time.time()
        await tel.report("learner", start)  # the learner's CURVE client key got it through
        base = await tel.report("replay", start)
        assert (base["replay/size"], base["replay/rejected"], base["replay/updated"]) == (0, 0, 0), base

        # --- three rogue clients try everything
        server_public = K.KeyStore(keydir).server_public()
        revoked = Sockets(keys=str(keydir / "clients" / "client-2"))
        clients.append(revoked)
        rogues: dict[str, dict[str, zmq.asyncio.Socket]] = {}
        for name in ("no key", "unknown key", "revoked key"):
            if name == "revoked key":
                make = lambda kind, ep, **kw: revoked.connect(kind, ep, **kw)  # noqa: E731
            else:  # the right server key and a fresh pair of its own that was never authorized
                curve = (server_public, *zmq.curve_keypair()) if name == "unknown key" else None
                make = lambda kind, ep, curve=curve, **kw: _rogue_socket(rogue_ctx, kind, ep, curve)  # noqa: E731
            rogues[name] = {"experience": make(zmq.PUSH, eps["experience"]),
                            "priorities": make(zmq.PUSH, eps["priorities"]),
                            "samples": make(zmq.PULL, eps["samples"]),
                            "weights": make(zmq.SUB, eps["weights"], subscribe=True)}
        for socks in rogues.values():
            for _ in range(12):  # enough to start sampling, were it accepted
                await _try_send(socks["experience"], _chunk(rng))
            await _try_send(socks["experience"], MALFORMED)
            await _try_send(socks["priorities"], _priorities(np.arange(8)))
            await _try_send(socks["priorities"], MALFORMED)
        await asyncio.sleep(NO_TRAFFIC_S)
        after_rogues = await tel.report("replay", time.time())
        assert (after_rogues["replay/size"], after_rogues["replay/rejected"], after_rogues["replay/updated"]) \
            == (0, 0, 0), f"rogue traffic reached the replay server: {after_rogues}"
        for name, socks in rogues.items():
            await _nothing_arrives(socks["weights"], f"{name} weights SUB")
            await _nothing_arrives(socks["samples"], f"{name} samples PULL")

        # --- an authorized client (a per-host client key directory) gets through, all of it
        good = Sockets(keys=str(keydir / "clients" / "client-1"))
        clients.append(good)
        exp = good.connect(zmq.PUSH, eps["experience"])
        # 16 messages: enough for the replay server to start sampling.
        sizes = [int(rng.integers(6, 12)) for _ in range(15)]
        for n in sizes:
            await exp.send_multipart(_chunk(rng, n))
        await exp.send_multipart(MALFORMED)
        samples = good.connect(zmq.PULL, eps["samples"], hwm=2)
        batch = wire.decode_sample(await asyncio.wait_for(samples.recv_multipart(), 30))
        assert len(batch.ids) == 16 and batch.ids.max() < sum(sizes)
        prios = good.connect(zmq.PUSH, eps["priorities"])
        await prios.send_multipart(_priorities(batch.ids, batch.incarnation))
        await prios.send_multipart(MALFORMED)
        # The default client pair of the full key directory, as the evaluator uses for weights.
        default = Sockets(keys=str(keydir))
        clients.append(default)
        weights = default.connect(zmq.SUB, eps["weights"], hwm=2, subscribe=True)
        w = wire.decode_weights(await asyncio.wait_for(weights.recv_multipart(), 30))
        assert w.sender == "learner" and w.names

        deadline = time.monotonic() + 30
        while True:
            m = await tel.report("replay", time.time())
            if m["replay/updated"] >= len(batch.ids) or time.monotonic() > deadline:
                break
        assert m["replay/size"] == sum(sizes), m  # the rogues' 36 chunks never landed
        assert m["replay/rejected_experience"] == 1 and m["replay/rejected_priorities"] == 1, m
        assert m["replay/updated"] == len(batch.ids), m

        # --- while samples and weights flow to the authorized client, still nothing for the rogues
        await asyncio.sleep(1.0)
        for name, socks in rogues.items():
            await _nothing_arrives(socks["weights"], f"{name} weights SUB")
            await _nothing_arrives(socks["samples"], f"{name} samples PULL")
        assert await samples.poll(5000), "the authorized client stopped getting samples"
    finally:
        rogue_ctx.destroy(linger=0)
        for c in clients:
            c.close()
        server.close()


# --------------------------------------------------------------------------- the gradients socket


def test_only_authorized_clients_push_gradients(tmp_path: Path) -> None:
    """A learner of the asynchronous family with --keys: gradients from clients without an authorized
    key never reach it (nothing applied, nothing even counted as rejected); an authorized client's
    gradient, computed at the weights it received, is applied, and its malformed one counted."""
    keydir = tmp_path / "keys"
    K.create(keydir, clients=2)
    (keydir / "authorized" / "client-2.key").unlink()  # revoked
    eps = loopback_endpoints(free_port_base())
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = {"learner": start_role("learner", ["--env", "CartPole-v1", "--algo", "a3c",
                                               "--run-dir", str(tmp_path / "run"),
                                               "--keys", str(keydir), "--weights", eps["weights"],
                                               "--gradients", eps["gradients"], "--telemetry", eps["telemetry"],
                                               "--weights-period", "0.2"], logs / "learner")}
    try:
        asyncio.run(_gradients_scenario(keydir, eps, procs, logs))
    finally:
        stop_all(list(procs.values()))
    assert procs["learner"].returncode == 0, (logs / "learner").read_text()[-3000:]
    assert (logs / "learner").read_text().count("refused a CURVE client with key") == 2


async def _gradients_scenario(keydir: Path, eps: dict[str, str], procs: dict[str, subprocess.Popen],
                              logs: Path) -> None:
    from apex_zmq.asyncrl import gradient_arrays
    from apex_zmq.envs import env_spec
    from apex_zmq.models import build_network
    from apex_zmq.networks import load_arrays

    server = Sockets(keys=str(keydir))
    rogue_ctx = zmq.asyncio.Context()
    clients: list[Sockets] = []
    try:
        tel_sock = server.bind(zmq.SUB, eps["telemetry"], hwm=1000)
        tel_sock.setsockopt(zmq.SUBSCRIBE, b"")
        tel = Telemetry(tel_sock, procs, logs)
        # The weights, from an authorized subscriber: version and incarnation a real gradient carries.
        good = Sockets(keys=str(keydir / "clients" / "client-1"))
        clients.append(good)
        w = wire.decode_weights(await asyncio.wait_for(
            good.connect(zmq.SUB, eps["weights"], hwm=2, subscribe=True).recv_multipart(), 30))
        net = build_network(env_spec("CartPole-v1"), 64, "a3c")
        load_arrays(net, w.names, w.arrays)
        for p in net.parameters():
            p.grad = torch.ones_like(p)
        names, arrays = gradient_arrays(net)
        gradient = wire.encode(wire.Gradients(sender="client", seq=1, version=w.version, names=names, arrays=arrays,
                                              incarnation=w.incarnation, steps=8, loss=1.0))

        revoked = Sockets(keys=str(keydir / "clients" / "client-2"))
        clients.append(revoked)
        server_public = K.KeyStore(keydir).server_public()
        rogues = [_rogue_socket(rogue_ctx, zmq.PUSH, eps["gradients"], None),
                  _rogue_socket(rogue_ctx, zmq.PUSH, eps["gradients"], (server_public, *zmq.curve_keypair())),
                  revoked.connect(zmq.PUSH, eps["gradients"])]
        for sock in rogues:
            for _ in range(5):
                await _try_send(sock, gradient)
            await _try_send(sock, MALFORMED)
        await asyncio.sleep(NO_TRAFFIC_S)
        m = await tel.report("learner", time.time())
        assert (m["learner/gradients_applied"], m["learner/rejected"], m["learner/stale_dropped"]) == (0, 0, 0), \
            f"rogue gradients reached the learner: {m}"
        assert m["learner/steps"] == w.version

        push = good.connect(zmq.PUSH, eps["gradients"])
        await push.send_multipart(gradient)
        await push.send_multipart(MALFORMED)
        deadline = time.monotonic() + 30
        while True:
            m = await tel.report("learner", time.time())
            if m["learner/gradients_applied"] >= 1 and m["learner/rejected"] >= 1 or time.monotonic() > deadline:
                break
        assert (m["learner/gradients_applied"], m["learner/rejected"], m["learner/stale_dropped"]) == (1, 1, 0), m
        assert m["learner/steps"] == w.version + 1
    finally:
        rogue_ctx.destroy(linger=0)
        for c in clients:
            c.close()
        server.close()
