"""``./run.sh``: start every role on this machine, supervise them, stop them all cleanly."""

from __future__ import annotations

import dataclasses
import errno
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable
from urllib.parse import urlsplit

from . import config as C
from . import flow
from .cpu_advice import cpu_learner_steps_per_s, no_gpu_message

# Each role is a top-level package run as ``python -m <package>``; the relay is part of the shared library.
ROLE_MODULES = {"replay_server": "replay_server", "learner": "learner", "actor": "actor",
                "evaluator": "evaluator", "relay": "apex_zmq.relay"}


def role_module(role: str) -> str:
    """The module ``python -m`` runs for ``role``."""
    if role not in ROLE_MODULES:
        raise ValueError(f"unknown role {role!r}; expected one of {list(ROLE_MODULES)}")
    return ROLE_MODULES[role]


@dataclass
class Role:
    """One supervised process."""

    name: str
    argv: list[str]
    log: Path
    echo: bool = False
    tell_restart: bool = False   # pass ``--restart N`` (actors: fresh seeds after a restart)
    env: dict[str, str] | None = None  # the process environment (None: the launcher's own)
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0            # restarts in a row (reset once the role has run a while)
    total_restarts: int = 0
    next_start: float = 0.0
    pump: threading.Thread | None = field(default=None, repr=False)


def _is_status(line: bytes) -> bool:
    """The evaluator's periodic status lines start with the elapsed time, ``[h:mm:ss]``."""
    return line.startswith(b"[") and line[1:2].isdigit()


def _pump(stream: IO[bytes], log: Path, echo: bool) -> None:
    # Role output goes to its log file; the evaluator's lines also reach the terminal, where its
    # status line is rewritten in place (one live line, not a wall of logs).
    tty = echo and sys.stdout.isatty()
    pending_status = False
    with open(log, "ab") as f:
        for line in iter(stream.readline, b""):
            f.write(line)
            f.flush()
            if not echo:
                continue
            if tty and _is_status(line):
                sys.stdout.buffer.write(b"\r\x1b[K" + line.rstrip(b"\n"))
                pending_status = True
            else:
                sys.stdout.buffer.write((b"\n" if pending_status else b"") + line)
                pending_status = False
            sys.stdout.flush()


def restart_delay(restarts_in_a_row: int) -> float:
    """Seconds before restarting a role that has already been restarted this many times in a row."""
    # Doubling from 1 s: a passing hiccup costs a second, a crash loop does not spin; capped at 30 s
    # so a role that comes back after a long outage (a lost host) is not left waiting for minutes.
    return min(30.0, 2.0 ** restarts_in_a_row)


def log_tail(log: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a role's log, indented for the terminal."""
    try:
        text = log.read_bytes()[-64 * 1024:].decode(errors="replace")
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:]) or "    (empty log)"


