"""The soak's pure core: the chaos schedule from a seed, what the run's files say, and the verdict.

Nothing here starts a process, sleeps or reads a clock: bench/soak.py runs the system, executes the
schedule, samples /proc and ``ss`` (tests/procstat.py) and hands what it saw to these functions; the
tests feed them hand-made inputs.

Times are seconds on one clock (the soak's wall clock, which is also the clock metrics.csv rows carry:
every role and the soak run on the same machine).

The transition ledger
---------------------
Each actor process numbers its chunks 1, 2, 3, ..., marks them with its random incarnation and reports
``actor/<name>/sent_chunks`` and ``sent_transitions`` with its ``incarnation`` (and ``restart``); the replay
server reports, per replay process (``replay/incarnation``) and per sender process, the ``first_seq`` and
``last_seq`` it stored and how many ``chunks`` and ``transitions`` that was
(``replay/from/<name>/<incarnation>/*``, replay_server/ledger.py). Per actor process, with
``sent`` the larger of its last report and the highest seq any replay stored, every chunk 1..sent is
either stored by some replay process or lost, and where it is missing says why:

- a gap inside one replay process's ``[first_seq, last_seq]`` (``skipped``): lost on the way while both
  ends lived: a connection dropped by the network cut, or, outside a cut, unaccounted;
- a gap between two replay processes, or before the first: lost at a kill of the replay server (what
  was queued towards it, or stored after its last report); unaccounted if it was not killed;
- after the last stored seq: in flight when the actor was killed, or at the end of the run (not lost).

Chunks hold a varying number of transitions: lost chunks are converted at the actor process's mean.
An actor's sends after its last report before a SIGKILL (at most one telemetry period) are in no report:
they were in flight at the kill, and are not counted.
"""

from __future__ import annotations

import csv
import io
import math
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from apex_zmq.launch import Supervisor, restart_delay

# -------------------------------------------------------------------------------------------- roles

KINDS = ("actor", "replay_server", "learner", "evaluator")
# Faults after which a learner that stops stepping is expected to (the replay's sampling likewise).
STALLS_LEARNER = {("kill", "learner"), ("kill", "replay_server"), ("pause", "learner"), ("pause", "replay_server")}


def kind_of(role: str) -> str:
    """``actor-3`` -> ``actor``; the other role names are their kinds."""
    kind = "actor" if re.fullmatch(r"actor-\d+", role) else role
    if kind not in KINDS:
        raise ValueError(f"role {role!r}: expected actor-<n> or one of {KINDS[1:]}")
    return kind


# ------------------------------------------------------------------------------------------ schedule

@dataclass(frozen=True)
class Fault:
    """One planned fault: ``at`` seconds after the chaos starts. kill: SIGKILL ``role``; pause: SIGSTOP
    ``role`` for ``duration`` s; cut: the actors' host's link down for ``duration`` s (role ``link``)."""

    kind: str
    role: str
    at: float
    duration: float = 0.0


def chaos_schedule(seed: int, span_s: float, roles: Sequence[str], kills_per_role: int, pause_s: float,
                   cut_s: float, recover_s: float, pause_role: str | None = None) -> list[Fault]:
    """The faults of one soak, in time order, from ``seed`` alone.

    Every kind of role (actor, replay server, learner, evaluator) is killed ``kills_per_role`` times (an
    actor drawn each time); one role (``pause_role``, else drawn) is paused for ``pause_s``; with
    ``cut_s`` > 0 the link is cut once. Faults do not overlap: each is given its own duration plus
    ``recover_s`` for the system to come back and settle, and the time left over is spread between them
    at random, so each fault's effect can be told apart.
    """
    actors = [r for r in roles if kind_of(r) == "actor"]
    missing = [k for k in KINDS if not any(kind_of(r) == k for r in roles)]
    if missing or kills_per_role < 1:
        raise ValueError(f"expected roles of every kind {KINDS} and kills_per_role >= 1, got roles {list(roles)} "
                         f"and kills_per_role {kills_per_role}")
    rng = random.Random(seed)
    events: list[tuple[str, str, float]] = []
    for _ in range(kills_per_role):
        for kind in KINDS:
            events.append(("kill", rng.choice(actors) if kind == "actor" else kind, 0.0))
    if pause_s > 0:
        target = pause_role or rng.choice(sorted(roles))
        if target not in roles:
            raise ValueError(f"pause role {target!r} is not one of {list(roles)}")
        events.append(("pause", target, pause_s))
    if cut_s > 0:
        events.append(("cut", "link", cut_s))
    rng.shuffle(events)
    busy = sum(d + recover_s for _, _, d in events)
    free = span_s - busy
    if free < 0:
        raise ValueError(f"a chaos span of {span_s:.0f}s cannot hold {len(events)} faults that need {busy:.0f}s "
                         f"(each its duration + {recover_s:.0f}s to recover): expected --minutes >= "
                         f"{math.ceil(busy / 60 * 10) / 10}, or fewer kills per role")
    marks = sorted(rng.random() for _ in range(len(events)))
    gaps = [b - a for a, b in zip([0.0, *marks], marks)]  # a random share of the free time before each
    out, t = [], 0.0
    for (kind, role, dur), gap in zip(events, gaps):
        t += gap * free
        out.append(Fault(kind, role, round(t, 1), dur))
        t += dur + recover_s
    return out


