"""Socket factory: one place that sets socket options, CURVE security, checks endpoints, and bridges
threads to asyncio.

Security: with a key directory (``--keys``, see ``apex_zmq.keys``) every socket uses CURVE. A
socket a role binds is a CURVE server whatever its pattern (the learner's weights PUB and the
evaluator's telemetry SUB included), and a ZAP authenticator running on the role's event loop admits
only the client keys in ``DIR/authorized/``; a socket a role connects is a CURVE client that presents
the client key pair and checks the server public key. Without keys, traffic is unauthenticated, so a
role binds only loopback addresses unless told ``--insecure``.

Limits on every socket: the maximum frame size, send and receive high-water marks, kernel buffer
sizes (so that what is in flight between two roles is bounded in bytes too: ``apex_zmq.flow``), zero
linger, TCP keepalive (see ``KEEPALIVE_*`` for why not ZMTP heartbeats) and a fresh pipe per connection.
The roles create their sockets with ``Sockets.open`` from ``flow.SOCKETS``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import queue
import signal
import sys
import threading
from typing import Any, Awaitable, Callable, Sequence
from urllib.parse import urlsplit

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from .config import PORT_IN_USE_EXIT
from .flow import SOCKETS
from .keys import KeyStore

MAX_MESSAGE_BYTES = 256 << 20  # largest frame any socket accepts (a 512 Atari batch is ~15 MB)
# Dead peers are found by TCP keepalive (a silent peer is dropped after ~IDLE + CNT x INTVL seconds),
# not by ZMTP heartbeats: libzmq 4.3.5 aborts the whole process ("Assertion failed: !_io_error",
# stream_engine_base.cpp) when a heartbeat timer fires on a connection whose reader has stopped
# (a full pipe: the normal state under backpressure) and whose peer has just reset it.
# tests/test_fuzz.py::test_stalled_receiver_survives_peers_resetting reproduces it.
KEEPALIVE_IDLE_S, KEEPALIVE_INTVL_S, KEEPALIVE_CNT = 10, 5, 3


def host_is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback(endpoint: str) -> bool:
    """True for tcp endpoints on 127.0.0.0/8, ::1 or localhost, and for ipc/inproc.

    Any other transport (ws, udp, pgm, ...) counts as non-loopback: it may reach other hosts.
    """
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    return host_is_loopback(urlsplit(endpoint).hostname or "")


class _AuthorizedKeys:
    """ZAP credentials provider: admits exactly the z85 client public keys it was given, and says
    (once per key, in the role's log) which key it refused, so an operator can tell a host with the
    wrong or a revoked key from a network problem."""

    MAX_REPORTED = 64

    def __init__(self, keys: set[bytes], where: str) -> None:
        self.keys = frozenset(keys)
        self.where = where
        self.denied = 0
        self._reported: set[bytes] = set()

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        self.denied += 1
        if key not in self._reported and len(self._reported) < self.MAX_REPORTED:
            self._reported.add(key)
            print(f"transport: refused a CURVE client with key {key.decode(errors='replace')}: not in "
                  f"{self.where} (further attempts with it are refused silently)", file=sys.stderr, flush=True)
        return False


class Sockets:
    """Creates every socket of one role with the project's options, and closes them all at the end.

    ``keys``: a key directory from ``apex-zmq keys`` (empty: no CURVE). Must be used from inside the
    role's running event loop, where the ZAP authenticator runs.
    """

    def __init__(self, insecure: bool = False, keys: str = "") -> None:
        self.ctx = zmq.asyncio.Context()
        # The same libzmq context for sockets that a worker thread owns and uses with blocking calls.
        self._sync_ctx = zmq.Context.shadow(self.ctx.underlying)
        self.insecure = insecure
        self.keys = KeyStore(keys) if keys else None
        self._auth: AsyncioAuthenticator | None = None
        self._socks: list[zmq.asyncio.Socket] = []

    def _make(self, kind: int, hwm: int, sync: bool = False, kbuf: int = 0) -> Any:
        s = (self._sync_ctx if sync else self.ctx).socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, hwm)
        s.setsockopt(zmq.RCVHWM, hwm)
        if kbuf > 0:
            # Set before bind/connect: libzmq applies them to the listening socket (accepted ones inherit
            # them) and to each connecting one, and a fixed size turns Linux's autotuning off, which
            # otherwise grows them to MiBs of queued messages that no high-water mark counts.
            s.setsockopt(zmq.SNDBUF, kbuf)
            s.setsockopt(zmq.RCVBUF, kbuf)
        s.setsockopt(zmq.TCP_KEEPALIVE, 1)
        s.setsockopt(zmq.TCP_KEEPALIVE_IDLE, KEEPALIVE_IDLE_S)
        s.setsockopt(zmq.TCP_KEEPALIVE_INTVL, KEEPALIVE_INTVL_S)
        s.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_CNT)
        s.setsockopt(zmq.RECONNECT_IVL, 100)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        # Every receiver caps the frame size, so a peer cannot make it allocate without bound
        # (libzmq drops an oversized message and the connection that carried it).
        s.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self._socks.append(s)
        return s

    def _start_auth(self) -> None:
        # Before the first CURVE server socket exists: libzmq admits any CURVE client when no ZAP
        # handler is bound in the context, so the authenticator must already be there.
        if self._auth is None:
            assert self.keys is not None
            allowed = self.keys.authorized()
            auth = AsyncioAuthenticator(self.ctx)
            auth.start()
            auth.configure_curve_callback("*", _AuthorizedKeys(allowed, str(self.keys.directory / "authorized")))
            # No ZAP user id: nothing reads it, and with one libzmq queues a hidden credential entry
            # that can make a bound PULL report a message that a non-blocking read then lacks.
            auth.curve_user_id = lambda key: ""
            self._auth = auth

    def open(self, cfg: Any, role: str, name: str, sync: bool = False) -> Any:
        """The socket ``name`` of program ``role`` as ``flow.SOCKETS`` describes it (pattern, bind or
        connect, high-water mark), with ``cfg``'s endpoint and kernel buffer; SUB sockets subscribe to
        everything. ``sync``: a blocking socket for one worker thread to own."""
        spec = SOCKETS[(role, name)]
        kind, endpoint = getattr(zmq, spec.pattern), getattr(cfg, spec.endpoint)
        hwm, kbuf = spec.hwm_of(cfg), int(getattr(cfg, spec.buffer))
        if spec.binds:
            s = self.bind(kind, endpoint, hwm, sync, kbuf)
            if spec.pattern == "SUB":
                s.setsockopt(zmq.SUBSCRIBE, b"")
            return s
        return self.connect(kind, endpoint, hwm, subscribe=spec.pattern == "SUB", sync=sync, kbuf=kbuf)

    def bind(self, kind: int, endpoint: str, hwm: int = 100, sync: bool = False, kbuf: int = 0) -> Any:
        """A bound socket: a CURVE server with keys; without keys, loopback only unless insecure.
        ``sync``: a blocking socket for one worker thread to own (as in ``connect``). ``kbuf`` > 0: its
        kernel buffers (SO_SNDBUF, SO_RCVBUF) in bytes; 0 leaves them to the OS."""
        if self.keys is None and not is_loopback(endpoint) and not self.insecure:
            raise SystemExit(f"refusing to bind {endpoint}: a non-loopback address needs CURVE keys "
                             "(--keys DIR, from `apex-zmq keys DIR`), or --insecure to accept "
                             "unauthenticated, unencrypted traffic on a network you trust")
        if self.keys is not None:
            public, secret = self.keys.server_pair()
            self._start_auth()
        s = self._make(kind, hwm, sync, kbuf)
        if self.keys is not None:
            s.setsockopt(zmq.CURVE_SERVER, 1)
            s.setsockopt(zmq.CURVE_PUBLICKEY, public)
            s.setsockopt(zmq.CURVE_SECRETKEY, secret)
        try:
            s.bind(endpoint)
        except zmq.ZMQError as e:
            if e.errno == zmq.EADDRINUSE:
                # Another process holds the address (another run?): exit with the code that tells a
                # supervisor that restarting would fail the same way.
                print(f"cannot bind {endpoint}: the address is in use (another run?); stop it or choose "
                      "other ports (./run.sh: --port-base N)", file=sys.stderr, flush=True)
                raise SystemExit(PORT_IN_USE_EXIT) from None
            raise SystemExit(f"cannot bind {endpoint}: {e}") from None
        return s

    def connect(self, kind: int, endpoint: str, hwm: int = 100,
                subscribe: bool = False, sync: bool = False, kbuf: int = 0) -> Any:
        """A connected socket (a CURVE client with keys; SUB sockets subscribe to everything when
        ``subscribe``). ``sync``: a blocking socket for one worker thread to own (see ``send_until``):
        a hot loop then hands its messages to ZeroMQ itself, with no round trip through the event loop.
        ``kbuf``: as in ``bind``."""
        if self.keys is not None:  # keys first: a missing key exits before any socket exists
            public, secret = self.keys.client_pair()
            server_public = self.keys.server_public()
        s = self._make(kind, hwm, sync, kbuf)
        # A fresh pipe per connection: libzmq (4.3.5) otherwise re-attaches a new connection to the
        # pipe the old one left full, and reading that pipe can then abort the process ("Assertion
        # failed: _input_stopped", libzmq issue #3937; seen here with ZMTP heartbeats on). Sends
        # block until connected; what was queued for a dropped connection is dropped with it.
        s.setsockopt(zmq.IMMEDIATE, 1)
        if self.keys is not None:
            s.setsockopt(zmq.CURVE_SERVERKEY, server_public)
            s.setsockopt(zmq.CURVE_PUBLICKEY, public)
            s.setsockopt(zmq.CURVE_SECRETKEY, secret)
        if subscribe:
            s.setsockopt(zmq.SUBSCRIBE, b"")
        s.connect(endpoint)
        return s

    def close(self) -> None:
        """Close all sockets, the authenticator and the context without waiting for unsent messages."""
        for s in self._socks:
            s.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self.ctx.term()


async def recv_latest(sock: zmq.asyncio.Socket) -> list[zmq.Frame]:
    """Wait for a message, then drain what else is queued and return only the newest one."""
    frames = await sock.recv_multipart(copy=False)
    while True:
        try:
            frames = await sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return frames


def install_stop(stop: asyncio.Event) -> None:
    """Set ``stop`` on SIGINT or SIGTERM so the role shuts down cleanly."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def run_role(stop: asyncio.Event, tasks: list[Awaitable[Any]],
                   workers: list[Callable[[], None]] = (),
                   on_stop: Sequence[threading.Event] = (), torch_threads: int = 0) -> None:
    """Run a role's async tasks and worker threads until ``stop`` is set or any of them ends.

    Workers are CPU-bound loops that must return soon after ``stop.is_set()`` or after one of the
    ``on_stop`` events (set here once stopping) wakes them; the first error of a task or worker is
    re-raised after everything has stopped. ``torch_threads`` > 0: each worker runs torch (and its
    OpenMP team) with that many threads.
    """
    loop = asyncio.get_running_loop()
    errors: list[BaseException] = []

    def guarded(fn: Callable[[], None]) -> None:
        try:
            _name_os_thread(threading.current_thread().name)
            if torch_threads > 0:
                # OpenMP's thread count is per calling thread: set in the main thread only, a worker
                # thread's torch ops run an OpenMP team of every core (torch.get_num_threads() there
                # still says 1). Measured on 2 busy cores: 20,000 forwards of a small MLP took 161 s
                # of wall time unset, 5.5 s set here; a 64-core host would get 64-thread teams.
                import torch
                torch.set_num_threads(torch_threads)
            fn()
        except BaseException as e:  # reported after shutdown
            errors.append(e)
        finally:
            loop.call_soon_threadsafe(stop.set)

    threads = [threading.Thread(target=guarded, args=(fn,), daemon=True,
                                name=getattr(getattr(fn, "func", fn), "__name__", "worker"))
               for fn in workers]
    for t in threads:
        t.start()
    running = [asyncio.ensure_future(t) for t in tasks]
    waiter = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait([*running, waiter], return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    for ev in on_stop:
        ev.set()
    for t in [*running, waiter]:
        t.cancel()
    await asyncio.gather(*running, waiter, return_exceptions=True)
    for t in threads:
        await asyncio.to_thread(t.join)
    for t in done:
        if t is not waiter and not t.cancelled() and t.exception() is not None:
            errors.insert(0, t.exception())
    if errors:
        raise errors[0]


def _name_os_thread(name: str) -> None:
    """Give the calling thread its name in the OS too (Linux: 15 bytes), so ``top -H``, py-spy and
    /proc/<pid>/task/*/comm show which worker burns the CPU."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def put_until(q: queue.Queue, item: Any, stop: asyncio.Event) -> bool:
    """Blocking ``q.put`` that gives up when ``stop`` is set; True if the item went in."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.25)
            return True
        except queue.Full:
            continue
    return False


def get_until(q: queue.Queue, stop: asyncio.Event) -> Any:
    """Blocking ``q.get`` that returns None when ``stop`` is set."""
    while not stop.is_set():
        try:
            return q.get(timeout=0.25)
        except queue.Empty:
            continue
    return None


def recv_until(sock: zmq.Socket, stop: asyncio.Event | threading.Event) -> list[zmq.Frame] | None:
    """From the worker thread that owns the blocking socket ``sock``: the next message (zero-copy
    frames), or None once ``stop`` is set."""
    while not stop.is_set():
        if sock.poll(250, zmq.POLLIN):
            return sock.recv_multipart(copy=False)
    return None


def send_until(sock: zmq.Socket, frames: Sequence[Any], stop: asyncio.Event | threading.Event) -> bool:
    """From the worker thread that owns the blocking socket ``sock``: send ``frames``, waiting while
    the send high-water mark is reached (bounded backpressure) but giving up once ``stop`` is set.
    True if sent."""
    while not stop.is_set():
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            sock.poll(250, zmq.POLLOUT)
    return False
