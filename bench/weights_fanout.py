"""Weight-publish cost against the number of subscribing actors: direct vs through one relay.

A publisher process stands in for the learner: a PUB with the learner's high-water mark sends a real
Atari weights message (the Nature dueling CNN of ``--env``, built by ``models.build_network`` and
encoded by ``wire``) ``--publishes`` times. N subscriber SUB sockets, spread over up to
``--sub-procs`` processes, receive and strictly decode each message and acknowledge it over PUSH, so
the publisher knows when all N have it before it sends the next one (no message is lost to a
high-water mark, and the next publish does not overlap the previous one).

Two layouts for each N: **direct** (the N subscribers connect to the publisher, as actors do without
a relay) and **relay** (a real ``python -m apex_zmq.relay`` process connects to the publisher and
the N subscribers connect to it: one actor host behind its relay).

Measured per publish, in the publisher process:
  * bytes the publisher's TCP connections sent, from the kernel's ``tcpi_bytes_sent`` of every
    established connection on the publisher's port (``ss -ti``), and how many connections there are;
  * CPU time of the publisher process (``getrusage(RUSAGE_SELF)``: every thread, ZeroMQ's I/O
    thread included), and of the relay process (``/proc/<pid>/stat``, 10 ms ticks);
  * time from send until all N subscribers have acknowledged the decoded message.

All of it runs on one machine, so the subscribers and the relay compete with the publisher for
cores: the latency column is pessimistic there, the publisher's bytes and CPU are its own.
``--curve``: every connection is CURVE-encrypted (keys from ``apex_zmq.keys``; the relay gets
``--keys``), as across hosts in a real deployment: the publisher then encrypts once per connection.

    .venv/bin/python bench/weights_fanout.py [--counts 1,2,4,8,16,32] [--publishes 10] [--curve]

Last line: ``publisher_cpu_ms_direct_<N>=.. publisher_cpu_ms_relay_<N>=.. ratio=..`` and the bytes
and latency for the largest N.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, free_port_base, print_machine  # noqa: E402

LEARNER_HWM = 4  # the learner's weights PUB (learner/main.py)
ACTOR_HWM = 2    # an actor's weights SUB (actor/main.py)
ACK_TIMEOUT_S = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def ep(port: int) -> str:
    return f"tcp://127.0.0.1:{port}"


def tcp_sent(port: int) -> tuple[int, int]:
    """(established connections on local ``port``, bytes they have sent) from the kernel's tcp_info."""
    out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    sent = [int(v) for v in re.findall(r"\bbytes_sent:(\d+)", out)]
    conns = sum(1 for line in out.splitlines() if line and not line[0].isspace())  # info lines are indented
    return conns, sum(sent)


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def cpu_s() -> float:
    """CPU time of this process, every thread included."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def curve_options(keys: str, server: bool) -> list[tuple[int, bytes | int]]:
    """Socket options for a CURVE server (the publisher) or client (a subscriber); none without keys."""
    if not keys:
        return []
    import zmq
    import zmq.auth
    server_public, server_secret = zmq.auth.load_certificate(Path(keys, "server.key_secret"))
    if server:  # no ZAP handler in the publisher's context: it admits every client (a benchmark)
        return [(zmq.CURVE_SERVER, 1), (zmq.CURVE_PUBLICKEY, server_public),
                (zmq.CURVE_SECRETKEY, server_secret)]
    public, secret = zmq.auth.load_certificate(Path(keys, "client.key_secret"))
    return [(zmq.CURVE_SERVERKEY, server_public), (zmq.CURVE_PUBLICKEY, public), (zmq.CURVE_SECRETKEY, secret)]


def subscriber(endpoint: str, ack: str, ids: list[int], stop: mp.Event, keys: str) -> None:
    """Process body: one SUB per id (as actors' weights sockets); decode each message, acknowledge."""
    import struct

    import zmq

    from apex_zmq.wire import decode_weights
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(ack)
    poller = zmq.Poller()
    socks = {}
    for i in ids:
        s = ctx.socket(zmq.SUB)
        s.setsockopt(zmq.RCVHWM, ACTOR_HWM)
        for opt, value in curve_options(keys, server=False):
            s.setsockopt(opt, value)
        s.setsockopt(zmq.SUBSCRIBE, b"")
        s.connect(endpoint)
        socks[s] = i
        poller.register(s, zmq.POLLIN)
    while not stop.is_set():
        for s, _ in poller.poll(200):  # the timeout only bounds how late ``stop`` is seen
            w = decode_weights(s.recv_multipart(copy=False))
            push.send(struct.pack("<iq", socks[s], w.version))
    ctx.destroy(linger=0)


def publisher(conn: Connection, env: str, hidden: int, pub: str, ack: str, keys: str) -> None:
    """Process body: the learner's weights PUB; runs one measurement per request on ``conn``."""
    import struct

    import zmq

    from apex_zmq.envs import env_spec
    from apex_zmq.models import build_network
    from apex_zmq.networks import state_arrays
    from apex_zmq.wire import Weights, encode
    names, arrays = state_arrays(build_network(env_spec(env), hidden))

    def message(version: int) -> list:
        # A new header per version; the array frames are the same buffers (no copy).
        return encode(Weights(sender="learner", seq=version, version=version, names=names, arrays=arrays))

    size = sum(memoryview(f).nbytes for f in message(0))
    ctx = zmq.Context()
    out = ctx.socket(zmq.PUB)
    out.setsockopt(zmq.SNDHWM, LEARNER_HWM)
    out.setsockopt(zmq.LINGER, 0)
    for opt, value in curve_options(keys, server=True):
        out.setsockopt(opt, value)
    out.bind(pub)
    acks = ctx.socket(zmq.PULL)
    acks.bind(ack)
    port = int(pub.rsplit(":", 1)[1])
    conn.send({"message_bytes": size})

    def wait_acks(version: int, n: int, timeout_s: float) -> bool:
        # Acks of other versions are stale (a relay's resend of its cache, warm-up publishes).
        have: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(have) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not acks.poll(int(left * 1000)):
                return False
            sub, v = struct.unpack("<iq", acks.recv())
            if v == version:
                have.add(sub)
        return True

    version = 0
    while (req := conn.recv()) is not None:
        n, k, relay_pid = req
        # Warm-up: publish until every subscriber acknowledges one version, i.e. all are connected
        # and subscribed (through the relay too); then K measured publishes.
        while True:
            version += 1
            out.send_multipart(message(version), copy=False)
            if wait_acks(version, n, 2.0):
                break
        msgs = [message(version + 1 + i) for i in range(k)]  # encoded outside the timed window
        conns0, sent0 = tcp_sent(port)
        relay0 = proc_cpu_s(relay_pid) if relay_pid else 0.0
        cpu0 = cpu_s()
        latencies = []
        for m in msgs:
            version += 1
            t0 = time.perf_counter()
            out.send_multipart(m, copy=False)
            if not wait_acks(version, n, ACK_TIMEOUT_S):
                raise RuntimeError(f"N={n}: not every subscriber got version {version}")
            latencies.append(time.perf_counter() - t0)
        cpu1 = cpu_s()
        relay1 = proc_cpu_s(relay_pid) if relay_pid else 0.0
        conns1, sent1 = tcp_sent(port)
        conn.send({"conns": min(conns0, conns1), "bytes": (sent1 - sent0) / k,
                   "cpu_ms": (cpu1 - cpu0) / k * 1e3, "relay_cpu_ms": (relay1 - relay0) / k * 1e3,
                   "lat_ms": statistics.median(latencies) * 1e3, "lat_max_ms": max(latencies) * 1e3})
    ctx.destroy(linger=0)


def start_relay(upstream: str, local: str, run_dir: str, keys: str) -> subprocess.Popen:
    """A real relay process (its telemetry goes to a port nobody binds)."""
    tel = ep(free_port_base(1))
    return subprocess.Popen([sys.executable, "-m", "apex_zmq.relay", "--weights", upstream,
                             "--relay-weights", local, "--telemetry", tel, "--run-dir", run_dir,
                             *(["--keys", keys] if keys else [])],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)


def run_case(ctl: Connection, mpc, mode: str, n: int, k: int, pub: str, ack: str, sub_procs: int,
             run_dir: str, keys: str) -> dict:
    """One measurement: N subscribers, direct or behind a fresh relay."""
    relay = None
    target = pub
    if mode == "relay":
        target = ep(free_port_base(1))
        relay = start_relay(pub, target, run_dir, keys)
    stop = mpc.Event()
    groups = [list(range(n))[j::min(n, sub_procs)] for j in range(min(n, sub_procs))]
    subs = [mpc.Process(target=subscriber, args=(target, ack, g, stop, keys), daemon=True) for g in groups]
    for p in subs:
        p.start()
    try:
        ctl.send((n, k, relay.pid if relay else 0))
        return ctl.recv()
    finally:
        stop.set()
        for p in subs:
            p.join(5)
            if p.is_alive():
                p.kill()
        if relay is not None:
            relay.terminate()
            relay.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="1,2,4,8,16,32", help="subscriber counts N")
    ap.add_argument("--publishes", type=int, default=10, help="measured publishes per case (K)")
    ap.add_argument("--sub-procs", type=int, default=4, help="processes the N subscribers are spread over")
    ap.add_argument("--env", default="ALE/Pong-v5")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--curve", action="store_true", help="CURVE on every connection, as across hosts")
    args = ap.parse_args()
    print_machine()
    counts = [int(c) for c in args.counts.split(",")]
    mpc = mp.get_context("spawn")  # no fork of a process with ZeroMQ or torch threads
    tmp = tempfile.TemporaryDirectory()
    keys = ""
    if args.curve:
        from apex_zmq.keys import create
        keys = str(Path(tmp.name, "keys"))
        create(keys)
    run_dir = str(Path(tmp.name, "run"))
    base = free_port_base(2)
    pub, ack = ep(base), ep(base + 1)
    ctl, child = mpc.Pipe()
    pub_proc = mpc.Process(target=publisher, args=(child, args.env, args.hidden, pub, ack, keys),
                           daemon=True)
    pub_proc.start()
    size = ctl.recv()["message_bytes"]
    print(f"weights message: {args.env}, hidden {args.hidden}: {size / 1e6:.2f} MB; {args.publishes} "
          f"publishes per case; {'CURVE' if keys else 'plain TCP'}; {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at start", flush=True)
    header = (f"{'mode':6s} {'N':>3s} {'conns':>5s} {'MB sent/pub':>11s} {'x msg':>6s} {'pub CPU ms':>10s} "
              f"{'relay CPU ms':>12s} {'all have it ms':>14s} {'max ms':>7s}")
    print(header)
    print("-" * len(header))
    results: dict[tuple[str, int], dict] = {}
    try:
        for n in counts:
            for mode in ("direct", "relay"):
                r = run_case(ctl, mpc, mode, n, args.publishes, pub, ack, args.sub_procs, run_dir, keys)
                results[mode, n] = r
                relay_cpu = f"{r['relay_cpu_ms']:12.1f}" if mode == "relay" else f"{'-':>12s}"
                print(f"{mode:6s} {n:3d} {r['conns']:5d} {r['bytes'] / 1e6:11.2f} {r['bytes'] / size:6.2f} "
                      f"{r['cpu_ms']:10.1f} {relay_cpu} {r['lat_ms']:14.1f} {r['lat_max_ms']:7.1f}",
                      flush=True)
    finally:
        ctl.send(None)
        pub_proc.join(10)
        tmp.cleanup()
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    n = counts[-1]
    d, r = results["direct", n], results["relay", n]
    print(f"publisher_cpu_ms_direct_{n}={d['cpu_ms']:.2f} publisher_cpu_ms_relay_{n}={r['cpu_ms']:.2f} "
          f"ratio={d['cpu_ms'] / r['cpu_ms']:.2f} publisher_mb_direct_{n}={d['bytes'] / 1e6:.2f} "
          f"publisher_mb_relay_{n}={r['bytes'] / 1e6:.2f} relay_cpu_ms_{n}={r['relay_cpu_ms']:.1f} "
          f"all_have_it_ms_direct_{n}={d['lat_ms']:.1f} all_have_it_ms_relay_{n}={r['lat_ms']:.1f}")


if __name__ == "__main__":
    main()
