"""./run.sh's supervisor keeps its promises: restart backoff, giving up, the evaluator's exit ending the
run, configuration errors ending it at once, and the launcher's exit status; a run on ports another
run (or any process) holds is refused before anything starts, and a role that loses a race for its
port ends the run instead of being restarted."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, free_port_base

from apex_zmq import config as C
from apex_zmq import launch
from apex_zmq.cpu_advice import cpu_learner_steps_per_s, no_gpu_message
from apex_zmq.launch import Role, Supervisor, exit_code, restart_delay, supervise

# Tiny stand-ins for roles: real processes, so exit codes and pipes behave as in a run.
CRASH = [sys.executable, "-c", "import sys; sys.exit(3)"]
SLEEP = [sys.executable, "-c", "import time; time.sleep(120)"]
SUCCEED = [sys.executable, "-c", "pass"]
CONFIG_ERROR = [sys.executable, "-u", "-c", "import sys\n"
                "for i in range(30): print(f'early line {i}')\n"
                "print('learner: last.pt was written for another network', file=sys.stderr)\n"
                f"sys.exit({C.CONFIG_ERROR_EXIT})"]

# The documented schedule, written out: restart n (from 0) in a row waits this many seconds.
BACKOFF_S = [1, 2, 4, 8, 16, 30, 30]


class FakeClock:
    """A monotonic clock that moves only when the test moves it."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def make_sup(tmp_path: Path):
    """Build supervisors over stand-in roles; every role still running is stopped afterwards."""
    made: list[Supervisor] = []

    def make(roles: dict[str, list[str]], max_restarts: int = 5, clock=None) -> Supervisor:
        rs = [Role(name, argv, tmp_path / "logs" / f"{name}.log") for name, argv in roles.items()]
        sup = Supervisor(rs, max_restarts, tmp_path / "roles.json", **({"clock": clock} if clock else {}))
        made.append(sup)
        return sup

    yield make
    for sup in made:
        sup.stop_all(timeout=5)


def _role(sup: Supervisor, name: str) -> Role:
    return next(r for r in sup.roles if r.name == name)


def _start_and_crash(sup: Supervisor, role: Role) -> str | None:
    """One life of ``role``: the poll that starts it, its exit, the poll that sees the exit."""
    assert sup.poll() is None
    assert role.proc is not None, "the role was not started"
    role.proc.wait(30)
    return sup.poll()


def test_restart_delay_doubles_from_one_second_up_to_thirty() -> None:
    assert [restart_delay(n) for n in range(len(BACKOFF_S))] == BACKOFF_S
    assert restart_delay(50) == 30


def test_crashing_role_is_restarted_on_the_backoff_schedule(make_sup) -> None:
    clock = FakeClock()
    sup = make_sup({"actor-0": CRASH}, max_restarts=len(BACKOFF_S), clock=clock)
    role = _role(sup, "actor-0")
    observed = []
    for _ in BACKOFF_S:
        assert _start_and_crash(sup, role) is None
        assert role.proc is None
        observed.append(role.next_start - clock.t)
        clock.t = role.next_start - 0.01
        assert sup.poll() is None and role.proc is None, "restarted before its backoff was over"
        clock.t = role.next_start
    assert observed == BACKOFF_S
    assert role.total_restarts == len(BACKOFF_S)


def test_gives_up_after_max_restarts_in_a_row(make_sup, capsys) -> None:
    clock = FakeClock()
    sup = make_sup({"actor-0": CRASH, "replay_server": SLEEP}, max_restarts=2, clock=clock)
    role = _role(sup, "actor-0")
    lives, outcome = 0, None
    while outcome is None and lives < 10:
        outcome = _start_and_crash(sup, role)
        lives += 1
        clock.t = role.next_start
    assert outcome == "failed"
    assert (lives, role.total_restarts) == (3, 2)  # the first life and two restarts
    out = capsys.readouterr().out
    assert "actor-0 exited with code 3 3 times in a row; giving up" in out
    assert str(role.log) in out
    assert exit_code(outcome) != 0


def test_supervise_stops_every_role_and_fails_the_run_when_one_gives_up(make_sup) -> None:
    sup = make_sup({"actor-0": CRASH, "replay_server": SLEEP}, max_restarts=0)
    outcome = supervise(sup, threading.Event(), max_seconds=60, period=0.05)
    assert outcome == "failed"
    assert exit_code(outcome) == 1
    assert _role(sup, "replay_server").proc.poll() is not None, "a role outlived the run"