# --------------------------------------------------------------------------------- what happened

@dataclass
class Done:
    """One executed fault, as it happened: ``start`` (kill, SIGSTOP, link down) and ``end`` (SIGCONT,
    link up; a kill's is its start); ``pid`` the process hit; ``backoff`` the supervisor's restart delay."""

    kind: str
    role: str
    start: float
    end: float
    pid: int = 0
    backoff: float = 0.0
    back: float | None = None   # when the role (for a cut: the actors' experience) was working again

    @property
    def back_s(self) -> float | None:
        """Seconds from the fault's end to working again (None: never)."""
        return None if self.back is None else self.back - self.end

    def window_end(self, horizon: float) -> float:
        """Until when the fault lasted with its effect: back, or ``horizon`` if it never came back."""
        return self.back if self.back is not None else horizon


def backoffs(kill_times: Sequence[float]) -> list[float]:
    """The supervisor's restart delay after each of one role's kills (apex_zmq.launch.Supervisor's rule:
    each restart in a row doubles it; a process that ran HEALTHY_AFTER_S is no longer in a row)."""
    out, in_a_row, started = [], 0, float("-inf")
    for t in kill_times:
        if t - started > Supervisor.HEALTHY_AFTER_S:
            in_a_row = 0
        delay = restart_delay(in_a_row)
        out.append(delay)
        in_a_row += 1
        started = t + delay
    return out


# -------------------------------------------------------------------------------------- metrics.csv

@dataclass
class Message:
    """The rows one telemetry report left in metrics.csv (they share one time and follow each other)."""

    t: float
    m: dict[str, float]


def read_messages(text: str) -> list[Message]:
    """metrics.csv (time, step, tag, value) grouped back into reports: consecutive rows with the same
    time string, starting a new one where a tag repeats. A half-written last line is left out."""
    out: list[Message] = []
    last_time = None
    end = text.rfind("\n") + 1
    for row in csv.DictReader(io.StringIO(text[:end])):
        try:
            t, tag, v = row["time"], row["tag"], float(row["value"])
        except (KeyError, TypeError, ValueError):
            continue
        if t != last_time or tag in out[-1].m:
            out.append(Message(float(t), {}))
            last_time = t
        out[-1].m[tag] = v
    return out


def series(messages: Iterable[Message], tag: str) -> list[tuple[float, float]]:
    """(time, value) of every report of ``tag``."""
    return [(msg.t, msg.m[tag]) for msg in messages if tag in msg.m]


def moving_again(points: Sequence[tuple[float, float]], t: float) -> float | None:
    """The first time after ``t`` at which a counter grew between two reports both made after ``t``
    (a restarted role's first report may restate an old value: a checkpoint's step count)."""
    prev = None
    for pt, v in points:
        if pt <= t:
            continue
        if prev is not None and v > prev:
            return pt
        prev = v
    return None


def back_at(messages: Sequence[Message], role: str, after: float) -> float | None:
    """When ``role`` was training or serving again after ``after``: an actor's new process sent chunks,
    the learner stepped, the replay server (a new process after a kill) sampled, the evaluator logged."""
    kind = kind_of(role)
    if kind == "actor":
        return moving_again(series(messages, f"actor/{role}/sent_chunks"), after)
    if kind == "learner":
        return moving_again(series(messages, "learner/steps"), after)
    if kind == "replay_server":
        return moving_again(series(messages, "replay/sampled"), after)
    return next((msg.t for msg in messages if msg.t > after), None)  # the evaluator writes every row


