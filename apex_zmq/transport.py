"""Socket factory: one place that sets socket options, checks endpoints, and bridges threads to asyncio."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import queue
import signal
import threading
from typing import Any, Awaitable, Callable, Sequence
from urllib.parse import urlsplit

import zmq
import zmq.asyncio

MAX_MESSAGE_BYTES = 256 << 20  # largest message a bound receiver accepts (a 512 Atari batch is ~15 MB)
HEARTBEAT_MS = 1000


def is_loopback(endpoint: str) -> bool:
    """True for tcp endpoints on 127.0.0.0/8, ::1 or localhost, and for ipc/inproc."""
    if not endpoint.startswith("tcp://"):
        return True
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Sockets:
    """Creates every socket of one role with the project's options, and closes them all at the end."""

    def __init__(self, insecure: bool = False) -> None:
        self.ctx = zmq.asyncio.Context()
        self.insecure = insecure
        self._socks: list[zmq.asyncio.Socket] = []

    def _make(self, kind: int, hwm: int) -> zmq.asyncio.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, hwm)
        s.setsockopt(zmq.RCVHWM, hwm)
        s.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * HEARTBEAT_MS)
        s.setsockopt(zmq.RECONNECT_IVL, 100)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        self._socks.append(s)
        return s

    def bind(self, kind: int, endpoint: str, hwm: int = 100) -> zmq.asyncio.Socket:
        """A bound socket; refuses a non-loopback address unless the run is marked insecure."""
        if not is_loopback(endpoint) and not self.insecure:
            raise SystemExit(f"refusing to bind {endpoint}: a non-loopback address needs CURVE keys, "
                             "or --insecure to accept unauthenticated traffic on a trusted network")
        s = self._make(kind, hwm)
        s.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        try:
            s.bind(endpoint)
        except zmq.ZMQError as e:
            raise SystemExit(f"cannot bind {endpoint}: {e}") from None
        return s

    def connect(self, kind: int, endpoint: str, hwm: int = 100,
                subscribe: bool = False) -> zmq.asyncio.Socket:
        """A connected socket (SUB sockets subscribe to everything when ``subscribe``)."""
        s = self._make(kind, hwm)
        if subscribe:
            s.setsockopt(zmq.SUBSCRIBE, b"")
        s.connect(endpoint)
        return s

    def close(self) -> None:
        """Close all sockets and the context without waiting for unsent messages."""
        for s in self._socks:
            s.close(linger=0)
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
                   on_stop: Sequence[threading.Event] = ()) -> None:
    """Run a role's async tasks and worker threads until ``stop`` is set or any of them ends.

    Workers are CPU-bound loops that must return soon after ``stop.is_set()`` or after one of the
    ``on_stop`` events (set here once stopping) wakes them; the first error of a task or worker is
    re-raised after everything has stopped.
    """
    loop = asyncio.get_running_loop()
    errors: list[BaseException] = []

    def guarded(fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as e:  # reported after shutdown
            errors.append(e)
        finally:
            loop.call_soon_threadsafe(stop.set)

    threads = [threading.Thread(target=guarded, args=(fn,), daemon=True, name=getattr(fn, "__name__", "worker"))
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


def call_in_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], Awaitable[Any]],
                 stop: asyncio.Event) -> Any:
    """From a worker thread: run coroutine ``fn()`` on ``loop`` and wait for its result.

    Gives up (returning None) once ``stop`` is set, so a send blocked on a missing peer cannot
    hold the role open at shutdown.
    """
    async def in_loop() -> Any:
        return await fn()  # fn() must be called on the loop's thread: zmq.asyncio needs its loop

    fut = asyncio.run_coroutine_threadsafe(in_loop(), loop)
    while True:
        try:
            return fut.result(timeout=0.25)
        except concurrent.futures.TimeoutError:
            if stop.is_set():
                fut.cancel()
                return None