@pytest.mark.parametrize("alive_s, delay, in_a_row", [
    (Supervisor.HEALTHY_AFTER_S - 1, 4, 3),   # died before it was healthy: the backoff goes on
    (Supervisor.HEALTHY_AFTER_S + 1, 1, 1),   # healthy first: this crash counts as the first again
])
def test_in_a_row_count_resets_once_a_role_has_been_healthy(make_sup, alive_s: float, delay: float,
                                                            in_a_row: int) -> None:
    clock = FakeClock()
    sup = make_sup({"learner": CRASH}, max_restarts=5, clock=clock)
    role = _role(sup, "learner")
    for _ in range(2):
        assert _start_and_crash(sup, role) is None
        clock.t = role.next_start
    assert role.restarts == 2
    role.argv = SLEEP  # this time it comes up and stays up
    assert sup.poll() is None and role.proc is not None
    clock.t += alive_s
    assert sup.poll() is None
    role.proc.kill()
    role.proc.wait(30)
    assert sup.poll() is None
    assert role.next_start - clock.t == delay
    assert role.restarts == in_a_row
    assert role.total_restarts == 3


def test_evaluator_exiting_zero_finishes_the_run(make_sup) -> None:
    sup = make_sup({"evaluator": SUCCEED, "replay_server": SLEEP})
    outcome = supervise(sup, threading.Event(), max_seconds=60, period=0.05)
    assert outcome == "finished"
    assert exit_code(outcome) == 0
    assert _role(sup, "evaluator").total_restarts == 0
    assert _role(sup, "replay_server").proc.poll() is not None, "a role outlived the run"


def test_only_the_evaluators_exit_ends_the_run(make_sup) -> None:
    clock = FakeClock()
    sup = make_sup({"evaluator": SLEEP, "actor-0": SUCCEED}, clock=clock)
    actor = _role(sup, "actor-0")
    assert _start_and_crash(sup, actor) is None  # an actor done with its steps is started again
    assert (actor.proc, actor.total_restarts) == (None, 1)


def test_crashing_evaluator_is_restarted_like_any_role(make_sup) -> None:
    clock = FakeClock()
    sup = make_sup({"evaluator": CRASH, "replay_server": SLEEP}, clock=clock)
    evaluator, replay = _role(sup, "evaluator"), _role(sup, "replay_server")
    assert _start_and_crash(sup, evaluator) is None  # not "finished": a crash is no end of the run
    assert (evaluator.proc, evaluator.restarts, evaluator.next_start - clock.t) == (None, 1, 1)
    assert replay.proc.poll() is None
    clock.t = evaluator.next_start
    assert sup.poll() is None and evaluator.proc is not None


def test_configuration_error_ends_the_run_at_once_showing_the_log(make_sup, capsys) -> None:
    assert C.CONFIG_ERROR_EXIT == 78  # sysexits EX_CONFIG: scripts around ./run.sh may rely on it
    sup = make_sup({"learner": CONFIG_ERROR, "replay_server": SLEEP}, max_restarts=5, clock=FakeClock())
    learner = _role(sup, "learner")
    assert _start_and_crash(sup, learner) == "failed"
    assert learner.total_restarts == 0
    out = capsys.readouterr().out
    assert "learner stopped on a configuration error (exit code 78)" in out
    assert str(learner.log) in out
    assert "learner: last.pt was written for another network" in out  # the role's last words
    assert "early line 29" in out and "early line 0\n" not in out   # its last lines, not the whole log


def _write_checkpoint(run_dir: Path, env: str, hidden: int) -> None:
    from learner.main import LearnerCore
    LearnerCore(C.LearnerConfig(env=env, hidden=hidden, run_dir=str(run_dir), device="cpu")).save()


def test_launcher_exits_non_zero_at_once_on_a_checkpoint_of_another_network(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _write_checkpoint(run_dir, "CartPole-v1", 64)
    argv = [sys.executable, "-m", "apex_zmq.launch", "--env", "CartPole-v1", "--run-dir", str(run_dir),
            "--port-base", str(free_port_base()), "--max-seconds", "300", "--num-actors", "1",
            "--dashboard-port", "0", "--hidden", "32"]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=360)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "run.sh: learner stopped on a configuration error (exit code 78)" in out.stdout
    assert str(run_dir / "logs" / "learner.log") in out.stdout
    assert (f"{run_dir / 'checkpoints' / 'last.pt'} was written for --algo dqn --env CartPole-v1 --hidden 64; "
            f"this run has --algo dqn --env CartPole-v1 --hidden 32") in out.stdout
    assert "run.sh: stopped (failed)" in out.stdout
    assert "learner exited with code" not in out.stdout  # it was not restarted
    assert "no GPU here" not in out.stdout  # said of Atari runs only


