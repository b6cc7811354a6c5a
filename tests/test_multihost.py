"""Multi-host: the four programs on four network stacks, with CURVE on, learn CartPole.

Each role runs in its own Linux network namespace ("host"), joined to the others by a veth pair into
one bridge, with its own address in a private /24 and its own loopback. The command lines are the
ones a user types on separate hosts (README, "One role per host"): binding roles bind their host's
own address with ``--keys``, connecting roles connect to the other hosts' addresses.

    replay    10.213.47.2   binds experience, samples, priorities        --keys KEYS
    learner   10.213.47.3   binds weights; connects samples, priorities  --keys KEYS
    actor     10.213.47.4   connects experience, weights, telemetry      --keys KEYS/clients/client-1
    evaluator 10.213.47.5   binds telemetry; connects weights            --keys KEYS

The bridge carries no address, so the root namespace has no route into the /24: the subnet cannot
clash with the host's networks, and two runs of this test (different bridges) cannot see each other.

Besides training to the target, the test checks that CURVE really guards the sockets (actors with no
keys, or with a client key pair the servers never authorized, push nothing from the same host), and
that a binding role refuses a non-loopback address without ``--keys`` or ``--insecure``.

Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and iproute2; skipped, naming the failing command, elsewhere.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
from conftest import ROOT, stop_all

from apex_zmq.config import DEFAULT_PORTS
from apex_zmq.launch import role_module

TARGET = 195.0
BOUND_S = 300          # evaluator must reach the target this long after the actor starts (~20 s usual)
STARTUP_S = 90         # roles importing torch side by side on 2 cores
NEGATIVE_WINDOW_S = 5  # replay reports watched after the unauthorized actors are up
SUBNET = "10.213.47"
HOSTS = {"replay": 2, "learner": 3, "actor": 4, "evaluator": 5}  # host name -> last address octet


# ---------------------------------------------------------------------------------------- network

@dataclass
class Host:
    """One network namespace standing for one machine."""

    name: str
    netns: str
    addr: str
    dev: str  # its interface (the inner end of its veth pair)

    def ep(self, socket_name: str) -> str:
        """The tcp endpoint of ``socket_name`` (its default port) on this host's address."""
        return f"tcp://{self.addr}:{DEFAULT_PORTS[socket_name]}"

    def argv(self, *cmd: str) -> list[str]:
        """``cmd`` run on this host."""
        return ["ip", "netns", "exec", self.netns, *cmd]


class _SetupFailed(Exception):
    pass


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def hosts() -> Iterator[dict[str, Host]]:
    """A bridge in the root namespace and one namespace per host, each wired to it by a veth pair.

    Names carry a random suffix (interface names stay within Linux's 15 characters). Teardown kills
    whatever still runs in these namespaces (only this test starts processes there) and deletes every
    namespace and link it made, whether the test passed, failed or the setup broke halfway.
    """
    if not sys.platform.startswith("linux"):
        pytest.skip("network namespaces are Linux-only")
    if shutil.which("ip") is None:
        pytest.skip("network namespaces: `ip` (iproute2) is not installed")
    sfx = secrets.token_hex(3)
    bridge = f"azbr{sfx}"
    netns: list[str] = []
    links: list[str] = []   # root-namespace ends; deleting a veth end deletes its peer

    def run(*args: str) -> None:
        r = _ip(*args)
        if r.returncode != 0:
            raise _SetupFailed(f"`ip {' '.join(args)}` failed (exit {r.returncode}): "
                               f"{(r.stderr or r.stdout).strip()}")

    def teardown() -> None:
        problems = []
        for ns in netns:
            pids = _ip("netns", "pids", ns).stdout.split()
            for pid in pids:  # left behind by a failed test: this test's own role processes
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for link in reversed(links):
            r = _ip("link", "del", link)
            if r.returncode != 0 and "Cannot find device" not in r.stderr:
                problems.append(f"ip link del {link}: {r.stderr.strip()}")
        for ns in netns:
            r = _ip("netns", "del", ns)
            if r.returncode != 0:
                problems.append(f"ip netns del {ns}: {r.stderr.strip()}")
        if problems:
            warnings.warn("multihost teardown left things behind: " + "; ".join(problems))

    made: dict[str, Host] = {}
    try:
        run("link", "add", bridge, "type", "bridge")
        links.append(bridge)
        # Best effort: bridged frames skip iptables, so a host firewall's FORWARD policy (Docker's
        # DROP, say) cannot eat this private segment when br_netfilter is loaded.
        _ip("link", "set", bridge, "type", "bridge", "nf_call_iptables", "0")
        run("link", "set", bridge, "up")
        for i, (name, octet) in enumerate(HOSTS.items()):
            ns = f"apexzmq-{sfx}-{name}"
            outer, inner = f"az{sfx}{i}o", f"az{sfx}{i}i"
            run("netns", "add", ns)
            netns.append(ns)
            run("link", "add", outer, "type", "veth", "peer", "name", inner)
            links.insert(0, outer)  # veths go before the bridge
            run("link", "set", outer, "master", bridge)
            run("link", "set", outer, "up")
            run("link", "set", inner, "netns", ns)
            run("-n", ns, "link", "set", "lo", "up")
            run("-n", ns, "addr", "add", f"{SUBNET}.{octet}/24", "dev", inner)
            run("-n", ns, "link", "set", inner, "up")
            run("netns", "exec", ns, "true")  # how the roles start: it mounts a private /sys
            made[name] = Host(name, ns, f"{SUBNET}.{octet}", inner)
    except (_SetupFailed, subprocess.TimeoutExpired) as e:
        teardown()
        pytest.skip(f"cannot create network namespaces here (needs root and iproute2): {e}")
    try:
        yield made
    finally:
        teardown()