def stored_from(messages: Iterable[Message], actor: str) -> list[tuple[float, float]]:
    """(time, chunks) the replay server reported storing from all processes of ``actor``."""
    prefix, out = f"replay/from/{actor}/", []
    for msg in messages:
        got = [v for tag, v in msg.m.items() if tag.startswith(prefix) and tag.endswith("/chunks")]
        if got:
            out.append((msg.t, sum(got)))
    return out


def cut_back_at(messages: Sequence[Message], actors: Sequence[str], after: float) -> float | None:
    """After a cut: the first time every actor's experience reached the replay again."""
    times = [moving_again(stored_from(messages, a), after) for a in actors]
    return None if any(t is None for t in times) else max(times)


# -------------------------------------------------------------------------------------------- stalls

@dataclass(frozen=True)
class Stall:
    """A time with no growth of a counter between ``start`` (its last growth) and ``end``."""

    start: float
    end: float
    excused: str = ""  # the fault that explains it, or why it could not be measured ("" for neither)

    @property
    def seconds(self) -> float:
        return self.end - self.start


def stalls(points: Sequence[tuple[float, float]], since: float, until: float) -> list[Stall]:
    """Every interval in [since, until] between two growths of a counter (a drop, a restarted process's
    count, is no growth). The interval still open at ``until`` ends there."""
    out, last_t, last_v = [], since, None
    for t, v in points:
        if t < since or t > until:
            continue
        if last_v is not None and v > last_v:
            out.append(Stall(last_t, t))
            last_t = t
        last_v = v
    out.append(Stall(last_t, until))
    return out


def excuse(stall: Stall, faults: Sequence[Done], causes: set[tuple[str, str]], blind: Sequence[tuple[float, float]],
           horizon: float, slack: float) -> Stall:
    """``stall`` marked with the fault that started it (one of ``causes``, or a cut) or a blind window
    (no metrics: the evaluator down) that overlaps it. A stall started by a fault began at most ``slack``
    before it (the last report before the fault) and before the fault's effect ended."""
    for f in faults:
        if ((f.kind, kind_of(f.role) if f.role != "link" else "") in causes or f.kind == "cut") \
                and f.start - slack <= stall.start <= f.window_end(horizon):
            return Stall(stall.start, stall.end, f"{f.kind} {f.role}")
    for a, b in blind:
        if stall.start < b and a < stall.end:
            return Stall(stall.start, stall.end, "no metrics (evaluator down)")
    return stall


def longest(stalls_: Iterable[Stall], excused: bool) -> Stall | None:
    """The longest stall of those excused (or of those not)."""
    chosen = [s for s in stalls_ if bool(s.excused) == excused]
    return max(chosen, key=lambda s: s.seconds, default=None)


# ------------------------------------------------------------------------------------------- memory

def growth_pct_per_hour(samples: Sequence[tuple[float, int, float]], since: float, warmup_s: float) -> float | None:
    """Resident-memory growth in % per hour from (time, pid, rss) samples taken after ``since``.

    One slope is fitted to every process of the role at once, each with its own level (a restarted
    process starts lower): least squares within each pid, pooled. A process's first ``warmup_s`` seconds
    are left out (imports, allocator and buffers growing to their working size). None with fewer than
    three usable samples of any pid.
    """
    first: dict[int, float] = {}
    for t, pid, _ in samples:
        first.setdefault(pid, t)
    groups: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for t, pid, rss in samples:
        if t >= since and t >= first[pid] + warmup_s:
            groups[pid].append((t, rss))
    num = den = 0.0
    total, n = 0.0, 0
    for pts in groups.values():
        if len(pts) < 3:
            continue
        mt = sum(t for t, _ in pts) / len(pts)
        my = sum(y for _, y in pts) / len(pts)
        num += sum((t - mt) * (y - my) for t, y in pts)
        den += sum((t - mt) ** 2 for t, _ in pts)
        total += sum(y for _, y in pts)
        n += len(pts)
    if n == 0 or den == 0 or total <= 0:
        return None
    return num / den * 3600 / (total / n) * 100


# -------------------------------------------------------------------------------------------- ledger