def test_no_gpu_message_names_the_rate_and_the_minatar_command() -> None:
    text = no_gpu_message("ALE/Breakout-v5", 0.8, 2, 512)
    assert "no GPU here" in text and "0.80 steps/s of 512 on 2 thread(s)" in text and "~2,880 steps an hour" in text
    assert "./run.sh --env MinAtar/Breakout-v0" in text


def test_cpu_learner_rate_is_measured() -> None:
    rate = cpu_learner_steps_per_s(1, batch=4, hidden=16)
    assert 0 < rate < float("inf")


def test_atari_run_without_gpu_is_told_at_once_before_any_role_starts(tmp_path: Path) -> None:
    if launch.gpu_device_nodes():
        pytest.skip("this machine has a GPU driver")
    argv = [sys.executable, "-m", "apex_zmq.launch", "--env", "ALE/Pong-v5", "--run-dir", str(tmp_path / "run"),
            "--port-base", str(free_port_base()), "--max-seconds", "2", "--num-actors", "1",
            "--dashboard-port", "0", "--hidden", "16", "--batch-size", "8"]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = out.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if "run.sh: no GPU here" in line)
    started = next(i for i, line in enumerate(lines) if line.startswith("run.sh: ALE/Pong-v5, --algo dqn"))
    assert first < started, out.stdout[-3000:]
    assert "steps/s of 8 on" in out.stdout and "./run.sh --env MinAtar/Breakout-v0" in out.stdout, out.stdout


# --------------------------------------------------------------------------- ports another run holds

PORT_IN_USE = [sys.executable, "-u", "-c", "import sys\n"
               "print('cannot bind tcp://127.0.0.1:5551: the address is in use (another run?)', file=sys.stderr)\n"
               f"sys.exit({C.PORT_IN_USE_EXIT})"]


def _launch_argv(run_dir: Path, base: int, max_seconds: float) -> list[str]:
    return [sys.executable, "-m", "apex_zmq.launch", "--env", "CartPole-v1", "--run-dir", str(run_dir),
            "--port-base", str(base), "--max-seconds", str(max_seconds), "--num-actors", "1",
            "--dashboard-port", "0", "--hidden", "32"]


def _bound_ports(base: int) -> dict[str, int]:
    eps = launch.bound_endpoints(C.LaunchConfig(env="CartPole-v1", **C.loopback_endpoints(base)))
    return {name: int(ep.rsplit(":", 1)[1]) for name, ep in eps.items()}


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_port_in_use_ends_the_run_at_once_without_restarting(make_sup, capsys) -> None:
    """A role that exits with PORT_IN_USE_EXIT (it lost a race for its port) is not restarted until
    --max-seconds: the run ends, non-zero, naming the way out."""
    assert C.PORT_IN_USE_EXIT == 69 and C.PORT_IN_USE_EXIT != C.CONFIG_ERROR_EXIT  # sysexits EX_UNAVAILABLE
    sup = make_sup({"replay_server": PORT_IN_USE, "learner": SLEEP}, max_restarts=5, clock=FakeClock())
    replay = _role(sup, "replay_server")
    assert _start_and_crash(sup, replay) == "port in use"
    assert replay.total_restarts == 0
    out = capsys.readouterr().out
    assert "replay_server could not bind a port" in out and "--port-base N" in out
    assert "the address is in use (another run?)" in out  # the role's last words
    assert exit_code("port in use") == C.PORT_IN_USE_EXIT
    outcome = supervise(make_sup({"replay_server": PORT_IN_USE, "evaluator": SLEEP}), threading.Event(),
                        max_seconds=60, period=0.05)
    assert outcome == "port in use"


def test_bound_endpoints_are_those_the_roles_bind() -> None:
    replay = C.LaunchConfig(env="CartPole-v1")
    assert list(launch.bound_endpoints(replay)) == ["experience", "samples", "priorities", "weights", "telemetry"]
    assert list(launch.bound_endpoints(C.LaunchConfig(env="CartPole-v1", algo="a3c"))) == [
        "gradients", "weights", "telemetry"]