# ---------------------------------------------------------------------------------------- helpers

def _tail(log: Path, n: int = 2500) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no log)"


def _metric(run_dir: Path, tag: str) -> list[tuple[float, float]]:
    """(time, value) of every ``tag`` row in ``run_dir/metrics.csv`` so far (a half-written last line
    is skipped)."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return []
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("tag") == tag:
                try:
                    out.append((float(row["time"]), float(row["value"])))
                except (TypeError, ValueError):
                    pass
    return out


class Roles:
    """Role processes on their hosts, each logging to ``logs/<name>.log``."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, host: Host, role: str, args: list[str]) -> None:
        """``python -m <role> args`` on ``host`` (what `apex-zmq <role> args` runs)."""
        with open(self.logs / f"{name}.log", "wb") as f:
            self.procs[name] = subprocess.Popen(
                host.argv(sys.executable, "-m", role_module(role), *args), stdout=f,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def stop(self, *names: str) -> None:
        stop_all([self.procs[n] for n in names if n in self.procs])

    def report(self) -> str:
        return "".join(f"\n--- {n} (exit {p.poll()}) ---\n{_tail(self.logs / f'{n}.log')}"
                       for n, p in self.procs.items())

    def wait_until(self, cond: Callable[[], bool], timeout: float, what: str,
                   may_exit: tuple[str, ...] = ()) -> None:
        """Poll ``cond`` until it holds; fail when ``timeout`` passes or a role exits meanwhile."""
        deadline = time.monotonic() + timeout
        while not cond():
            for n, p in self.procs.items():
                if n not in may_exit and p.poll() is not None:
                    pytest.fail(f"{n} exited ({p.returncode}) while waiting for {what}{self.report()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} after {timeout:.0f}s{self.report()}")
            time.sleep(0.25)


def _keys(directory: Path, *extra: str) -> None:
    r = subprocess.run([sys.executable, "-m", "apex_zmq.cli", "keys", str(directory), *extra],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, f"apex-zmq keys {directory} failed: {r.stdout}{r.stderr}"


# ------------------------------------------------------------------------------------------- test

def test_roles_on_separate_network_stacks_train_cartpole_over_curve(hosts: dict[str, Host],
                                                                     tmp_path: Path) -> None:
    t_start = time.monotonic()
    replay, learner, actor, evaluator = (hosts[n] for n in ("replay", "learner", "actor", "evaluator"))

    # Separate network stacks: each host has only its loopback and its own address, and reaches the
    # others through its own interface (so no role can have talked to another over loopback).
    for h in hosts.values():
        addrs = {line.split()[3].split("/")[0]
                 for line in _ip("-n", h.netns, "-o", "-4", "addr", "show").stdout.splitlines()}
        assert addrs == {"127.0.0.1", h.addr}, (h.name, addrs)
        for other in hosts.values():
            if other is not h:
                route = _ip("-n", h.netns, "route", "get", other.addr).stdout
                assert f"dev {h.dev}" in route and "local" not in route, (h.name, other.name, route)

    # Real CURVE keys: the deployment's, with one client key pair for the actor host, and a second,
    # foreign deployment's. The intruder knows the real server's public key (it is public) but holds
    # a client key pair the servers never authorized.
    keys, foreign, intruder = tmp_path / "keys", tmp_path / "foreign", tmp_path / "intruder"
    _keys(keys, "--clients", "1")
    _keys(foreign)
    actor_keys = keys / "clients" / "client-1"
    assert (actor_keys / "client.key_secret").is_file() and (keys / "server.key_secret").is_file()
    intruder.mkdir(mode=0o700)
    shutil.copy2(keys / "server.key", intruder / "server.key")
    for name in ("client.key", "client.key_secret"):
        shutil.copy2(foreign / name, intruder / name)

    env = ["--env", "CartPole-v1", "--num-actors", "1"]
    replay_binds = ["--experience", replay.ep("experience"), "--samples", replay.ep("samples"),
                    "--priorities", replay.ep("priorities")]
    runs = {n: tmp_path / "runs" / n for n in ("replay", "learner", "actor", "evaluator", "refused",
                                                 "intruder_no_keys", "intruder_foreign_key")}

    # A binding role given its host's address, without --keys and without --insecure, refuses.
    refused = subprocess.run(
        replay.argv(sys.executable, "-m", "replay_server", *env, "--run-dir",
                    str(runs["refused"]), *replay_binds, "--telemetry", evaluator.ep("telemetry")),
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    message = refused.stdout + refused.stderr
    assert refused.returncode != 0, f"replay server bound {replay.ep('experience')} without keys: {message}"
    assert "--keys" in message and "--insecure" in message and replay.ep("experience") in message, message

    logs = tmp_path / "logs"
    logs.mkdir()
    roles = Roles(logs)
    actor_connects = ["--experience", replay.ep("experience"), "--weights", learner.ep("weights"),
                      "--telemetry", evaluator.ep("telemetry"), "--actor-index", "0"]
    try:
        # host C, host R, host L: the binding roles, each with the deployment's key directory.
        roles.start("evaluator", evaluator, "evaluator", [
            *env, "--run-dir", str(runs["evaluator"]), "--keys", str(keys),
            "--telemetry", evaluator.ep("telemetry"), "--weights", learner.ep("weights"),
            "--stop-at-return", str(TARGET), "--dashboard-port", "0"])
        roles.start("replay", replay, "replay_server", [
            *env, "--run-dir", str(runs["replay"]), "--keys", str(keys), *replay_binds,
            "--telemetry", evaluator.ep("telemetry")])
        roles.start("learner", learner, "learner", [
            *env, "--run-dir", str(runs["learner"]), "--keys", str(keys),
            "--samples", replay.ep("samples"), "--priorities", replay.ep("priorities"),
            "--weights", learner.ep("weights"), "--telemetry", evaluator.ep("telemetry")])

        # Negative control, on the actor host: an actor without keys and one with an unauthorized
        # client key push nothing. Same host and endpoints as the real actor below, which does.
        roles.start("intruder_no_keys", actor, "actor",
                    [*env, "--run-dir", str(runs["intruder_no_keys"]), *actor_connects])
        roles.start("intruder_foreign_key", actor, "actor",
                    [*env, "--run-dir", str(runs["intruder_foreign_key"]), "--keys", str(intruder),
                     *actor_connects])
        # An actor saves its config after its imports, just before it builds its envs and sockets.
        roles.wait_until(lambda: all((runs[n] / "config_actor_0.json").exists()
                                     for n in ("intruder_no_keys", "intruder_foreign_key")),
                         STARTUP_S, "intruder actors started")
        intruders_up = time.time()
        # Replay reports cross R -> C over CURVE once a second; watch them for a window while the
        # intruders keep trying (wait_until fails if an intruder exits: then it proved nothing).
        roles.wait_until(lambda: any(t >= intruders_up + NEGATIVE_WINDOW_S
                                     for t, _ in _metric(runs["evaluator"], "replay/inserted")),
                         STARTUP_S, f"replay reports {NEGATIVE_WINDOW_S}s after the intruders started")
        during = _metric(runs["evaluator"], "replay/inserted")
        assert during and all(v == 0 for _, v in during), \
            f"unauthorized actors got experience into the replay: {during}{roles.report()}"
        roles.stop("intruder_no_keys", "intruder_foreign_key")
        negative_s = time.monotonic() - t_start

        # Host B: the real actor, with its own client key directory.
        roles.start("actor", actor, "actor", [*env, "--run-dir", str(runs["actor"]),
                                              "--keys", str(actor_keys), *actor_connects])
        t_actor = time.monotonic()
        roles.wait_until(lambda: roles.procs["evaluator"].poll() is not None, BOUND_S,
                         f"evaluation mean >= {TARGET} (evaluator exit)",
                         may_exit=("evaluator", "intruder_no_keys", "intruder_foreign_key"))
        train_s = time.monotonic() - t_actor
        code = roles.procs["evaluator"].returncode
        assert code == 0, f"evaluator exited {code}{roles.report()}"
    finally:
        roles.stop(*roles.procs)

    finished = json.loads((runs["evaluator"] / "finished.json").read_text())
    assert finished["mean"] >= TARGET, finished
    with open(runs["evaluator"] / "eval.csv", newline="") as f:
        evals = list(csv.DictReader(f))
    best = max(evals, key=lambda r: float(r["mean"]))
    assert float(best["mean"]) >= TARGET and int(best["learner_steps"]) > 0, best

    # Every socket carried traffic between hosts (all seen at the evaluator, over telemetry C <- *):
    def last(tag: str) -> float:
        rows = _metric(runs["evaluator"], tag)
        assert rows, f"no {tag} in the evaluator's metrics.csv"
        return max(v for _, v in rows)

    assert last("replay/inserted") > 0              # experience  B -> R
    assert last("learner/steps") > 0                # samples     R -> L
    assert last("replay/updated") > 0               # priorities  L -> R
    assert last("actor/weights_version") > 0        # weights     L -> B (and L -> C: eval rows above)
    assert last("replay/rejected_experience") == 0  # nothing malformed arrived from anyone
    print(f"\nmultihost: negative control done after {negative_s:.1f}s, target {finished['mean']:.1f} "
          f"reached {train_s:.1f}s after the actor started; whole test {time.monotonic() - t_start:.1f}s")
