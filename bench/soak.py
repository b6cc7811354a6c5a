"""Soak test: the whole system for ``--minutes`` under a seeded chaos schedule, with its memory, threads,
file descriptors, socket queues, restarts, stalls and every lost transition accounted for.

    python bench/soak.py --minutes 60                     # MinAtar/Breakout-v0; netns mode where it can
    python bench/soak.py --minutes 60 --env ALE/Pong-v5,MinAtar/Breakout-v0   # each in turn
    python bench/soak.py --minutes 3 --mode single        # every role on loopback, no network cut

The system is what ./run.sh starts: the launcher (``python -m apex_zmq.launch``, which ./run.sh execs)
supervises every role and restarts a crashed one. The replay is small, so it wraps around many times,
and snapshots and checkpoints are on. Once the replay is full, learner stepping and every actor sending,
the chaos clock starts: every kind of role is SIGKILLed at seeded random times (``--kills-per-role``
each), one role is paused with SIGSTOP for longer than the TCP keepalive takes to drop a silent peer,
and in netns mode the link of the actors' host is cut for ``--cut-s`` (60 s) and restored.

Modes. ``netns``: the network-namespace set-up of tests/test_multihost.py (one namespace per host on a
bridge, CURVE keys): the replay, the learner and the evaluator on a host each, the actors together on
one; the soak supervises them itself with the launcher's Supervisor, and cuts the actors' host with
``ip link set <veth> down``. ``single``: every role on loopback under the launcher; no cut. ``auto``
(default): netns where namespaces can be made (root, iproute2), else single, saying why.

Every ``--sample-period`` (10 s) it samples each role's process: resident memory, threads, file
descriptors (/proc), and its TCP sockets' receive and send queues (``ss``). The roles' telemetry in
metrics.csv gives the rest: each actor's sent chunks and transitions (``actor/<name>/sent_*``) against
what the replay stored of each (``replay/from/<name>/*``), learner steps and replay sampling (stalls),
and when each role worked again after a fault. bench/soak_core.py holds the schedule, the ledger and the
verdict; this file runs things.

Output: the schedule; each fault as it happens; per role a table (restarts, seconds back per kill,
resident memory at the start and end, growth in %/h after the replay is full, the largest socket queue,
fds and threads at the start and end, the longest stall of learner steps and of replay sampling outside
and inside faults); per actor the transitions sent, stored and lost by cause; every failed bound; and
last ``soak_ok=<0|1> minutes=<M> rss_growth_pct_per_h=<largest> stall_max_s=<learner> lost_unaccounted=<n>
restarts=<n>``. Exit status 0 when soak_ok=1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Protocol

from _common import ROOT, free_port_base  # also puts tests/ on the path (procstat)

import soak_core as S
from procstat import SocketQueues, TcpSocket, draining_by_pid, proc_sample, queues_by_pid, tcp_sockets

from apex_zmq import config as C
from apex_zmq import launch
from apex_zmq.transport import KEEPALIVE_CNT, KEEPALIVE_IDLE_S, KEEPALIVE_INTVL_S

KEEPALIVE_S = KEEPALIVE_IDLE_S + KEEPALIVE_CNT * KEEPALIVE_INTVL_S  # a silent peer is dropped after this


class SoakError(Exception):
    """The soak could not run as asked (not the system failing a bound: that is the verdict)."""


# ------------------------------------------------------------------------------------------- systems

class System(Protocol):
    """A running system of roles the soak can look at and hurt."""

    roles: list[str]

    def pids(self) -> dict[str, int | None]: ...
    def restarts(self) -> dict[str, int]: ...
    def sockets(self) -> list[TcpSocket]: ...
    def failed(self) -> str | None: ...
    def cut(self, down: bool) -> None: ...
    def stop(self) -> None: ...


def system_flags(env: str, args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The run's flags (./run.sh's), the same in both modes."""
    return ["--env", env, "--run-dir", str(run_dir), "--num-actors", str(args.num_actors),
            "--capacity", str(args.capacity), "--min-size", str(max(1, args.capacity // 4)),
            "--snapshot-period", str(args.snapshot_period), "--checkpoint-period", str(args.snapshot_period),
            "--dashboard-port", "0", "--max-restarts", "100", *args.extra]


class SingleHost:
    """``python -m apex_zmq.launch`` (what ./run.sh execs) with every role on loopback."""

    def __init__(self, env: str, args: argparse.Namespace, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.roles = ["evaluator", "replay_server", "learner", *(f"actor-{i}" for i in range(args.num_actors))]
        self.log = open(run_dir / "launcher.log", "wb")
        argv = [sys.executable, "-m", "apex_zmq.launch", *system_flags(env, args, run_dir),
                "--port-base", str(free_port_base())]
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def _state(self) -> dict:
        try:
            return json.loads((self.run_dir / "roles.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):  # not written yet (or being replaced)
            return {}

    def pids(self) -> dict[str, int | None]:
        state = self._state()
        return {r: pid if (pid := state.get(r, {}).get("pid")) and self._ours(pid) else None for r in self.roles}

    def _ours(self, pid: int) -> bool:
        # roles.json lags a death by up to a poll: never signal a pid that is no longer this run's role
        try:
            return str(self.run_dir).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False

    def restarts(self) -> dict[str, int]:
        state = self._state()
        return {r: int(state.get(r, {}).get("restarts", 0)) for r in self.roles}

    def sockets(self) -> list[TcpSocket]:
        return tcp_sockets()

    def failed(self) -> str | None:
        code = self.proc.poll()
        return None if code is None else f"the launcher exited with code {code}:\n{launch.log_tail(self.run_dir / 'launcher.log')}"

    def cut(self, down: bool) -> None:
        raise SoakError("single-host mode has no link to cut")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the launcher stops every role (SIGKILL after 15 s)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@dataclasses.dataclass
class Host:
    """One network namespace standing for one machine (as in tests/test_multihost.py)."""

    name: str
    netns: str
    addr: str
    outer: str  # the root-namespace end of its veth pair (taking it down cuts the host off)


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


class Hosts:
    """A bridge and one namespace per host, each wired to it by a veth pair; ``close`` kills what still
    runs in them and deletes every namespace and link made (also after a failed set-up)."""

    SUBNET = "10.213.48"
    OCTETS = {"replay": 2, "learner": 3, "actor": 4, "evaluator": 5}

    def __init__(self) -> None:
        sfx = secrets.token_hex(3)
        self.netns: list[str] = []
        self.links: list[str] = []
        self.hosts: dict[str, Host] = {}
        bridge = f"azsk{sfx}"
        try:
            self._run("link", "add", bridge, "type", "bridge")
            self.links.append(bridge)
            _ip("link", "set", bridge, "type", "bridge", "nf_call_iptables", "0")  # best effort (see multihost)
            self._run("link", "set", bridge, "up")
            for i, (name, octet) in enumerate(self.OCTETS.items()):
                ns, outer, inner = f"apexsoak-{sfx}-{name}", f"azs{sfx}{i}o", f"azs{sfx}{i}i"
                self._run("netns", "add", ns)
                self.netns.append(ns)
                self._run("link", "add", outer, "type", "veth", "peer", "name", inner)
                self.links.insert(0, outer)  # veths go before the bridge
                self._run("link", "set", outer, "master", bridge)
                self._run("link", "set", outer, "up")
                self._run("link", "set", inner, "netns", ns)
                self._run("-n", ns, "link", "set", "lo", "up")
                self._run("-n", ns, "addr", "add", f"{self.SUBNET}.{octet}/24", "dev", inner)
                self._run("-n", ns, "link", "set", inner, "up")
                self.hosts[name] = Host(name, ns, f"{self.SUBNET}.{octet}", outer)
        except (SoakError, subprocess.TimeoutExpired, OSError) as e:
            self.close()
            raise SoakError(f"cannot make network namespaces here: {e}") from None

    @staticmethod
    def _run(*args: str) -> None:
        r = _ip(*args)
        if r.returncode != 0:
            raise SoakError(f"`ip {' '.join(args)}` exited {r.returncode}: {(r.stderr or r.stdout).strip()}")

    def close(self) -> None:
        for ns in self.netns:
            for pid in _ip("netns", "pids", ns).stdout.split():  # only the soak starts processes there
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for link in self.links:
            _ip("link", "del", link)
        for ns in self.netns:
            _ip("netns", "del", ns)
        self.netns, self.links = [], []


class Netns:
    """Each role on its host's namespace with the command a user runs there, supervised in this process by
    the launcher's Supervisor (same restarts and backoff as ./run.sh)."""

    def __init__(self, env: str, args: argparse.Namespace, run_dir: Path) -> None:
        self.net = Hosts()
        try:
            self._start(env, args, run_dir)
        except BaseException:
            self.net.close()
            raise

    def _start(self, env: str, args: argparse.Namespace, run_dir: Path) -> None:
        h = self.net.hosts
        keys = run_dir / "keys"
        r = subprocess.run([sys.executable, "-m", "apex_zmq.cli", "keys", str(keys), "--clients", "1"],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
        if r.returncode != 0:
            raise SoakError(f"apex-zmq keys {keys} exited {r.returncode}: {r.stdout}{r.stderr}")
        cfg = C.parse(C.LaunchConfig, system_flags(env, args, run_dir), "run", prog="soak")
        config_path = C.save(cfg, cfg.run_dir, "config")
        where = {"experience": "replay", "samples": "replay", "priorities": "replay", "weights": "learner",
                 "telemetry": "evaluator"}
        endpoints = [x for name, host in where.items()
                     for x in (f"--{name}", f"tcp://{h[host].addr}:{C.DEFAULT_PORTS[name]}")]
        roles = launch.build_roles(cfg, config_path, learner_on_gpu=False)
        self.host_of: dict[str, Host] = {}
        for role in roles:
            host = h["actor" if role.name.startswith("actor-") else "replay" if role.name == "replay_server"
                     else role.name]
            key_dir = keys / "clients" / "client-1" if host.name == "actor" else keys
            role.argv = ["ip", "netns", "exec", host.netns, *role.argv, *endpoints, "--keys", str(key_dir)]
            role.echo = False  # the evaluator's lines stay in its log, not among the soak's
            self.host_of[role.name] = host
        self.roles = [r.name for r in roles]
        self.sup = launch.Supervisor(roles, cfg.max_restarts, run_dir / "roles.json")
        self.stopping = threading.Event()
        self.outcome: list[str] = []
        self.thread = threading.Thread(target=lambda: self.outcome.append(launch.supervise(self.sup, self.stopping)),
                                       daemon=True)
        self.thread.start()

    def pids(self) -> dict[str, int | None]:
        return {r.name: (r.proc.pid if r.proc is not None and r.proc.poll() is None else None) for r in self.sup.roles}

    def restarts(self) -> dict[str, int]:
        return {r.name: r.total_restarts for r in self.sup.roles}

    def sockets(self) -> list[TcpSocket]:
        return [s for host in self.net.hosts.values() for s in tcp_sockets(host.netns)]

    def failed(self) -> str | None:
        return f"the supervisor stopped: {self.outcome[0]}" if self.outcome else None

    def cut(self, down: bool) -> None:
        Hosts._run("link", "set", self.net.hosts["actor"].outer, "down" if down else "up")

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(60)
        self.net.close()


def choose_mode(asked: str) -> tuple[str, str]:
    """(mode, why) for ``--mode``: auto takes netns where this machine can make namespaces."""
    if asked != "auto":
        return asked, ""
    if not sys.platform.startswith("linux"):
        return "single", "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "single", "network namespaces need root"
    if shutil.which("ip") is None:
        return "single", "`ip` (iproute2) is not installed"
    try:
        Hosts().close()
    except SoakError as e:
        return "single", str(e)
    return "netns", ""


# ------------------------------------------------------------------------------------------- driving

@dataclasses.dataclass
class Sample:
    t: float
    role: str
    pid: int
    rss_kb: int
    threads: int
    fds: int       # open file descriptors, less those of ``draining`` connections
    draining: int  # connections to a dead peer whose data is still being read (they go by themselves)
    queue: int     # the fullest of its TCP sockets' queues, bytes


def take_samples(system: System) -> list[Sample]:
    """One look at every live role."""
    socks = system.sockets()
    queues, draining = queues_by_pid(socks), draining_by_pid(socks)
    now = time.time()
    out = []
    for role, pid in system.pids().items():
        s = proc_sample(pid) if pid else None
        if s is not None:
            d = draining.get(pid, 0)
            out.append(Sample(now, role, pid, s.rss_kb, s.threads, s.fds - d, d, queues.get(pid, SocketQueues()).largest))
    return out


def messages(run_dir: Path) -> list[S.Message]:
    try:
        return S.read_messages((run_dir / "metrics.csv").read_text(errors="replace"))
    except FileNotFoundError:
        return []


def wait_ready(system: System, run_dir: Path, roles: list[str], timeout: float, stop: threading.Event) -> float:
    """Wait until the replay is full, the learner steps, every actor has sent chunks, and a replay snapshot
    and a checkpoint were written (their writers' threads exist from then on); returns when."""
    deadline = time.monotonic() + timeout
    actors = [r for r in roles if r.startswith("actor-")]
    missing = ["metrics.csv"]
    while not stop.wait(2.0):
        if (why := system.failed()) is not None:
            raise SoakError(f"the system stopped while starting: {why}")
        msgs = messages(run_dir)
        missing = []
        if not any(m.m.get("replay/fill", 0) >= 1 for m in msgs):
            missing.append("a full replay")
        if not any(m.m.get("learner/steps", 0) > 0 for m in msgs):
            missing.append("learner steps")
        missing += [f"{a} sending" for a in actors if not any(m.m.get(f"actor/{a}/sent_chunks", 0) > 0 for m in msgs)]
        missing += [f"{f.parent.name}/{f.name}" for f in (run_dir / "replay" / "snapshot.npz",
                                                          run_dir / "checkpoints" / "last.pt") if not f.exists()]
        if not missing:
            return time.time()
        if time.monotonic() > deadline:
            break
    raise SoakError(f"not ready after {timeout:.0f}s: no {', '.join(missing)} (in {run_dir})")


def drive(system: System, schedule: list[S.Fault], t0: float, span: float, period: float,
          stop: threading.Event) -> tuple[list[S.Done], list[Sample]]:
    """Carry out ``schedule`` from wall time ``t0`` for ``span`` seconds, sampling every ``period``."""
    # Each fault is one or two actions: kill; SIGSTOP then SIGCONT; link down then up.
    actions: list[tuple[float, str, S.Fault]] = []
    for f in schedule:
        actions.append((t0 + f.at, "start", f))
        if f.kind in ("pause", "cut"):
            actions.append((t0 + f.at + f.duration, "end", f))
    actions.sort(key=lambda a: a[0])
    done: list[S.Done] = []
    open_: dict[S.Fault, S.Done] = {}
    samples: list[Sample] = []
    next_sample = time.time()
    try:
        while True:
            now = time.time()
            if now >= t0 + span:
                break
            if (why := system.failed()) is not None:
                raise SoakError(f"the system stopped during the soak: {why}")
            if now >= next_sample:
                samples += take_samples(system)
                next_sample += period
            while actions and actions[0][0] <= time.time():
                _, what, f = actions.pop(0)
                d = act(system, f, what, open_)
                if d is not None:
                    done.append(d)
            wake = min([next_sample, t0 + span] + ([actions[0][0]] if actions else []))
            if stop.wait(max(0.0, wake - time.time())):
                raise SoakError("interrupted")
        samples += take_samples(system)
    finally:
        for d in open_.values():  # never leave a role stopped or the link down
            if d.kind == "pause":
                _signal(d.pid, signal.SIGCONT)
            elif d.kind == "cut":
                system.cut(False)
    return done, samples


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def act(system: System, f: S.Fault, what: str, open_: dict[S.Fault, S.Done]) -> S.Done | None:
    """Start or end one fault; returns its record when it starts."""
    now = time.time()
    stamp = time.strftime("%H:%M:%S")
    if what == "end":
        d = open_.pop(f, None)
        if d is None:
            return None
        if f.kind == "pause":
            _signal(d.pid, signal.SIGCONT)
        else:
            system.cut(False)
        d.end = time.time()
        print(f"soak: {stamp} " + (f"SIGCONT {f.role}" if f.kind == "pause" else "link of the actors' host up"), flush=True)
        return None
    if f.kind == "cut":
        system.cut(True)
        d = open_[f] = S.Done("cut", f.role, now, now)
        print(f"soak: {stamp} link of the actors' host down for {f.duration:.0f}s", flush=True)
        return d
    pid = system.pids().get(f.role)
    if not pid:
        print(f"soak: {stamp} {f.kind} {f.role}: skipped, it is not running now", flush=True)
        return None
    sig = signal.SIGKILL if f.kind == "kill" else signal.SIGSTOP
    if not _signal(pid, sig):
        print(f"soak: {stamp} {f.kind} {f.role}: pid {pid} already gone", flush=True)
        return None
    d = S.Done(f.kind, f.role, now, now, pid=pid)
    if f.kind == "pause":
        open_[f] = d
    print(f"soak: {stamp} {'SIGKILL' if f.kind == 'kill' else f'SIGSTOP for {f.duration:.0f}s'} {f.role} (pid {pid})",
          flush=True)
    return d


# ------------------------------------------------------------------------------------------ analysis

def analyse(roles: list[str], msgs: list[S.Message], done: list[S.Done], samples: list[Sample],
            restarts: dict[str, int], ready: float, horizon: float, args: argparse.Namespace
            ) -> tuple[list[S.RoleReport], dict, list[S.Loss]]:
    """Per-role reports, the actors' processes and the losses, from what the soak saw."""
    actors = [r for r in roles if r.startswith("actor-")]
    for d in done:
        d.back = (S.cut_back_at(msgs, actors, d.end) if d.kind == "cut"
                  else S.back_at(msgs, d.role, d.start if d.kind == "kill" else d.end))
    blind = [(d.start, d.window_end(horizon)) for d in done if d.role == "evaluator"]
    bounds = bounds_of(args)
    reports = []
    for role in roles:
        r = S.RoleReport(role, restarts=restarts.get(role, 0))
        kills = [d for d in done if d.kind == "kill" and d.role == role]
        r.kills, r.back_s = len(kills), [d.back_s for d in kills]
        r.backoff_s = S.backoffs([d.start for d in kills])
        mine = [s for s in samples if s.role == role and s.t >= ready]
        if mine:
            r.rss_mb = (mine[0].rss_kb / 1024, mine[-1].rss_kb / 1024)
            r.growth = S.growth_pct_per_hour([(s.t, s.pid, s.rss_kb) for s in mine], ready, args.warmup_s)
            r.queue_max = max(s.queue for s in mine)
            # The start: the counts its first process showed most often before it was first killed (a
            # single sample may catch a file the evaluator has open for a moment).
            first_kill = min([k.start for k in kills] + [horizon + 1])
            base = S.usual([(s.fds, s.threads) for s in mine if s.t < first_kill] or [(mine[0].fds, mine[0].threads)])
            r.fds, r.threads = (base[0], mine[-1].fds), (base[1], mine[-1].threads)
            # After each fault (and settling), the counts must come back before this role's own next
            # restart resets them: a process opens some things lazily (the evaluator its CSVs at its first
            # evaluation), so a restarted one may take longer than the next fault to be whole again.
            windows = []
            for d in done:
                settled = d.window_end(horizon) + args.settle_s
                nxt = min([k.start for k in kills if k.start > d.start] + [horizon + 1])
                windows.append((f"{d.kind} {d.role}", [(s.fds, s.threads) for s in mine if settled <= s.t < nxt]))
            r.drift = S.drift(base, windows, bounds)
        tag = {"learner": "learner/steps", "replay_server": "replay/sampled"}.get(role)
        if tag:
            marked = [S.excuse(s, done, S.STALLS_LEARNER, blind, horizon, slack=2 * args.telemetry_slack)
                      for s in S.stalls(S.series(msgs, tag), ready, horizon)]
            r.stall, r.stall_excused = S.longest(marked, False), S.longest(marked, True)
        reports.append(r)
    procs = S.actor_processes(msgs)
    return reports, procs, S.ledger(procs, done, horizon)


def bounds_of(args: argparse.Namespace) -> S.Bounds:
    return S.Bounds(args.max_growth, args.max_back_s, args.max_stall_s, args.fd_tolerance, args.thread_tolerance)


def print_faults(done: list[S.Done]) -> None:
    for d in done:
        back = "never" if d.back is None else f"{d.back_s:.1f}s"
        length = f", {d.end - d.start:.0f}s long" if d.kind != "kill" else ""
        print(f"  {time.strftime('%H:%M:%S', time.localtime(d.start))} {d.kind} {d.role}{length}: working "
              f"again after {back}", flush=True)


# ---------------------------------------------------------------------------------------------- main

def soak_env(env: str, args: argparse.Namespace, mode: str, stop: threading.Event) -> S.Verdict:
    """One soak of ``env``; prints its report and returns its verdict."""
    run_dir = Path(args.out) / env.replace("/", "-")
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a resumed run would start from old checkpoints and counters
    run_dir.mkdir(parents=True)
    span = args.minutes * 60
    print(f"soak: {env} in {mode} mode for {args.minutes:g} min of chaos; run directory {run_dir}", flush=True)
    system: System = Netns(env, args, run_dir) if mode == "netns" else SingleHost(env, args, run_dir)
    started = time.time()
    try:
        ready = wait_ready(system, run_dir, system.roles, args.ready_timeout, stop)
        print(f"soak: ready after {ready - started:.0f}s (replay full, learner stepping, actors sending)", flush=True)
        schedule = S.chaos_schedule(args.seed, span, system.roles, args.kills_per_role, args.pause_s,
                                    args.cut_s if mode == "netns" else 0.0, args.recover_s, args.pause_role)
        print("soak: schedule (s after ready): " + ", ".join(
            f"{f.at:.0f} {f.kind} {f.role}" + (f" {f.duration:.0f}s" if f.duration else "") for f in schedule), flush=True)
        done, samples = drive(system, schedule, ready, span, args.sample_period, stop)
        restarts = system.restarts()
        horizon = time.time()
    finally:
        system.stop()
    # What the analysis needs goes to files first: a fault in the analysis must not lose an hour's run
    # (--reanalyse RUN_DIR runs it again from them).
    with open(run_dir / "soak_samples.csv", "w") as f:
        f.write("time,role,pid,rss_kb,threads,fds,draining,queue_bytes\n")
        f.writelines(f"{s.t:.3f},{s.role},{s.pid},{s.rss_kb},{s.threads},{s.fds},{s.draining},{s.queue}\n"
                     for s in samples)
    (run_dir / "soak_faults.json").write_text(json.dumps([dataclasses.asdict(d) for d in done], indent=1))
    (run_dir / "soak_meta.json").write_text(json.dumps(
        {"env": env, "mode": mode, "roles": system.roles, "ready": ready, "horizon": horizon,
         "restarts": restarts}, indent=1))
    return report(run_dir, args)


def report(run_dir: Path, args: argparse.Namespace) -> S.Verdict:
    """Analyse a soak's run directory (its metrics.csv and the soak_*.{csv,json} written at its end),
    print the report and return the verdict."""
    meta = json.loads((run_dir / "soak_meta.json").read_text())
    done = [S.Done(**d) for d in json.loads((run_dir / "soak_faults.json").read_text())]
    with open(run_dir / "soak_samples.csv") as f:
        next(f)
        samples = [Sample(float(t), role, *(int(x) for x in rest))
                   for t, role, *rest in (line.strip().split(",") for line in f if line.strip())]
    env, mode, roles = meta["env"], meta["mode"], meta["roles"]
    msgs = messages(run_dir)
    reports, procs, losses = analyse(roles, msgs, done, samples, meta["restarts"], meta["ready"],
                                     meta["horizon"], args)
    v = S.verdict(reports, losses, bounds_of(args))
    print(f"soak: faults of {env}:")
    print_faults(done)
    if mode != "netns":
        print("soak: no network cut (single-host mode has no link between hosts)")
    print(S.table(reports))
    print(S.loss_table(procs, losses))
    for p in v.problems:
        print(f"soak: FAIL {p}")
    print(f"{env}: {S.last_line(v, args.minutes)}", flush=True)
    return v


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--reanalyse", metavar="RUN_DIR", help="only analyse a finished soak's run directory again")
    p.add_argument("--minutes", type=float, required=True, help="minutes of chaos per env, after the system is ready")
    p.add_argument("--env", default="MinAtar/Breakout-v0", help="env id, or a comma list soaked in turn (ALE/Pong-v5)")
    p.add_argument("--mode", choices=("auto", "netns", "single"), default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the chaos schedule")
    p.add_argument("--kills-per-role", type=int, default=0, help="SIGKILLs of each kind of role (0: one per 15 min, at least 1)")
    p.add_argument("--pause-s", type=float, default=KEEPALIVE_S + 10, help="SIGSTOP length (0: none); default the keepalive + 10 s")
    p.add_argument("--pause-role", default=None, help="role to pause (default: drawn from the seed)")
    p.add_argument("--cut-s", type=float, default=60.0, help="netns mode: seconds the actors' host is cut off (0: no cut)")
    p.add_argument("--recover-s", type=float, default=60.0, help="time left after each fault before the next")
    p.add_argument("--sample-period", type=float, default=10.0)
    p.add_argument("--warmup-s", type=float, default=60.0, help="each process's first seconds left out of the memory fit")
    p.add_argument("--settle-s", type=float, default=20.0, help="after a role is back, wait this long to compare fds and threads")
    p.add_argument("--num-actors", type=int, default=2)
    p.add_argument("--capacity", type=int, default=5000, help="replay capacity (small: it wraps around many times)")
    p.add_argument("--snapshot-period", type=float, default=15.0, help="seconds between replay snapshots and checkpoints")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--max-growth", type=float, default=5.0, help="bound: resident memory growth, %%/h")
    p.add_argument("--max-back-s", type=float, default=30.0, help="bound: seconds a killed role takes to work again, plus its backoff")
    p.add_argument("--max-stall-s", type=float, default=5.0, help="bound: learner stall outside faults that stop it")
    p.add_argument("--fd-tolerance", type=int, default=0, help="fds a role may be off its start after a fault")
    p.add_argument("--thread-tolerance", type=int, default=0, help="threads a role may be off its start after a fault")
    p.add_argument("--out", default="runs/soak", help="run directories go under here (replaced)")
    p.add_argument("extra", nargs="*", help="more ./run.sh flags, after --")
    args = p.parse_args(argv)
    args.kills_per_role = args.kills_per_role or max(1, round(args.minutes / 15))
    args.telemetry_slack = 1.0  # the roles report once a second (--telemetry-period's default)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.reanalyse:
        return 0 if report(Path(args.reanalyse), args).ok else 1
    mode, why = choose_mode(args.mode)
    print(f"soak: mode {mode}" + (f" ({why})" if why else ""), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    envs = [e.strip() for e in args.env.split(",") if e.strip()]
    verdicts = []
    try:
        for env in envs:
            verdicts.append(soak_env(env, args, mode, stop))
    except SoakError as e:
        print(f"soak: {e}", file=sys.stderr, flush=True)
        return 2
    total = S.Verdict(all(v.ok for v in verdicts), [p for v in verdicts for p in v.problems],
                      max(v.growth for v in verdicts), max(v.stall for v in verdicts),
                      sum(v.lost_unaccounted for v in verdicts), sum(v.restarts for v in verdicts))
    print(S.last_line(total, args.minutes * len(envs)), flush=True)
    return 0 if total.ok else 1


if __name__ == "__main__":
    sys.exit(main())