@dataclass
class Segment:
    """What one replay process stored of one actor process: seqs first..last, some skipped."""

    replay: float
    sender: str
    incarnation: int
    first_seq: int
    last_seq: int = 0
    chunks: int = 0
    transitions: int = 0
    first_t: float = 0.0
    last_t: float = 0.0
    skips: list[tuple[float, int]] = field(default_factory=list)  # (report time, chunks newly skipped)

    @property
    def skipped(self) -> int:
        return self.last_seq - self.first_seq + 1 - self.chunks


@dataclass
class ActorProcess:
    """One process of one actor, from its reports."""

    actor: str
    incarnation: int
    restart: int = 0
    sent_chunks: int = 0
    sent_transitions: int = 0
    first_t: float = 0.0
    last_t: float = 0.0
    segments: list[Segment] = field(default_factory=list)

    @property
    def per_chunk(self) -> float:
        """Mean transitions per chunk (to convert lost chunks)."""
        if self.sent_chunks:
            return self.sent_transitions / self.sent_chunks
        stored = sum(s.chunks for s in self.segments)
        return sum(s.transitions for s in self.segments) / stored if stored else 0.0


_ACTOR_TAG = re.compile(r"actor/(.+)/incarnation")
_REPLAY_TAG = re.compile(r"replay/from/(.+)/(\d+)/chunks")


def actor_processes(messages: Sequence[Message]) -> dict[str, list[ActorProcess]]:
    """Actor name -> its processes in the order they started, each with the replay segments that stored
    its chunks (matched by the process's incarnation, which its chunks carry)."""
    procs: dict[tuple[str, int], ActorProcess] = {}
    segs: dict[tuple[float, str, int], Segment] = {}
    for msg in messages:
        for tag, v in msg.m.items():
            if hit := _ACTOR_TAG.fullmatch(tag):
                name, p = hit.group(1), f"actor/{hit.group(1)}/"
                proc = procs.setdefault((name, int(v)), ActorProcess(name, int(v), first_t=msg.t))
                proc.restart = int(msg.m.get(p + "restart", 0))
                proc.sent_chunks = max(proc.sent_chunks, int(msg.m.get(p + "sent_chunks", 0)))
                proc.sent_transitions = max(proc.sent_transitions, int(msg.m.get(p + "sent_transitions", 0)))
                proc.last_t = msg.t
            elif (hit := _REPLAY_TAG.fullmatch(tag)) and "replay/incarnation" in msg.m:
                name, inc = hit.group(1), int(hit.group(2))
                p = f"replay/from/{name}/{inc}/"
                if any(p + k not in msg.m for k in ("first_seq", "last_seq", "transitions")):
                    continue  # a report that split this sender's counters: its next one has them all
                key = (msg.m["replay/incarnation"], name, inc)
                first = int(msg.m[p + "first_seq"])
                seg = segs.setdefault(key, Segment(key[0], name, inc, first, first - 1, first_t=msg.t))
                before = seg.skipped
                seg.last_seq, seg.chunks = int(msg.m[p + "last_seq"]), int(v)
                seg.transitions, seg.last_t = int(msg.m[p + "transitions"]), msg.t
                if seg.skipped > before:
                    seg.skips.append((msg.t, seg.skipped - before))
    for seg in segs.values():
        proc = procs.get((seg.sender, seg.incarnation))
        if proc is not None:
            proc.segments.append(seg)
    out: dict[str, list[ActorProcess]] = defaultdict(list)
    for proc in sorted(procs.values(), key=lambda p: p.first_t):
        out[proc.actor].append(proc)
    return dict(out)


@dataclass
class Loss:
    """Chunks of one actor process that no replay stored, with why."""

    actor: str
    incarnation: int
    restart: int
    cause: str       # "kill actor-0", "kill replay_server", "cut link", "in flight at the end", "unaccounted: ..."
    chunks: int
    transitions: int
    at: float

    @property
    def lost(self) -> bool:
        """In flight at the end of the run is not lost."""
        return self.cause != "in flight at the end"

    @property
    def accounted(self) -> bool:
        return not self.cause.startswith("unaccounted")


def _fault_between(faults: Sequence[Done], kind: str, role: str, a: float, b: float) -> Done | None:
    return next((f for f in faults if f.kind == kind and f.role == role and a <= f.start <= b), None)


def _cut_covering(faults: Sequence[Done], t: float, horizon: float, slack: float) -> Done | None:
    return next((f for f in faults if f.kind == "cut" and f.start - slack <= t <= f.window_end(horizon) + slack), None)


