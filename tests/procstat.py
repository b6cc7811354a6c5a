"""Live processes seen from /proc and ``ss`` (Linux), for tests and benchmarks of the whole system: per-thread
CPU use, and per process resident memory, threads, open file descriptors and its TCP sockets' queues.

The parsers (``parse_status``, ``parse_ss``) take text and are pure; the readers around them do the I/O.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def thread_ticks(pid: int) -> dict[int, tuple[str, int]]:
    """tid -> (thread name, user + system clock ticks so far) for every thread of ``pid``."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(task.name)] = (name, int(fields[11]) + int(fields[12]))  # utime, stime
    return out


def thread_cpu(pids: dict[str, int], seconds: float) -> dict[str, list[tuple[str, float]]]:
    """For each named process: (thread name, cores used) of every thread over ``seconds`` of wall
    time, busiest first (1.0 = one core all the time)."""
    before = {name: thread_ticks(pid) for name, pid in pids.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    after = {name: thread_ticks(pid) for name, pid in pids.items()}
    wall = time.monotonic() - t0
    out = {}
    for name in pids:
        rows = [(n, (ticks - before[name].get(tid, (n, 0))[1]) / TICK / wall) for tid, (n, ticks) in after[name].items()]
        out[name] = sorted(rows, key=lambda r: -r[1])
    return out


# ------------------------------------------------------------------------------- memory, threads, fds

@dataclass(frozen=True)
class ProcSample:
    """One look at a process: resident memory, threads and open file descriptors."""

    rss_kb: int
    threads: int
    fds: int


def parse_status(text: str) -> tuple[int, int]:
    """(VmRSS in kB, Threads) from the text of /proc/<pid>/status; ValueError if either is missing
    (a zombie has no VmRSS)."""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    try:
        return int(fields["VmRSS"].split()[0]), int(fields["Threads"])
    except (KeyError, IndexError, ValueError):
        raise ValueError(f"expected VmRSS and Threads in /proc/<pid>/status, got keys {sorted(fields)[:8]}...") from None


def proc_sample(pid: int) -> ProcSample | None:
    """``pid``'s memory, threads and fds now; None when it is gone (or a zombie)."""
    try:
        rss, threads = parse_status(Path(f"/proc/{pid}/status").read_text())
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return None
    return ProcSample(rss, threads, fds)


# ------------------------------------------------------------------------------------ socket queues

@dataclass
class SocketQueues:
    """A process's established TCP sockets: how many, and the bytes waiting in their queues."""

    sockets: int = 0
    recv_max: int = 0   # the fullest receive queue (bytes the process has not read yet)
    send_max: int = 0   # the fullest send queue (bytes the peer has not acknowledged yet)
    recv_sum: int = 0
    send_sum: int = 0

    @property
    def largest(self) -> int:
        """The fullest queue of any of its sockets, either way."""
        return max(self.recv_max, self.send_max)


_PID = re.compile(r"pid=(\d+)")


@dataclass(frozen=True)
class TcpSocket:
    """One TCP socket as ``ss`` shows it."""

    local: str
    peer: str
    recv_q: int
    send_q: int
    pids: tuple[int, ...]  # the processes holding it (none: its process died, the kernel finishes it)


def parse_ss(text: str) -> list[TcpSocket]:
    """The sockets of ``ss -Htnp`` output (state, Recv-Q, Send-Q, local, peer, process); other lines are
    skipped."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5 or not parts[1].isdigit() or not parts[2].isdigit():
            continue
        pids = tuple(sorted({int(p) for p in _PID.findall(" ".join(parts[5:]))}))
        out.append(TcpSocket(parts[3], parts[4], int(parts[1]), int(parts[2]), pids))
    return out


def queues_by_pid(socks: list[TcpSocket]) -> dict[int, SocketQueues]:
    """pid -> its sockets' queues (a socket that several processes hold counts for each)."""
    out: dict[int, SocketQueues] = {}
    for s in socks:
        for pid in s.pids:
            q = out.setdefault(pid, SocketQueues())
            q.sockets += 1
            q.recv_max, q.send_max = max(q.recv_max, s.recv_q), max(q.send_max, s.send_q)
            q.recv_sum += s.recv_q
            q.send_sum += s.send_q
    return out


def draining_by_pid(socks: list[TcpSocket]) -> dict[int, int]:
    """pid -> how many of its connections lead to a socket no process holds: the peer process died and
    the kernel is still delivering what it had sent (a descriptor that goes once that is read)."""
    orphans = {s.local for s in socks if not s.pids}
    out: dict[int, int] = {}
    for s in socks:
        if s.peer in orphans:
            for pid in s.pids:
                out[pid] = out.get(pid, 0) + 1
    return out


def tcp_sockets(netns: str | None = None) -> list[TcpSocket]:
    """Every TCP socket of this network namespace (or of ``netns``), from ``ss``."""
    argv = ["ss", "-Htnp"]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` exited {r.returncode}: {r.stderr.strip()}")
    return parse_ss(r.stdout)
