"""apex_zmq/flow.py: the socket table the roles open their sockets from, and the bounds computed from it.

* every socket of every program, made by ``transport.Sockets.open``, has the table's high-water marks
  and the config's kernel buffers (read back with getsockopt), and the kernel took them (``ss``);
* no role makes a socket any other way;
* the header bound the message-size bounds rely on holds for the largest header values;
* the bounds' arithmetic, and PROTOCOL.md 2.4's tables are what ``apex-zmq bounds`` prints.

tests/test_inflight.py checks the bounds against real roles.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
import subprocess
import types
import msgpack
import numpy as np
import pytest
import zmq
from conftest import ROOT, free_port_base

from apex_zmq import config as C
from apex_zmq import flow, wire
from apex_zmq.transport import Sockets

# A distinct kernel buffer per setting, so a socket given another socket's setting is caught.
BUFFERS = {name: C.MIN_BUFFER * (i + 2) for i, name in enumerate(C.BUFFER_FIELDS)}


def _cfg(port_base: int, **over) -> types.SimpleNamespace:
    """Every setting a socket of any program reads: the launcher's defaults, loopback endpoints, the relay's."""
    values = dataclasses.asdict(C.LaunchConfig())
    values.update(C.loopback_endpoints(port_base), relay_weights=C.endpoint(C.LOOPBACK, port_base + 5),
                  prefetch=3, **BUFFERS)
    values.update(over)
    return types.SimpleNamespace(**values)


@pytest.mark.parametrize("role,name", sorted(flow.SOCKETS))
def test_open_sets_the_tables_hwm_and_the_configs_kernel_buffers(role: str, name: str) -> None:
    spec = flow.SOCKETS[(role, name)]

    async def check() -> None:
        socks = Sockets()
        try:
            for sync in (False, True):  # a role's event loop socket, and one a worker thread owns
                cfg = _cfg(free_port_base())
                s = socks.open(cfg, role, name, sync=sync)
                assert s.getsockopt(zmq.TYPE) == getattr(zmq, spec.pattern)
                assert s.getsockopt(zmq.SNDHWM) == s.getsockopt(zmq.RCVHWM) == spec.hwm_of(cfg)
                assert s.getsockopt(zmq.SNDBUF) == s.getsockopt(zmq.RCVBUF) == BUFFERS[spec.buffer]
                assert s.getsockopt(zmq.MAXMSGSIZE) > 0 and s.getsockopt(zmq.LINGER) == 0
                assert s.getsockopt(zmq.LAST_ENDPOINT).decode() == getattr(cfg, spec.endpoint)
        finally:
            socks.close()
    asyncio.run(check())


def test_a_setting_of_0_leaves_the_buffers_to_the_os() -> None:
    cfg = _cfg(free_port_base(), samples_buffer=0)

    async def check() -> None:
        socks = Sockets()
        try:
            s = socks.open(cfg, "learner", "samples")
            assert s.getsockopt(zmq.SNDBUF) == s.getsockopt(zmq.RCVBUF) == -1  # libzmq's "not set"
        finally:
            socks.close()
    asyncio.run(check())


def test_prefetch_is_the_replay_servers_samples_hwm() -> None:
    cfg = _cfg(free_port_base(), prefetch=7)
    assert flow.SOCKETS[("replay_server", "samples")].hwm_of(cfg) == 7


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_the_kernel_holds_the_buffers_it_was_given() -> None:
    """Both ends of a samples connection, as ss reports their sockets: Linux doubles the value given
    (the listening socket's buffers pass to the accepted one) and autotuning no longer grows them."""
    base = free_port_base()
    cfg = _cfg(base)
    port = base + 1  # samples

    async def check() -> str:
        socks = Sockets()
        try:
            push = socks.open(cfg, "replay_server", "samples")
            pull = socks.open(cfg, "learner", "samples")
            await push.send(b"x")
            assert await asyncio.wait_for(pull.recv(), 10) == b"x"
            return subprocess.run(["ss", "-tmn", f"( sport = :{port} or dport = :{port} )"], capture_output=True,
                                  text=True, check=True).stdout
        finally:
            socks.close()
    out = asyncio.run(check())
    held = re.findall(r"rb(\d+),t\d+,tb(\d+)", out)
    assert len(held) == 2, out
    assert all(int(rb) == int(tb) == 2 * BUFFERS["samples_buffer"] for rb, tb in held), out


def test_no_role_makes_a_socket_but_from_the_table() -> None:
    files = [*(ROOT / d / f for d, f in (("actor", "main.py"), ("actor", "actor_learner.py"),
                                          ("replay_server", "main.py"), ("learner", "main.py"),
                                          ("learner", "param_server.py"), ("evaluator", "main.py"))),
             ROOT / "apex_zmq" / "relay.py"]
    for f in files:
        text = f.read_text()
        assert "socks.open(cfg" in text, f
        assert not re.search(r"socks\.(bind|connect)\(", text), f"{f}: a socket made outside flow.SOCKETS"
    roles = {role for role, _ in flow.SOCKETS}
    assert roles == {"actor", "actor_learner", "replay_server", "learner", "param_server", "evaluator", "relay"}


# --------------------------------------------------------------------------- message sizes


def _header(frames: list) -> bytes:
    return bytes(frames[0])


def test_headers_fit_header_bytes_at_their_largest() -> None:
    """The largest values each header field takes (a 256-character sender, the largest ints, a 4-d
    shape): the message-size bounds add HEADER_BYTES for the header."""
    big, inc, sender = 2**63 - 1, wire.MAX_INCARNATION - 1, "s" * 256
    n = 3
    i32, i64, f32 = (np.zeros(n, t) for t in (np.int32, np.int64, np.float32))
    table = dict(obs_shape=(4096, 4096, 1, 1), obs_dtype="float32", frame_data=b"\0" * 3,
                 frame_offsets=np.arange(4, dtype=np.int64), obs_idx=i32, next_idx=i32, action=i32, ret=f32, disc=f32)
    headers = [
        wire.encode(wire.ExperienceChunk(sender=sender, seq=big, priority=f32, **table)),
        wire.encode(wire.SampleBatch(sender=sender, seq=big, ids=i64, weight=f32, incarnation=inc, **table)),
        wire.encode(wire.PriorityUpdate(sender=sender, seq=big, ids=i64, priority=f32, incarnation=inc, remove=i64)),
    ]
    for frames in headers:
        h = msgpack.unpackb(_header(frames))
        # The counts may reach 2^32 - 1 (a uint32 in msgpack: 5 bytes, as large as any count gets here).
        h["a"] = [[name, 2**32 - 1] for name, _ in h["a"]]
        assert len(msgpack.packb(h)) <= flow.HEADER_BYTES, h["t"]


def test_message_sizes_bound_real_messages() -> None:
    rng = np.random.default_rng(0)
    for obs_shape, dtype in (((4,), np.float32), ((4, 84, 84), np.uint8)):
        batch = 16
        obs = (rng.random((2 * batch, *obs_shape)) * 255).astype(dtype)  # incompressible: the largest blobs
        data, offsets = wire.frame_table(wire.compress_obs(obs))
        msg = wire.SampleBatch(seq=1, obs_shape=obs_shape, obs_dtype=np.dtype(dtype).name, frame_data=data,
                               frame_offsets=offsets, obs_idx=np.arange(batch, dtype=np.int32),
                               next_idx=np.arange(batch, 2 * batch, dtype=np.int32),
                               action=np.zeros(batch, np.int32), ret=np.zeros(batch, np.float32),
                               disc=np.zeros(batch, np.float32), ids=np.arange(batch, dtype=np.int64),
                               weight=np.ones(batch, np.float32))
        size = flow.wire_bytes(wire.encode(msg))
        small, large = flow.sample_bytes(batch, obs[0].nbytes)
        assert small <= size <= large
    # The stack layout at its largest: every frame of every stack distinct and incompressible.
    frames = (rng.random((2 * batch * 4, 84, 84)) * 255).astype(np.uint8)
    data, offsets = wire.frame_table(wire.compress_obs(frames))
    idx = np.arange(2 * batch * 4, dtype=np.int32).reshape(2 * batch, 4)
    msg = wire.SampleBatch(seq=1, obs_shape=(4, 84, 84), obs_dtype="uint8", frame_data=data, frame_offsets=offsets,
                           obs_idx=idx[:batch], next_idx=idx[batch:], action=np.zeros(batch, np.int32),
                           ret=np.zeros(batch, np.float32), disc=np.zeros(batch, np.float32),
                           ids=np.arange(batch, dtype=np.int64), weight=np.ones(batch, np.float32))
    small, large = flow.sample_bytes(batch, 4 * 84 * 84, stack=4)
    assert small <= flow.wire_bytes(wire.encode(msg)) <= large
    upd = wire.PriorityUpdate(sender="learner", seq=1, ids=np.arange(batch), priority=np.ones(batch, np.float32),
                              remove=np.arange(batch))
    small, large = flow.priorities_bytes(batch)
    assert small <= flow.wire_bytes(wire.encode(upd)) <= large


# --------------------------------------------------------------------------- the arithmetic


def test_bounds_arithmetic() -> None:
    ln = flow.Link("samples", ("replay_server", "samples"), ("learner", "samples"), snd_hwm=4, rcv_hwm=1,
                   snd_buf=16384, rcv_buf=16384, max_message=20_000, min_message=4_000)
    kernel = 2 * 16384 + flow.KERNEL_SEGMENT_BYTES + 2 * 16384
    assert ln.kernel_bytes == kernel
    assert ln.bytes_bound == 7 * 20_000 + kernel + 2 * flow.ZMQ_BATCH_BYTES
    assert ln.messages_bound == 4 + 1 + 2 + (kernel + 2 * flow.ZMQ_BATCH_BYTES) // 4_000
    os_tuned = dataclasses.replace(ln, snd_buf=0)
    assert os_tuned.kernel_bytes is os_tuned.bytes_bound is os_tuned.messages_bound is None


@pytest.mark.parametrize("loader_threads", [0, 2])
def test_priority_lag_adds_the_pipeline(loader_threads: int) -> None:
    cfg = _cfg(free_port_base(), loader_threads=loader_threads, batch_size=64)
    plan = flow.links(cfg, obs_bytes=16)
    held = 1 if loader_threads == 0 else 1 + loader_threads + flow.LOADER_QUEUE
    assert plan["samples"].pipes == max(1, loader_threads)
    assert flow.priority_lag_bound(cfg, plan) == \
        1 + plan["samples"].pipes * plan["samples"].messages_bound + held + plan["priorities"].messages_bound
    assert "weights" not in plan  # needs the network: the learner states it
    assert flow.priority_lag_bound(cfg, flow.links(_cfg(free_port_base(), samples_buffer=0), 16)) is None


def test_buffers_below_the_floor_are_refused() -> None:
    with pytest.raises(C.ConfigError, match="--samples-buffer"):
        C.parse(C.ReplayConfig, ["--env", "CartPole-v1", "--samples-buffer", "100"], "replay_server")
    assert C.parse(C.ReplayConfig, ["--env", "CartPole-v1", "--samples-buffer", "0"], "replay_server").samples_buffer == 0


# --------------------------------------------------------------------------- PROTOCOL.md 2.4


@pytest.mark.parametrize("env", ["CartPole-v1", "ALE/Pong-v5"])
def test_protocol_tables_are_what_bounds_prints(env: str) -> None:
    pytest.importorskip("ale_py") if env.startswith("ALE/") else None
    cfg = C.parse(C.LaunchConfig, ["--env", env], "run")
    doc = (ROOT / "PROTOCOL.md").read_text()
    m = re.search(rf"<!-- bounds env={re.escape(env)} -->\n(.*?)\n<!-- /bounds -->", doc, re.S)
    assert m, f"no <!-- bounds env={env} --> table in PROTOCOL.md"
    assert m.group(1).strip() == flow.table(cfg, flow.for_run(cfg)).strip()



def test_protocol_socket_table_is_flows() -> None:
    """PROTOCOL.md 2.1: each row's high-water mark and kernel buffer setting are the code's."""
    doc = (ROOT / "PROTOCOL.md").read_text()
    section = doc[doc.index("### 2.1"):doc.index("### 2.2")]
    programs = {"replay server": "replay_server", "learner": "learner", "actor": "actor", "evaluator": "evaluator",
                "relay": "relay", "learner (asynchronous family)": "param_server",
                "actor-learner (asynchronous family)": "actor_learner"}
    seen = set()
    for row in re.findall(r"^\|(.+)\|$", section, re.M):
        cells = [c.strip() for c in row.split("|")]
        if cells[0] not in programs:
            continue
        name = re.search(r"`-*([a-z_-]+)`", cells[1]).group(1).replace("-", "_")
        key = (programs[cells[0]], name)
        spec = flow.SOCKETS[key]
        hwm = "--prefetch" if spec.hwm == "prefetch" else str(spec.hwm)
        assert cells[4].startswith(f"`{hwm}`" if hwm.startswith("--") else hwm), (key, cells[4])
        assert cells[5] == f"`--{spec.buffer.replace('_', '-')}`", (key, cells[5])
        assert cells[3] == ("bind" if spec.binds else "connect"), key
        seen.add(key)
    assert seen == set(flow.SOCKETS)