def ledger(procs: dict[str, list[ActorProcess]], faults: Sequence[Done], horizon: float,
           slack: float = 2.0) -> list[Loss]:
    """Every chunk that some actor process sent and no replay process stored, with its cause (see the
    module's docstring). ``horizon``: the end of the run; ``slack``: a report's lateness."""
    out: list[Loss] = []
    for name, plist in procs.items():
        for i, p in enumerate(plist):
            later = plist[i + 1] if i + 1 < len(plist) else None
            end = later.first_t if later else horizon
            segs = sorted(p.segments, key=lambda s: s.first_seq)
            sent = max([p.sent_chunks, *(s.last_seq for s in segs)])
            per = p.per_chunk

            def add(cause: str, chunks: int, at: float) -> None:
                if chunks > 0:
                    out.append(Loss(name, p.incarnation, p.restart, cause, chunks, round(chunks * per), at))

            for s in segs:  # gaps inside one replay process's view: the connection dropped on the way
                for t, n in s.skips:
                    cut = _cut_covering(faults, t, horizon, slack)
                    add(f"cut {cut.role}" if cut else "unaccounted: skipped while both ran", n, t)
            prev_last, prev_t = 0, p.first_t
            for s in segs:  # gaps between replay processes (or before the first): a replay restart
                gap = s.first_seq - prev_last - 1
                if gap < 0:
                    add("unaccounted: stored twice", -gap, s.first_t)
                elif gap > 0:
                    kill = _fault_between(faults, "kill", "replay_server", prev_t - slack, s.first_t + slack)
                    cut = _cut_covering(faults, s.first_t, horizon, slack)
                    add("kill replay_server" if kill else f"cut {cut.role}" if cut else
                        "unaccounted: missing at a replay start", gap, s.first_t)
                prev_last, prev_t = max(prev_last, s.last_seq), s.last_t
            tail = sent - prev_last
            kill = _fault_between(faults, "kill", name, p.first_t - slack, end + slack)
            if kill:
                add(f"kill {name}", tail, kill.start)
            elif later is None:
                add("in flight at the end", tail, horizon)
            else:
                add("unaccounted: the actor restarted without a kill", tail, end)
    return out


# ------------------------------------------------------------------------------------------- verdict

@dataclass(frozen=True)
class Bounds:
    """What passes: growth in %/h, seconds back (plus the backoff), a learner stall, fd and thread drift."""

    growth_pct_per_h: float = 5.0
    back_s: float = 30.0
    stall_s: float = 5.0
    fd_tolerance: int = 0
    thread_tolerance: int = 0


@dataclass
class RoleReport:
    """One role's figures over the soak."""

    role: str
    restarts: int = 0
    kills: int = 0
    back_s: list[float | None] = field(default_factory=list)   # per kill (None: never back)
    backoff_s: list[float] = field(default_factory=list)
    rss_mb: tuple[float, float] | None = None                  # start, end
    growth: float | None = None
    queue_max: int = 0
    fds: tuple[int, int] | None = None                         # start, end
    threads: tuple[int, int] | None = None
    drift: list[str] = field(default_factory=list)             # fd/thread counts off their start after a fault
    stall: Stall | None = None                                 # longest not excused (learner, replay sampling)
    stall_excused: Stall | None = None


@dataclass
class Verdict:
    ok: bool
    problems: list[str]
    growth: float
    stall: float
    lost_unaccounted: int
    restarts: int