def test_ports_in_use_finds_a_listening_socket_and_skips_what_it_cannot_probe() -> None:
    base = free_port_base()
    with socket.socket() as held:
        held.bind(("127.0.0.1", base + 2))
        held.listen(1)
        eps = {"a": f"tcp://127.0.0.1:{base}", "b": f"tcp://127.0.0.1:{base + 2}", "c": f"tcp://*:{base + 2}",
               "d": "tcp://127.0.0.1:*", "e": "ipc:///tmp/x", "f": "tcp://no-such-interface0:5"}
        assert launch.ports_in_use(eps) == [(base + 2, "b", eps["b"]), (base + 2, "c", eps["c"])]
    # The probes let go: the same ports are free again, and two endpoints on one address collide.
    assert launch.ports_in_use({"a": f"tcp://127.0.0.1:{base}"}) == []
    assert launch.ports_in_use({"a": f"tcp://127.0.0.1:{base}", "b": f"tcp://localhost:{base}"}) == [
        (base, "b", f"tcp://localhost:{base}")]


def test_run_on_a_port_in_use_says_so_at_once_and_exits_non_zero(tmp_path: Path) -> None:
    base = free_port_base()
    port = _bound_ports(base)["telemetry"]
    with socket.socket() as held:
        held.bind(("127.0.0.1", port))
        held.listen(1)
        started = time.monotonic()
        out = subprocess.run(_launch_argv(tmp_path / "run", base, 60), cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    assert out.returncode == C.PORT_IN_USE_EXIT, out.stdout[-3000:] + out.stderr[-3000:]
    assert time.monotonic() - started < 30  # no role started, nothing restarted
    assert (f"run.sh: port {port} (telemetry, tcp://127.0.0.1:{port}) is in use (another run?); stop it or "
            f"choose other ports with --port-base N") in out.stderr
    assert "run.sh: CartPole-v1" not in out.stdout  # said before anything started
    assert not (tmp_path / "run").exists()  # nor was the run directory touched


def test_second_run_on_the_same_ports_fails_fast_and_the_first_is_unaffected(tmp_path: Path) -> None:
    base = free_port_base()
    first = subprocess.Popen(_launch_argv(tmp_path / "first", base, 120), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    try:
        ports = _bound_ports(base)
        deadline = time.monotonic() + 90  # every role of the first run has bound its port
        # Waited for by connecting, not by binding: a probe that binds could take a port from a role.
        while not all(_listening(p) for p in ports.values()):
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not bind its ports"
            time.sleep(0.5)
        pids = {n: r["pid"] for n, r in json.loads((tmp_path / "first" / "roles.json").read_text()).items()}
        started = time.monotonic()
        second = subprocess.run(_launch_argv(tmp_path / "second", base, 60), cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == C.PORT_IN_USE_EXIT, second.stdout[-3000:] + second.stderr[-3000:]
        assert time.monotonic() - started < 30
        assert second.stderr.startswith("run.sh: ports "), second.stderr
        for name, p in ports.items():
            assert f"{p} ({name}, tcp://127.0.0.1:{p})" in second.stderr
        assert "are in use (another run?); stop it or choose other ports with --port-base N" in second.stderr
        suggested = int(second.stderr.split("--port-base ")[-1].split()[0])
        assert suggested >= base + 10 and launch.ports_in_use(C.loopback_endpoints(suggested)) == []
        # The first run goes on with the same processes, none restarted.
        time.sleep(2)
        assert first.poll() is None
        roles = json.loads((tmp_path / "first" / "roles.json").read_text())
        assert {n: r["pid"] for n, r in roles.items()} == pids
        assert all(r["restarts"] == 0 for r in roles.values()), roles
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGINT)
        text = first.communicate(timeout=60)[0]
    assert first.returncode == 0, text[-3000:]
    assert "exited with code" not in text, text[-3000:]


def test_role_whose_port_is_taken_exits_with_port_in_use(tmp_path: Path) -> None:
    """The race the launcher's check cannot close (a port taken after it): the role says which
    address and exits PORT_IN_USE_EXIT, which the supervisor does not restart."""
    base = free_port_base()
    eps = C.loopback_endpoints(base)
    port = int(eps["priorities"].rsplit(":", 1)[1])
    with socket.socket() as held:
        held.bind(("127.0.0.1", port))
        held.listen(1)
        flags = [a for name, ep in eps.items() for a in (f"--{name}", ep)]
        out = subprocess.run([sys.executable, "-m", "replay_server", "--env", "CartPole-v1", "--run-dir",
                              str(tmp_path / "run"), *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == C.PORT_IN_USE_EXIT, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"cannot bind {eps['priorities']}: the address is in use (another run?)" in out.stderr
