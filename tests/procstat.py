"""Per-thread CPU use of live processes from /proc (Linux), for tests and benchmarks of the whole system."""

from __future__ import annotations

import os
import time
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