class Supervisor:
    """Starts roles, restarts a crashed one with exponential backoff, stops all on request."""

    HEALTHY_AFTER_S = 60.0

    def __init__(self, roles: list[Role], max_restarts: int, state_path: Path | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.roles = roles
        self.max_restarts = max_restarts
        self.state_path = state_path  # roles.json: who runs as which pid, for operators and tests
        self.clock = clock  # every start time and backoff deadline reads it (tests pass a fake one)
        self.stopping = threading.Event()

    def write_state(self) -> None:
        """Write each role's pid and restart count to ``roles.json`` (atomically)."""
        if self.state_path is None:
            return
        state = {r.name: {"pid": r.proc.pid if r.proc is not None and r.proc.poll() is None else None,
                          "restarts": r.total_restarts, "log": str(r.log)} for r in self.roles}
        tmp = self.state_path.with_name(f".{self.state_path.name}.tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.state_path)

    def start(self, role: Role) -> None:
        """Start (or restart) one role."""
        role.log.parent.mkdir(parents=True, exist_ok=True)
        argv = role.argv + (["--restart", str(role.total_restarts)] if role.tell_restart else [])
        role.proc = subprocess.Popen(argv, env=role.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        role.started = self.clock()
        role.pump = threading.Thread(target=_pump, args=(role.proc.stdout, role.log, role.echo), daemon=True)
        role.pump.start()
        self.write_state()

    def _last_words(self, role: Role) -> str:
        """The end of ``role``'s log, once its pump has copied the exited process's last output."""
        if role.pump is not None:
            role.pump.join(timeout=2)
        return log_tail(role.log)

    def poll(self) -> str | None:
        """Check every role once; returns 'finished', 'failed', 'port in use' or None (running)."""
        now = self.clock()
        for role in self.roles:
            if role.proc is None:
                if now >= role.next_start:
                    self.start(role)
                continue
            code = role.proc.poll()
            if code is None:
                if now - role.started > self.HEALTHY_AFTER_S:
                    role.restarts = 0
                continue
            if role.name == "evaluator" and code == 0:
                return "finished"
            if code == C.PORT_IN_USE_EXIT:
                # Another process holds one of its ports (a run started beside this one after the
                # launcher's own check): a restart would find it held the same way.
                print(f"run.sh: {role.name} could not bind a port: another process holds it (exit code "
                      f"{code}); not restarting it. Stop the other run or choose other ports with "
                      f"--port-base N. The end of {role.log}:\n{self._last_words(role)}", flush=True)
                return "port in use"
            if code == C.CONFIG_ERROR_EXIT:
                # The role says its settings cannot work (another network's checkpoint, say): every
                # restart would fail the same way, so end the run now and show why.
                print(f"run.sh: {role.name} stopped on a configuration error (exit code {code}); not "
                      f"restarting it. The end of {role.log}:\n{self._last_words(role)}", flush=True)
                return "failed"
            if role.restarts >= self.max_restarts:
                print(f"run.sh: {role.name} exited with code {code} {role.restarts + 1} times in a row; "
                      f"giving up. The end of {role.log}:\n{self._last_words(role)}", flush=True)
                return "failed"
            delay = restart_delay(role.restarts)
            print(f"run.sh: {role.name} exited with code {code}; restarting in {delay:.0f}s "
                  f"(see {role.log})", flush=True)
            role.restarts += 1
            role.total_restarts += 1
            role.proc = None
            role.next_start = now + delay
            self.write_state()
        return None

    def stop_all(self, timeout: float = 15.0) -> None:
        """SIGTERM every role, then SIGKILL what is still alive after ``timeout``."""
        live = [r.proc for r in self.roles if r.proc is not None and r.proc.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        # Real time, not self.clock: this deadline bounds real waits on real processes.
        deadline = time.monotonic() + timeout
        for p in live:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for r in self.roles:
            if r.pump is not None:
                r.pump.join(timeout=2)


def supervise(sup: Supervisor, stop: threading.Event, max_seconds: float = 0.0,
              period: float = 0.5) -> str:
    """Poll ``sup`` every ``period`` s until a role ends the run, ``stop`` is set or ``max_seconds``
    (0: no limit) pass on its clock; stops every role and returns the outcome: 'finished', 'failed',
    'port in use', 'time limit' or 'interrupted'."""
    started = sup.clock()
    outcome = "interrupted"
    try:
        while not stop.wait(period):
            result = sup.poll()
            if result is not None:
                outcome = result
                break
            if max_seconds and sup.clock() - started > max_seconds:
                outcome = "time limit"
                break
    finally:
        sup.stop_all()
    return outcome


def exit_code(outcome: str) -> int:
    """``./run.sh``'s exit status for an outcome of ``supervise``: non-zero only when the run failed,
    ``PORT_IN_USE_EXIT`` when it failed because another process holds one of its ports."""
    return {"failed": 1, "port in use": C.PORT_IN_USE_EXIT}.get(outcome, 0)


def bound_endpoints(cfg: C.LaunchConfig) -> dict[str, str]:
    """The endpoints the roles of a one-machine run bind, by flag name: the replay server's three
    (replay algorithms) or the learner's gradients (asynchronous ones), the learner's weights and the
    evaluator's telemetry. (The dashboard is not among them: a taken dashboard port falls back to a
    free one.)"""
    if C.is_async(cfg):
        out = {"gradients": cfg.gradients}
    else:  # every replay shard's three (shard 0's under the plain flag names, as with one shard)
        out = {(name if i == 0 else f"{name} (replay shard {i})"): ep
               for i in range(cfg.replay_shards) for name, ep in zip(C.SHARD_ENDPOINTS, (
                   C.shard_endpoint(getattr(cfg, n), i, cfg.shard_port_step) for n in C.SHARD_ENDPOINTS))}
    return {**out, "weights": cfg.weights, "telemetry": cfg.telemetry}


def _tcp_address(endpoint: str) -> tuple[int, tuple] | None:
    """(family, sockaddr) a ZeroMQ tcp endpoint binds; None for what cannot be probed here: another
    transport, a wildcard or 0 port (ZeroMQ picks a free one), a name that does not resolve (an
    interface name, say: the role itself reports what is wrong with it)."""
    if not endpoint.startswith("tcp://"):
        return None
    try:
        parts = urlsplit(endpoint)
        port = parts.port
    except ValueError:  # a port of "*" or "!": ZeroMQ's ephemeral ports
        return None
    if not port:
        return None
    host = parts.hostname or ""
    host = "0.0.0.0" if host in ("*", "") else host
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        return None
    # ZeroMQ binds IPv4 unless ZMQ_IPV6 is set (no role sets it), so prefer the IPv4 address.
    family, _, _, _, addr = min(found, key=lambda info: info[0] != socket.AF_INET)
    return family, addr


def ports_in_use(endpoints: dict[str, str]) -> list[tuple[int, str, str]]:
    """(port, flag name, endpoint) of each endpoint that cannot be bound because another process (or
    an earlier endpoint of the same list) holds its address."""
    taken: list[tuple[int, str, str]] = []
    probes: list[socket.socket] = []
    try:
        for name, ep in endpoints.items():
            address = _tcp_address(ep)
            if address is None:
                continue
            family, addr = address
            s = socket.socket(family, socket.SOCK_STREAM)
            probes.append(s)
            # As libzmq binds: SO_REUSEADDR, so a port left in TIME_WAIT by an earlier run is free;
            # listening, so a second endpoint on the same address collides with this probe.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
                s.listen(1)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    taken.append((addr[1], name, ep))
                # Anything else (an address not on this machine, say) is the role's to report.
    finally:
        for s in probes:
            s.close()
    return taken


def _port_span() -> int:
    """``--port-base N`` puts the endpoints on loopback ports N to N + this."""
    return max(C.DEFAULT_PORTS.values()) - min(C.DEFAULT_PORTS.values())


def free_port_base(start: int, shards: int = 1, shard_port_step: int = 100) -> int | None:
    """The first ``--port-base`` from ``start`` upwards, in steps of 10, whose loopback ports are all
    free now, every replay shard's included (None if none is)."""
    for base in range(start, 65536 - _port_span() - (shards - 1) * shard_port_step, 10):
        eps = C.loopback_endpoints(base)
        eps.update({f"{name}-{i}": C.shard_endpoint(eps[name], i, shard_port_step)
                    for i in range(1, shards) for name in C.SHARD_ENDPOINTS})
        if not ports_in_use(eps):
            return base
    return None


def ports_in_use_message(taken: list[tuple[int, str, str]], suggest: int | None = None) -> str:
    """What ``./run.sh`` says when ports it needs are held (exit ``PORT_IN_USE_EXIT``); ``suggest``: a
    ``--port-base`` that is free."""
    many = len(taken) > 1
    what = ", ".join(f"{port} ({name}, {ep})" for port, name, ep in taken)
    return (f"run.sh: port{'s' if many else ''} {what} {'are' if many else 'is'} in use (another run?); "
            f"stop it or choose other ports with --port-base N (loopback ports N to N+{_port_span()}"
            + (f"; --port-base {suggest} is free now)" if suggest else ")"))


@dataclass(frozen=True)
class RoleBudget:
    """The share of the machine ``./run.sh`` plans for one role process."""

    cores: float        # cores the role is planned to keep busy
    torch_threads: int  # intra-op threads of each of its workers that run torch (also its OMP floor)
    busy_threads: int   # threads that may be busy at once: workers, event loop, ZeroMQ's I/O thread


def plan_budgets(cfg: C.LaunchConfig, cores: int, learner_on_gpu: bool) -> dict[str, RoleBudget]:
    """Each role's budget on a machine of ``cores`` cores (one place: the launcher passes each role
    its ``--torch-threads`` and OpenMP/MKL/OpenBLAS floor from here).

    Every actor, the replay server and the evaluator get one core each (the asynchronous family has no
    replay server, and its learner, which only applies gradients, one thread); the learner trains with
    ``--learner-threads`` torch threads (0: the cores left over, at least 1; 1 on a GPU, where the
    CPU only feeds it). A role's busy threads: its workers (an Atari actor's env groups step in
    ale-py's own threads), plus its event loop and ZeroMQ's I/O thread.
    """
    io = 2  # event loop + ZeroMQ I/O thread
    spare = max(1, cores - cfg.num_actors - 2)
    # The asynchronous family's learner applies gradients the actor-learners computed: one thread does.
    learner_threads = cfg.learner_threads or (1 if learner_on_gpu or C.is_async(cfg) else spare)
    atari = cfg.env.startswith("ALE/")
    groups = 1 if C.is_async(cfg) else cfg.env_groups  # an actor-learner steps its K envs as one group
    env_threads = groups * cfg.env_threads if atari else 0
    return {
        "actor": RoleBudget(1.0, 1, 1 + env_threads + io),
        "replay_server": RoleBudget(1.0, 1, 1 + io),  # the loop is its work; snapshots add a writer
        "learner": RoleBudget(float(learner_threads), learner_threads,
                              learner_threads + (0 if C.is_async(cfg) else cfg.loader_threads) + io),
        "evaluator": RoleBudget(1.0, 1, 1 + io),
    }


def gpu_device_nodes() -> list[str]:
    """The GPU driver's device nodes (NVIDIA's, or ROCm's /dev/kfd, which torch.cuda also serves)."""
    return glob.glob("/dev/nvidia[0-9]*") + glob.glob("/dev/kfd")


def _learner_on_gpu(cfg: C.LaunchConfig) -> bool:
    # Importing torch to ask costs the launcher ~1 s (more while roles start) before any role starts:
    # only ask when the machine has a GPU driver's device nodes at all.
    if cfg.device == "cpu" or not gpu_device_nodes():
        return False
    import torch
    return torch.cuda.is_available()


def build_roles(cfg: C.LaunchConfig, config_path: Path, cores: int | None = None,
                learner_on_gpu: bool | None = None) -> list[Role]:
    """The processes of a one-machine run, each reading the saved run config, each with its budget."""
    logs = Path(cfg.run_dir) / "logs"
    budgets = plan_budgets(cfg, cores or os.cpu_count() or 1,
                           _learner_on_gpu(cfg) if learner_on_gpu is None else learner_on_gpu)

    def role(name: str, kind: str, *extra: str, **kw) -> Role:
        threads = str(budgets[kind].torch_threads)
        # A floor under every thread pool of the process: OpenMP, MKL and OpenBLAS (numpy) teams are
        # every core otherwise, and idle OpenBLAS threads spin (each role's workers also set torch's).
        env = {**os.environ, **{v: threads for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}
        argv = [sys.executable, "-m", ROLE_MODULES[kind], "--config", str(config_path), *extra,
                "--torch-threads", threads]
        return Role(name, argv, logs / f"{name}.log", env=env, **kw)

    roles = [role("evaluator", "evaluator", echo=True)]
    if not C.is_async(cfg) and cfg.replay_shards == 1:  # the asynchronous family learns without replay
        roles.append(role("replay_server", "replay_server"))
    elif not C.is_async(cfg):  # sharded replay: one role per shard, each restarted on its own
        roles += [role(f"replay_server-{i}", "replay_server", "--shard", str(i)) for i in range(cfg.replay_shards)]
    roles.append(role("learner", "learner"))
    roles += [role(f"actor-{i}", "actor", "--actor-index", str(i), tell_restart=True) for i in range(cfg.num_actors)]
    return roles


def _dashboard_address(cfg: C.LaunchConfig) -> str:
    """Where the evaluator will serve the dashboard, as far as the flags say."""
    if not cfg.dashboard_port:
        return "on a free port"
    host = f"[{cfg.dashboard_host}]" if ":" in cfg.dashboard_host else cfg.dashboard_host
    return f"http://{host or '0.0.0.0'}:{cfg.dashboard_port}/"


def print_bounds(cfg: C.LaunchConfig) -> None:
    """What may be in flight between the roles (apex_zmq/flow.py), and how far priorities may lag; the
    weights pair in the learner's log (its size needs the network)."""
    from .envs import env_spec
    spec = env_spec(cfg.env)
    plan = flow.links(cfg, flow.obs_bytes(spec), stack=flow.wire_stack(cfg, spec))
    print("\n".join(f"run.sh: in flight, at most: {line}" for line in flow.describe(cfg, plan)), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run every role of one training run on this machine until done, failed or interrupted."""
    cfg = C.parse(C.LaunchConfig, argv, "run", prog="./run.sh")
    if cfg.port_base:
        for name, ep in C.loopback_endpoints(cfg.port_base).items():
            setattr(cfg, name, ep)
    for role_cls in C.ROLE_CONFIGS.values():  # every role's own checks, before anything starts
        try:
            C.validate(C.role_config(role_cls, dataclasses.asdict(cfg)))
        except C.ConfigError as e:
            print(f"./run.sh: {e}", file=sys.stderr, flush=True)
            raise
    # Before anything starts or the run directory is touched: beside a running run, every role
    # would fail to bind (and the other run's directory may be this one's).
    taken = ports_in_use(bound_endpoints(cfg))
    if taken:
        base = cfg.port_base or min(C.DEFAULT_PORTS.values())
        print(ports_in_use_message(taken, free_port_base(base + 10, cfg.replay_shards, cfg.shard_port_step)),
              file=sys.stderr, flush=True)
        return C.PORT_IN_USE_EXIT
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "finished.json").unlink(missing_ok=True)
    config_path = C.save(cfg, cfg.run_dir, "config")
    learner_on_gpu = _learner_on_gpu(cfg)
    if cfg.env.startswith("ALE/") and not learner_on_gpu:
        threads = plan_budgets(cfg, os.cpu_count() or 1, False)["learner"].torch_threads
        print(f"run.sh: no GPU here; measuring the learner's step on this CPU ({threads} thread(s))...", flush=True)
        rate = cpu_learner_steps_per_s(threads, cfg.batch_size, hidden=cfg.hidden)
        print(no_gpu_message(cfg.env, rate, threads, cfg.batch_size), flush=True)
    roles = build_roles(cfg, config_path, learner_on_gpu=learner_on_gpu)
    sup = Supervisor(roles, cfg.max_restarts, run_dir / "roles.json")
    resume = (run_dir / "checkpoints" / "last.pt").exists()
    kind = "actor-learner" if C.is_async(cfg) else "actor"
    print(f"run.sh: {cfg.env}, --algo {cfg.algo}, with {cfg.num_actors} {kind} process(es) x {cfg.envs_per_actor} envs"
          f"{' (resuming)' if resume else ''}\n"
          f"run.sh: run directory {run_dir.resolve()}\n"
          f"run.sh: role logs in {run_dir.resolve() / 'logs'}; metrics in metrics.csv, eval.csv; "
          f"TensorBoard: tensorboard --logdir {run_dir.resolve() / 'tb'}\n"
          f"run.sh: dashboard {_dashboard_address(cfg)} (the evaluator prints the address it serves, "
          f"also in {run_dir.resolve() / 'dashboard.url'}; learning curve in learning_curve.html/.png)\n"
          f"run.sh: Ctrl-C stops every role", flush=True)
    print_bounds(cfg)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    started = time.monotonic()
    outcome = supervise(sup, stop, cfg.max_seconds)
    restarts = {r.name: r.total_restarts for r in roles if r.total_restarts}
    print(f"run.sh: stopped ({outcome}) after {time.monotonic() - started:.0f}s"
          + (f"; restarts: {json.dumps(restarts)}" if restarts else ""), flush=True)
    return exit_code(outcome)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