def verdict(reports: Sequence[RoleReport], losses: Sequence[Loss], bounds: Bounds) -> Verdict:
    """Pass or fail against ``bounds``, with every reason it fails."""
    problems: list[str] = []
    for r in reports:
        if r.growth is not None and r.growth > bounds.growth_pct_per_h:
            problems.append(f"{r.role}: resident memory grows {r.growth:.1f}%/h, expected <= {bounds.growth_pct_per_h}")
        for back, backoff in zip(r.back_s, r.backoff_s):
            if back is None:
                problems.append(f"{r.role}: not back after a kill")
            elif back > bounds.back_s + backoff:
                problems.append(f"{r.role}: back after {back:.1f}s, expected <= {bounds.back_s:.0f}s + "
                                f"{backoff:.0f}s backoff")
        if r.restarts != r.kills:
            problems.append(f"{r.role}: restarted {r.restarts} times, killed {r.kills} times")
        problems += [f"{r.role}: {d}" for d in r.drift]
    learner = next((r for r in reports if r.role == "learner"), None)
    stall = learner.stall.seconds if learner and learner.stall else 0.0
    if stall > bounds.stall_s:
        problems.append(f"learner: no step for {stall:.1f}s outside the faults that stop it, expected <= {bounds.stall_s}s")
    unaccounted = sum(x.transitions for x in losses if not x.accounted)
    if unaccounted:
        causes = sorted({x.cause for x in losses if not x.accounted})
        problems.append(f"{unaccounted} transitions lost without a kill or a cut ({'; '.join(causes)})")
    growths = [r.growth for r in reports if r.growth is not None]
    return Verdict(not problems, problems, max(growths, default=0.0), stall, unaccounted,
                   sum(r.restarts for r in reports))


def usual(counts: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The (fds, threads) seen most often (the higher on a tie), each on its own."""
    def mode(values: list[int]) -> int:
        return max(set(values), key=lambda v: (values.count(v), v))
    return mode([c[0] for c in counts]), mode([c[1] for c in counts])


def drift(baseline: tuple[int, int], windows: Iterable[tuple[str, Sequence[tuple[int, int]]]], bounds: Bounds) -> list[str]:
    """Where a role's (fds, threads) never came back to ``baseline`` (within the tolerance) in the samples
    of the window after a fault (labelled), up to the role's own next restart or the end: a connection or
    a thread that stays is a leak; one that takes its time to go (a file opened at the first evaluation)
    is not."""
    out = []
    for label, seen in windows:
        if not seen:
            continue
        for i, (what, tol) in enumerate((("fds", bounds.fd_tolerance), ("threads", bounds.thread_tolerance))):
            values = [s[i] for s in seen]
            if all(abs(v - baseline[i]) > tol for v in values):
                out.append(f"{min(values)}-{max(values)} {what} after {label} until the next fault, "
                           f"{baseline[i]} at the start")
    return out


# -------------------------------------------------------------------------------------------- output

def last_line(v: Verdict, minutes: float) -> str:
    """The soak's last line, for scripts."""
    return (f"soak_ok={int(v.ok)} minutes={minutes:g} rss_growth_pct_per_h={v.growth:.2f} "
            f"stall_max_s={v.stall:.1f} lost_unaccounted={v.lost_unaccounted} restarts={v.restarts}")


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def table(reports: Sequence[RoleReport]) -> str:
    """One line per role: restarts, seconds back per kill, memory, growth, queues, fds, threads, stalls."""
    head = ("role", "restarts", "back_s", "rss_mb", "growth%/h", "queue_max_kb", "fds", "threads", "stall_s")
    rows = [head]
    for r in reports:
        stall = "-"
        if r.stall or r.stall_excused:
            stall = f"{_fmt(r.stall.seconds if r.stall else 0.0)} ({_fmt(r.stall_excused.seconds if r.stall_excused else None)} in faults)"
        rows.append((r.role, str(r.restarts),
                     ",".join(_fmt(b) if b is not None else "never" for b in r.back_s) or "-",
                     f"{r.rss_mb[0]:.0f}->{r.rss_mb[1]:.0f}" if r.rss_mb else "-",
                     _fmt(r.growth, "+.2f"), f"{r.queue_max / 1024:.0f}",
                     f"{r.fds[0]}->{r.fds[1]}" if r.fds else "-",
                     f"{r.threads[0]}->{r.threads[1]}" if r.threads else "-", stall))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def loss_table(procs: dict[str, list[ActorProcess]], losses: Sequence[Loss]) -> str:
    """Per actor: transitions sent and stored, and the lost ones by cause."""
    lines = []
    for name, plist in sorted(procs.items()):
        sent = sum(p.sent_transitions for p in plist)
        stored = sum(s.transitions for p in plist for s in p.segments)
        by: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for x in losses:
            if x.actor == name:
                by[x.cause][0] += x.transitions
                by[x.cause][1] += x.chunks
        causes = "; ".join(f"{c}: {t} ({n} chunks)" for c, (t, n) in sorted(by.items())) or "none"
        lines.append(f"{name}: {len(plist)} processes, sent {sent}, stored {stored}; not stored: {causes}")
    return "\n".join(lines)
