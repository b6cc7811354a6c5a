"""The evaluator's dashboard.

Without sockets: ``RunMonitor`` (ladder of recent returns per env slot, heartbeats up and down, the
state JSON, bounded series), the eval.csv follower and the learning-curve files. With loopback
sockets: the HTTP server's routes (static files with caching, no path traversal, 405, host checks).

In a real browser: a short CartPole run of the four role programs with ``--dashboard-port 0``; headless
Debian chromium (``/usr/bin/chromium``, driven by Playwright) opens the page, and the figures on it are
checked against ``/api/state`` fetched at the same moment and against what the roles reported
(metrics.csv, actor_episodes.csv, eval.csv), with the roles paused (SIGSTOP) so nothing moves while
both are read. Then: the figures move on, the learning-curve files open offline, and a killed actor
is shown down after the heartbeat timeout. Skipped, saying why, where chromium is missing and cannot
be installed.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from conftest import endpoint_flags, start_role, stop_all

from apex_zmq import config as C
from apex_zmq.exploration import actor_epsilons, epsilon_ladder
from apex_zmq.logger import Logger
from apex_zmq.wire import Telemetry, encode
from evaluator.dashboard.curves import CURVE_MAX_POINTS, curve_points, learning_curve_html, write_learning_curves
from evaluator.dashboard.server import STATIC_DIR, Dashboard, load_static, route
from evaluator.monitor import CsvFollower, CsvTail, RunMonitor, Series, thin

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def tel(sender: str, role: str, metrics: dict[str, float] | None = None,
        episodes: list[dict[str, Any]] | None = None) -> Telemetry:
    return Telemetry(sender=sender, seq=1, role=role, time=1.0, metrics=metrics or {}, episodes=episodes or [])


def ep(slot: int, eps: float, ret: float) -> dict[str, Any]:
    return {"slot": slot, "epsilon": eps, "return": ret, "clipped_return": max(-1.0, min(1.0, ret)), "length": 10}


# --------------------------------------------------------------------------- monitor (pure)


def test_ladder_averages_each_slots_recent_returns() -> None:
    m = RunMonitor(num_slots=4, ladder_window=3)
    eps = actor_epsilons(0, 4, 1)
    m.take(tel("actor-0", "actor", episodes=[ep(0, eps[0], r) for r in (1.0, 2.0, 3.0, 10.0)]), now=1.0)
    m.take(tel("actor-0", "actor", episodes=[ep(2, eps[2], 5.0)]), now=2.0)
    ladder = {p["slot"]: p for p in m.ladder()}
    assert sorted(ladder) == [0, 1, 2, 3]  # every configured slot has a point, reported or not
    assert ladder[0] == {"slot": 0, "epsilon": eps[0], "recent_mean_return": 5.0, "episodes": 4}  # (2+3+10)/3
    assert ladder[2]["recent_mean_return"] == 5.0 and ladder[2]["episodes"] == 1
    assert ladder[1] == {"slot": 1, "epsilon": None, "recent_mean_return": None, "episodes": 0}
    # A slot beyond the configured ladder (an actor started with other flags) is shown, not lost.
    m.take(tel("actor-9", "actor", episodes=[ep(7, 0.01, 4.0)]), now=3.0)
    assert m.ladder()[-1]["slot"] == 7


def test_ladder_drops_malformed_episodes_and_counts_them() -> None:
    m = RunMonitor(num_slots=2)
    bad = [{"slot": -1, "epsilon": 0.4, "return": 1.0}, {"slot": 0.5, "epsilon": 0.4, "return": 1.0},
           {"slot": 1 << 30, "epsilon": 0.4, "return": 1.0}, {"slot": 0, "epsilon": 1.5, "return": 1.0},
           {"slot": 0, "epsilon": 0.4, "return": math.nan}, {"slot": 0, "epsilon": 0.4}]
    got = m.take(tel("actor-0", "actor", episodes=[*bad, ep(1, 0.1, 7.0)]), now=1.0)
    assert m.rejected_episodes == len(bad)
    assert [e["slot"] for e in got.episodes] == [1]  # only the valid one reaches actor_episodes.csv
    assert [p["episodes"] for p in m.ladder()] == [0, 1]


def test_heartbeats_go_down_after_the_timeout_and_dead_actors_stop_counting() -> None:
    m = RunMonitor(num_slots=0, heartbeat_timeout=5.0)
    m.take(tel("actor-0", "actor", {"actor/steps_per_s": 100.0}), now=100.0)
    m.take(tel("actor-1", "actor", {"actor/steps_per_s": 50.0}), now=102.0)
    m.take(tel("learner", "learner", {"learner/steps": 7}), now=102.0)
    assert m.metrics["actor/steps_per_s"] == 150.0  # the run's rate: the sum over actors
    rows = {h["sender"]: h for h in m.state(105.0)["heartbeats"]}
    assert rows["actor-0"]["up"] and rows["actor-0"]["age_s"] == 5.0 and rows["actor-0"]["role"] == "actor"
    state = m.state(105.5)
    rows = {h["sender"]: h for h in state["heartbeats"]}
    assert not rows["actor-0"]["up"] and rows["actor-1"]["up"] and rows["learner"]["up"]
    assert state["latest"]["actor/steps_per_s"] == 50.0  # actor-0's last rate no longer counts
    assert "DOWN: actor-0" in m.progress_line(105.5)
    assert "DOWN" not in m.progress_line(104.0)


def test_the_least_agreeing_live_actor_shows_its_acting_copy() -> None:
    m = RunMonitor(num_slots=0, heartbeat_timeout=5.0)
    m.take(tel("actor-0", "actor", {"actor/acting_agreement": 0.75, "actor/acting_bits": 7.0}), now=100.0)
    m.take(tel("actor-1", "actor", {"actor/acting_agreement": 1.0, "actor/acting_bits": 8.0}), now=102.0)
    latest = m.state(104.0)["latest"]
    assert (latest["actor/acting_agreement"], latest["actor/acting_bits"]) == (0.75, 7.0)
    latest = m.state(105.5)["latest"]  # actor-0 is down: only live actors count
    assert (latest["actor/acting_agreement"], latest["actor/acting_bits"]) == (1.0, 8.0)


def test_state_is_strict_json_with_only_each_roles_own_metrics() -> None:
    m = RunMonitor(num_slots=2, started=10.0, info={"env": "CartPole-v1"})
    m.take(tel("learner", "learner", {"learner/steps": 3, "learner/loss": math.nan, "replay/size": 99,
                                      "perf/learner_wait_fraction": 0.5}), now=11.0)
    m.take(tel("replay", "replay", {"replay/size": 1234, "replay/inserted_per_s": math.inf}), now=11.0)
    m.on_eval_rows([{"time": 11.5, "learner_steps": 3.0, "mean": 20.0, "min": 10.0, "max": 30.0,
                     "protocol": "plain"}, {"time": 12.0, "mean": "not a number"}])
    state = json.loads(json.dumps(m.state(12.0), allow_nan=False))
    assert state["env"] == "CartPole-v1" and state["now"] == 12.0 and state["started"] == 10.0
    assert state["latest"]["replay/size"] == 1234  # the learner cannot speak for the replay server
    assert state["latest"]["learner/steps"] == 3 and state["latest"]["learner/loss"] is None
    assert state["latest"]["replay/inserted_per_s"] is None  # JSON has no inf
    assert math.isnan(m.metrics["learner/loss"])  # logged as reported: a NaN loss means something
    assert state["latest"]["perf/learner_wait_fraction"] == 0.5
    assert state["series"]["learner"] == {"t": [11.0], "steps": [3.0], "steps_per_s": [None], "loss": [None],
                                          "staleness": [None], "entropy": [None]}  # the last two: asynchronous
    assert state["series"]["replay"]["size"] == [1234.0]
    assert state["eval"]["count"] == 1  # the malformed row is skipped
    assert state["eval"]["points"] == [{"time": 11.5, "learner_steps": 3.0, "mean": 20.0, "min": 10.0, "max": 30.0}]
    assert state["eval"]["latest"]["mean"] == 20.0 and state["eval"]["latest"]["protocol"] == "plain"
    assert [p["slot"] for p in state["ladder"]] == [0, 1]
    assert [h["sender"] for h in state["heartbeats"]] == ["learner", "replay"]
    line = m.progress_line(12.0)
    assert line.startswith("[0:00:02] eval 20.0 @3 | learner 3 steps") and "replay 1.2k" in line


def test_on_telemetry_logs_valid_reports_and_counts_malformed_ones(tmp_path: Path) -> None:
    logger = Logger(tmp_path, tensorboard=False)
    m = RunMonitor(logger, num_slots=1)
    m.on_telemetry(encode(tel("actor-0", "actor", {"actor/steps_per_s": 8.0}, [ep(0, 0.4, 12.0)])), now=1.0)
    m.on_telemetry([b"\x93garbage"], now=1.0)
    logger.close()
    assert m.rejected == 1
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert {(r["tag"], float(r["value"])) for r in rows} == {("actor/steps_per_s", 8.0),
                                                             ("actor/episode_return", 12.0)}
    (episode,) = csv.DictReader(open(tmp_path / "actor_episodes.csv"))
    assert episode["actor"] == "actor-0" and float(episode["return"]) == 12.0 and episode["slot"] == "0"


def test_series_coalesces_close_points_and_thins_when_full() -> None:
    s = Series(["v"], max_points=10, resolution=1.0)
    for t, v in ((0.0, 1), (0.3, 2), (0.6, 3)):  # three reports in one second: one point, the latest
        s.add(t, {"v": v})
    assert s.to_json() == {"t": [0.6], "v": [3.0]}
    for i in range(1, 40):
        s.add(0.6 + i * 1.0, {"v": i})
    out = s.to_json()
    assert len(out["t"]) <= 10 and out["t"][-1] == 39.6 and out["v"][-1] == 39.0  # the newest is kept
    assert out["t"] == sorted(out["t"]) and s.resolution > 1.0


def test_thin_keeps_first_last_and_at_most_n() -> None:
    rows = list(range(1000))
    got = thin(rows, 50)
    assert len(got) == 50 and got[0] == 0 and got[-1] == 999 and got == sorted(set(got))
    assert thin(rows[:7], 50) == rows[:7]


def test_csv_tail_parses_only_complete_lines(tmp_path: Path) -> None:
    t = CsvTail()
    assert t.feed(b"time,mean,protocol\n1.5,20") == []
    assert t.feed(b".5,classic\n2.0,") == [{"time": 1.5, "mean": 20.5, "protocol": "classic"}]
    (row,) = t.feed(b"nan,plain\n")
    assert row["time"] == 2.0 and math.isnan(row["mean"]) and row["protocol"] == "plain"
    path = tmp_path / "eval.csv"
    f = CsvFollower(path)
    assert f.poll() == []  # no file yet
    path.write_text("time,mean\n1.0,5\n2.0,")
    assert f.poll() == [{"time": 1.0, "mean": 5.0}]
    with open(path, "a") as fh:
        fh.write("6\n")
    assert f.poll() == [{"time": 2.0, "mean": 6.0}]
    path.write_text("time,mean\n9.0,1\n")  # replaced by a shorter file: read from the start
    assert f.poll() == [{"time": 9.0, "mean": 1.0}]


def test_learning_curve_files(tmp_path: Path) -> None:
    rows = [{"time": 100.0 + 60 * i, "learner_steps": 50.0 * i, "mean": 10.0 * i, "min": 5.0 * i,
             "max": 12.0 * i, "protocol": "plain"} for i in range(5)]
    png = write_learning_curves(tmp_path, rows, "CartPole-v1")
    page = (tmp_path / "learning_curve.html").read_text()
    # Self-contained: no file or address outside the page (users copy run directories off clusters).
    assert not re.search(r"<script[^>]*\bsrc=|<link[^>]*\bhref=|@import", page)
    assert (STATIC_DIR / "uPlot.iife.min.js").read_text()[:200].replace("</", "<\\/") in page
    data = json.loads(re.search(r"id='curve-data'>(.*?)</script>", page).group(1))
    assert data["mean"] == [0.0, 10.0, 20.0, 30.0, 40.0] and data["learner_steps"] == [0.0, 50.0, 100.0, 150.0, 200.0]
    assert data["since_first"] == [0.0, 1.0, 2.0, 3.0, 4.0] and data["time_unit"] == "minutes"
    assert "40.0 after 200 learner steps, 5 evaluations" in page
    if png:
        assert (tmp_path / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert curve_points([])["mean"] == [] and "no evaluation yet" in learning_curve_html([], "x")


def test_learning_curve_files_draw_a_bounded_number_of_points(tmp_path: Path) -> None:
    """A long run's curve: at most CURVE_MAX_POINTS points (its memory does not grow with the run), the
    first and the latest among them, and the page still counts every evaluation."""
    n = 3 * CURVE_MAX_POINTS + 7
    rows = [{"time": 100.0 + 20 * i, "learner_steps": 10.0 * i, "mean": float(i), "min": 0.0,
             "max": 2.0 * i} for i in range(n)]
    write_learning_curves(tmp_path, rows, "CartPole-v1")
    page = (tmp_path / "learning_curve.html").read_text()
    data = json.loads(re.search(r"id='curve-data'>(.*?)</script>", page).group(1))
    assert len(data["mean"]) == CURVE_MAX_POINTS
    assert data["mean"][0] == 0.0 and data["mean"][-1] == float(n - 1)
    assert data["mean"] == sorted(data["mean"])  # spread in order over the run
    assert f"{n - 1}.0 after {10 * (n - 1)} learner steps, {n} evaluations" in page


def test_evaluator_flags() -> None:
    cfg = C.parse(C.EvaluatorConfig, ["--dashboard-port", "0", "--dashboard-host", "::1",
                                      "--heartbeat-timeout", "3", "--ladder-window", "5"], "evaluator")
    assert (cfg.dashboard_port, cfg.dashboard_host, cfg.heartbeat_timeout, cfg.ladder_window) == (0, "::1", 3.0, 5)
    default = C.parse(C.EvaluatorConfig, [], "evaluator")
    assert (default.dashboard_host, default.dashboard_port) == ("127.0.0.1", 8080)


# --------------------------------------------------------------------------- HTTP server


@contextmanager
def serving(state: Callable[[], dict], host: str = "127.0.0.1", port: int = 0,
            insecure: bool = False) -> Iterator[Dashboard]:
    """A dashboard server on an event loop in a thread (the evaluator runs it on its own loop)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    dash = asyncio.run_coroutine_threadsafe(Dashboard(state, host, insecure).start(port), loop).result(10)
    try:
        yield dash
    finally:
        asyncio.run_coroutine_threadsafe(dash.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the reply to the end; status, lower-cased headers, body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        chunks = []
        while chunk := s.recv(1 << 16):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    assert int(headers["content-length"]) == len(body)
    return int(lines[0].split()[1]), headers, body


def get(port: int, path: str, *extra: str, host: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", *extra]
    return request(port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


def test_http_routes_static_caching_and_state() -> None:
    fake = {"now": 1.0, "latest": {"replay/size": 42}}
    with serving(lambda: fake) as dash:
        assert dash.url == f"http://127.0.0.1:{dash.port}/"
        status, h, page = get(dash.port, "/")
        assert status == 200 and h["content-type"].startswith("text/html") and h["cache-control"] == "no-cache"
        assert "script-src 'self'" in h["content-security-policy"]  # no inline script, no other origin
        # The page asks for its static files by name, with a version so a new package is never stale.
        refs = re.findall(r'(?:src|href)="static/([^"?]+)\?v=([0-9a-f]+)"', page.decode())
        assert {name for name, _ in refs} == {"uPlot.min.css", "dashboard.css", "uPlot.iife.min.js", "dashboard.js"}
        assert not re.search(r"https?://", page.decode())  # no CDN
        status, h, js = get(dash.port, "/static/uPlot.iife.min.js?v=" + refs[0][1])
        assert status == 200 and js == (STATIC_DIR / "uPlot.iife.min.js").read_bytes()
        assert h["content-type"].startswith("text/javascript") and "max-age=86400" in h["cache-control"]
        status, h304, body = get(dash.port, "/static/uPlot.iife.min.js", f"If-None-Match: {h['etag']}")
        assert status == 304 and body == b"" and h304["etag"] == h["etag"]
        status, h, body = get(dash.port, "/api/state")
        assert status == 200 and h["content-type"] == "application/json" and h["cache-control"] == "no-store"
        assert json.loads(body) == fake
        fake["latest"]["replay/size"] = 43  # computed per request, never cached
        assert json.loads(get(dash.port, "/api/state")[2])["latest"]["replay/size"] == 43


@pytest.mark.parametrize("path", ["/static/../monitor.py", "/static/..%2fserver.py", "/static/%2e%2e/server.py",
                                  "/static/%2e%2e%2f%2e%2e%2fconfig.py", "/static//etc/passwd", "/../../etc/passwd",
                                  "/static/", "/static/.", "/static/..\\server.py", "/server.py", "/api/state/x"])
def test_http_refuses_paths_outside_static(path: str) -> None:
    with serving(lambda: {}) as dash:
        status, _, body = get(dash.port, path)
    assert status == 404 and b"import" not in body


def test_http_methods_hosts_and_malformed_requests() -> None:
    with serving(lambda: {}) as dash:
        for method in ("POST", "PUT", "DELETE", "HEAD", "OPTIONS"):
            status, h, _ = request(dash.port, f"{method} / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            assert status == 405 and h["allow"] == "GET", method
        # A loopback dashboard answers loopback names only (DNS rebinding would expose it to any site).
        assert get(dash.port, "/api/state", host="attacker.example")[0] == 403
        assert get(dash.port, "/api/state", host="localhost")[0] == 200
        assert request(dash.port, b"garbage\r\n\r\n")[0] == 400
        try:  # the server stops reading at 8 KB and closes: the client may see a reset instead of the 431
            assert request(dash.port, b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n")[0] == 431
        except ConnectionResetError:
            pass
        assert get(dash.port, "/")[0] == 200  # still serving
    with serving(lambda: {"x": math.nan}) as dash:  # a state that is not JSON is a 500, not a crash
        assert get(dash.port, "/api/state")[0] == 500
        assert get(dash.port, "/")[0] == 200


def test_non_loopback_dashboard_needs_insecure() -> None:
    for host in ("0.0.0.0", "10.1.2.3", ""):
        with pytest.raises(SystemExit, match="--insecure") as e:
            Dashboard(lambda: {}, host, insecure=False)
        assert "no authentication" in str(e.value)
    Dashboard(lambda: {}, "0.0.0.0", insecure=True)  # allowed when asked for (not bound here)
    for host in ("127.0.0.1", "localhost", "::1"):
        Dashboard(lambda: {}, host, insecure=False)


def test_taken_port_falls_back_to_a_free_one() -> None:
    with serving(lambda: {}) as first:
        with serving(lambda: {}, port=first.port) as second:
            assert second.fell_back and second.port != first.port
            assert get(second.port, "/api/state")[0] == 200
        assert not first.fell_back


def test_route_is_pure() -> None:
    static = load_static()
    r = route("GET", "/static/uPlot.LICENSE", {}, static, dict)
    assert r.status == 200 and b"MIT" in r.body  # the vendored library's licence ships beside it


# --------------------------------------------------------------------------- in a real browser

SLOTS = 8                    # CartPole preset: 1 actor x 8 envs
HEARTBEAT_TIMEOUT = 6.0      # longer than a freeze below, short enough to wait for in a test
FIGURES = ["eval-latest", "eval-steps", "eval-count", "learner-steps", "learner-steps-per-s", "learner-loss",
           "replay-size", "replay-inserted-per-s", "replay-sampled-per-s", "replay-updated-per-s",
           "actor-steps-per-s", "ladder-slots", "actor-acting", "actor-agreement", "replay-spi", "replay-spi-target", "actor-exploration"]
READ_DOM = """() => {
  const text = id => document.getElementById(id).textContent;
  const rows = sel => [...document.querySelectorAll(sel)].map(tr =>
      Object.fromEntries([...tr.children].map(td => [td.className, td.textContent])));
  const charts = window.apexDashboard.charts;
  return {
    figures: Object.fromEntries(%s.map(id => [id, text(id)])),
    ladder: rows("#ladder-table tbody tr"),
    heartbeats: rows("#heartbeat-table tbody tr").map((r, i) => Object.assign(r,
        {id: document.querySelectorAll("#heartbeat-table tbody tr")[i].id})),
    status: text("status"),
    rendered_now: window.apexDashboard.state ? window.apexDashboard.state.now : null,
    chart_points: Object.fromEntries(Object.entries(charts).map(([k, u]) => [k, u.data[0].length])),
    ladder_x: charts["chart-ladder"].data[0],
  };
}""" % json.dumps(FIGURES)


def num(text: str) -> float:
    """A figure as the page shows it ("12,345", "0.0412", "81.2") as a number."""
    return float(text.replace(",", ""))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def wait_for(what: str, fn: Callable[[], Any], timeout: float, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium, installed here if missing and possible; the browser tests skip otherwise."""
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                                      "(requirements-dev.txt)")
    if not os.access(CHROMIUM, os.X_OK) and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, timeout=900,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing and could not be installed (needs root and apt-get: "
                    "`apt-get install chromium`, which ./test.sh does): dashboard browser tests skipped")
    return CHROMIUM


class LiveRun:
    """The four role programs of a short CartPole run, and where to find them."""

    def __init__(self, tmp: Path, port_base: int) -> None:
        self.dir = tmp / "run"
        self.logs = tmp / "logs"
        self.logs.mkdir()
        common = ["--env", "CartPole-v1", "--run-dir", str(self.dir), "--num-actors", "1",
                  *endpoint_flags(port_base)]
        self.procs = {
            "evaluator": start_role("evaluator", [*common, "--dashboard-port", "0", "--heartbeat-timeout",
                                                  str(HEARTBEAT_TIMEOUT), "--eval-episodes", "4",
                                                  # spaced evaluations: one rarely lands while paused
                                                  "--eval-period", "3"],
                                    self.logs / "evaluator.log"),
            "replay_server": start_role("replay_server", common, self.logs / "replay_server.log"),
            "learner": start_role("learner", common, self.logs / "learner.log"),
            "actor": start_role("actor", [*common, "--actor-index", "0"], self.logs / "actor.log"),
        }
        self.url = ""

    def check_alive(self, *except_: str) -> None:
        for name, p in self.procs.items():
            if name not in except_ and p.poll() is not None:
                raise AssertionError(f"{name} exited ({p.returncode}): "
                                     f"{(self.logs / f'{name}.log').read_text()[-3000:]}")

    def state(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "api/state", timeout=10) as r:
            return json.loads(r.read())

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Pause the roles that report (SIGSTOP), so the page and the state stay put while both are read."""
        paused = [self.procs[n] for n in ("actor", "replay_server", "learner")]
        for p in paused:
            os.kill(p.pid, signal.SIGSTOP)
        try:
            time.sleep(0.3)  # reports already on the wire are taken
            yield
        finally:
            for p in paused:
                os.kill(p.pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def live_run(tmp_path_factory: pytest.TempPathFactory, chromium: str) -> Iterator[LiveRun]:
    from conftest import free_port_base
    run = LiveRun(tmp_path_factory.mktemp("dashboard"), free_port_base())
    try:
        url_file = run.dir / "dashboard.url"

        def url() -> str:
            run.check_alive()
            return url_file.read_text().strip() if url_file.exists() else ""

        run.url = wait_for("the evaluator's dashboard.url", url, 120)
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", run.url), run.url
        yield run
    finally:
        stop_all(list(run.procs.values()))


@pytest.fixture(scope="module")
def console_errors() -> list[str]:
    return []


@pytest.fixture(scope="module")
def page(live_run: LiveRun, chromium: str, console_errors: list[str]) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 1400})
        pg.on("console", lambda m: m.type == "error" and console_errors.append(m.text))
        pg.on("pageerror", lambda e: console_errors.append(str(e)))
        pg.goto(live_run.url)
        yield pg
        browser.close()


def dom(page: Any) -> dict[str, Any]:
    return page.evaluate(READ_DOM)


@pytest.fixture(scope="module")
def snapshot(live_run: LiveRun, page: Any) -> dict[str, Any]:
    """Page, state and the roles' own records, read while the reporting roles are paused."""

    def ready() -> bool:
        live_run.check_alive()
        d = dom(page)
        f = d["figures"]
        return (f["eval-count"] not in ("0", "") and f["learner-steps"] not in ("-", "0")
                and len(d["ladder"]) == SLOTS and all(r["episodes"] != "0" for r in d["ladder"])
                and {"actor-0", "learner", "replay"} <= {r["sender"] for r in d["heartbeats"]})

    wait_for("an evaluation, learner steps, an episode on every slot and all heartbeats on the page", ready, 150)
    for _ in range(10):
        with live_run.frozen():
            before = live_run.state()
            # The page has polled since: what it shows was fetched after `before`.
            wait_for("the page's next poll", lambda: (dom(page)["rendered_now"] or 0) > before["now"], 10, 0.1)
            shown = dom(page)
            files = {name: read_csv(live_run.dir / f"{name}.csv") for name in ("metrics", "actor_episodes", "eval")}
            after = live_run.state()
        # Nothing reports while paused, but an evaluation may land: then both reads differ; go again.
        keys = ("latest", "ladder", "eval")
        if all(before[k] == after[k] for k in keys):
            return {"dom": shown, "state": after, "files": files}
        time.sleep(1.0)
    raise AssertionError("the state kept changing while the roles were paused")


def test_page_figures_match_the_state_and_what_the_roles_reported(snapshot: dict[str, Any]) -> None:
    f, s = snapshot["dom"]["figures"], snapshot["state"]
    latest = s["latest"]
    reported: dict[str, set[float]] = {}
    for r in snapshot["files"]["metrics"]:
        reported.setdefault(r["tag"], set()).add(float(r["value"]))
    # Counts are shown exactly; each is a value its role reported (logged to metrics.csv on arrival).
    for fig, tag in (("replay-size", "replay/size"), ("learner-steps", "learner/steps")):
        assert num(f[fig]) == latest[tag], (fig, f[fig], latest[tag])
        assert latest[tag] in reported[tag], (tag, latest[tag])
    # Rates are rounded for display (one decimal, whole numbers from 100 up).
    for fig, tag in (("learner-steps-per-s", "learner/steps_per_s"), ("replay-inserted-per-s", "replay/inserted_per_s"),
                     ("replay-sampled-per-s", "replay/sampled_per_s"), ("replay-updated-per-s", "replay/updated_per_s"),
                     ("actor-steps-per-s", "actor/steps_per_s")):
        assert num(f[fig]) == pytest.approx(latest[tag], abs=0.5001 if latest[tag] >= 100 else 0.0501), (fig, f[fig])
        assert latest[tag] in reported[tag], (tag, latest[tag])
    # Replay ratio: achieved samples per insert, and that nothing holds it in this run.
    assert num(f["replay-spi"]) == pytest.approx(latest["replay/samples_per_insert"], abs=0.00501)
    assert latest["replay/samples_per_insert"] in reported["replay/samples_per_insert"]
    assert f["replay-spi-target"] == "(not limited)" and latest["replay/samples_per_insert_target"] == 0
    # The acting copy of the least agreeing actor (CartPole's MLP: float32, or bf16 where native).
    assert f["actor-acting"] == {32.0: "float32", 16.0: "bfloat16"}[latest["actor/acting_bits"]]
    assert f["actor-agreement"] == f"{100 * latest['actor/acting_agreement']:.0f}%"
    assert f["actor-exploration"] == "epsilon ladder" and latest["actor/exploration"] == 0  # dqn's
    assert latest["actor/acting_agreement"] in reported["actor/acting_agreement"]
    assert num(f["learner-loss"]) == pytest.approx(latest["learner/loss"], rel=5e-3)  # 3 significant digits
    assert latest["learner/loss"] in reported["learner/loss"]
    # The latest evaluation is the eval.csv row the evaluator wrote last (rows are followed in order).
    evals = snapshot["files"]["eval"]
    count = s["eval"]["count"]
    assert num(f["eval-count"]) == count and 1 <= count <= len(evals)
    row = evals[count - 1]
    assert s["eval"]["latest"]["mean"] == float(row["mean"])
    assert num(f["eval-latest"]) == pytest.approx(float(row["mean"]), abs=0.0501)  # one decimal, half up
    assert num(f["eval-steps"]) == float(row["learner_steps"])
    assert [p["mean"] for p in s["eval"]["points"]] == [float(r["mean"]) for r in evals[:count]]
    assert snapshot["dom"]["chart_points"]["chart-eval"] == count
    assert snapshot["dom"]["status"] == "live"


def test_ladder_has_one_point_per_slot_with_the_ladder_epsilons(snapshot: dict[str, Any]) -> None:
    d, s = snapshot["dom"], snapshot["state"]
    expected = actor_epsilons(0, SLOTS, 1)  # what the actor explores with
    assert [p["slot"] for p in s["ladder"]] == list(range(SLOTS)) and d["figures"]["ladder-slots"] == str(SLOTS)
    by_slot: dict[int, list[float]] = {}
    for r in snapshot["files"]["actor_episodes"]:
        by_slot.setdefault(int(r["slot"]), []).append(float(r["return"]))
    window = s["ladder_window"]
    for i, (point, row) in enumerate(zip(s["ladder"], d["ladder"])):
        assert point["epsilon"] == pytest.approx(expected[i], rel=1e-12)
        assert point["epsilon"] == pytest.approx(epsilon_ladder(i, SLOTS), rel=1e-12)
        assert num(row["epsilon"]) == pytest.approx(epsilon_ladder(i, SLOTS), rel=5e-3)  # shown to 3 digits
        # The recent mean is over the slot's last `window` episodes, as the actor reported them.
        assert point["episodes"] == len(by_slot[i]) == int(row["episodes"])
        recent = by_slot[i][-window:]
        assert point["recent_mean_return"] == pytest.approx(sum(recent) / len(recent), rel=1e-5)
        assert num(row["return"]) == pytest.approx(point["recent_mean_return"], abs=0.0501)
    # The chart plots all of them, by epsilon.
    assert d["ladder_x"] == sorted(p["epsilon"] for p in s["ladder"])


def test_each_roles_heartbeat_is_shown(snapshot: dict[str, Any]) -> None:
    rows = {r["sender"]: r for r in snapshot["dom"]["heartbeats"]}
    state = {h["sender"]: h for h in snapshot["state"]["heartbeats"]}
    assert set(rows) == set(state) == {"actor-0", "learner", "replay"}
    for sender, r in rows.items():
        assert r["id"] == f"heartbeat-{sender}" and r["status"] == "up" and state[sender]["up"]
        assert r["role"] == state[sender]["role"]
        assert float(r["age"].split()[0]) < HEARTBEAT_TIMEOUT


def test_figures_update_without_reloading(live_run: LiveRun, page: Any, snapshot: dict[str, Any]) -> None:
    first = snapshot["dom"]
    steps, evals = num(first["figures"]["learner-steps"]), num(first["figures"]["eval-count"])
    page.evaluate("() => { window.notReloaded = true; }")  # gone if the page reloaded

    def moved() -> dict[str, Any] | None:
        live_run.check_alive()
        d = dom(page)
        f = d["figures"]
        return d if num(f["learner-steps"]) > steps and num(f["eval-count"]) > evals else None

    later = wait_for("more learner steps and a new evaluation on the page", moved, 60)
    assert page.evaluate("() => window.notReloaded") is True
    assert later["chart_points"]["chart-learner"] > first["chart_points"]["chart-learner"] >= 1
    assert later["chart_points"]["chart-replay"] >= 1 and later["chart_points"]["chart-actor"] >= 1


def test_learning_curve_files_open_offline(live_run: LiveRun, page: Any, snapshot: dict[str, Any]) -> None:
    html_file, png_file = live_run.dir / "learning_curve.html", live_run.dir / "learning_curve.png"
    wait_for("learning_curve.html and .png", lambda: html_file.exists() and png_file.exists(), 30)
    assert png_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    requests: list[str] = []
    offline = page.context.browser.new_page()  # its own context: the route below stays there
    offline.route("**/*", lambda r: (requests.append(r.request.url), r.abort()) if not r.request.url.startswith("file:")
                  else r.continue_())
    offline.goto(html_file.as_uri())
    means = offline.evaluate("() => window.curveCharts.map(u => u.data[1])")
    offline.close()
    assert requests == []  # everything it needs is inside the file
    logged = {float(r["mean"]) for r in read_csv(live_run.dir / "eval.csv")}
    assert len(means) == 2 and means[0] and set(means[0]) <= logged and sorted(means[0]) == sorted(means[1])


def test_killed_actor_is_shown_down_after_the_timeout(live_run: LiveRun, page: Any, snapshot: dict[str, Any],
                                                      console_errors: list[str]) -> None:
    actor = live_run.procs["actor"]
    actor.kill()
    actor.wait()
    killed = time.monotonic()

    def down() -> dict[str, Any] | None:
        live_run.check_alive("actor")
        d = dom(page)
        rows = {r["sender"]: r for r in d["heartbeats"]}
        return d if rows["actor-0"]["status"] == "down" else None

    d = wait_for("actor-0 shown down", down, HEARTBEAT_TIMEOUT + 15)
    assert time.monotonic() - killed >= HEARTBEAT_TIMEOUT - 1.5  # not before its silence exceeded the timeout
    rows = {r["sender"]: r for r in d["heartbeats"]}
    assert rows["learner"]["status"] == "up" and rows["replay"]["status"] == "up"
    # The page shows the age to 0.1 s: 6.04 s of silence (down) reads "6.0 s"; the state below is exact.
    assert float(rows["actor-0"]["age"].split()[0]) >= HEARTBEAT_TIMEOUT
    assert d["figures"]["actor-steps-per-s"] == "0.0"  # a dead actor's rate no longer counts
    state = {h["sender"]: h for h in live_run.state()["heartbeats"]}
    assert not state["actor-0"]["up"] and state["actor-0"]["age_s"] > HEARTBEAT_TIMEOUT
    assert console_errors == []  # no script error or refused resource (CSP) all along


# --------------------------------------------------------------------------- the asynchronous family

ASYNC_FIGURES = ["learner-updates-per-s", "learner-staleness", "learner-staleness-max", "learner-stale-dropped",
                 "learner-entropy", "actor-epsilon-mean", "actor-exploration", "algo"]


@pytest.mark.parametrize("algo", ["a3c", "nstep_q"])
def test_async_run_shows_gradients_instead_of_replay(tmp_path: Path, page: Any, algo: str) -> None:
    """An asynchronous run (evaluator, learner, one actor-learner; no replay server) in the browser: the
    Gradients card shows the learner's updates/s, staleness and dropped count, A3C's policy entropy or the
    actor-learners' mean epsilon, as /api/state has them; the Replay card and chart are hidden."""
    from conftest import free_port_base
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    common = ["--env", "CartPole-v1", "--algo", algo, "--run-dir", str(run_dir), "--num-actors", "1",
              *endpoint_flags(free_port_base())]
    procs = [start_role("evaluator", [*common, "--dashboard-port", "0", "--eval-period", "5"], logs / "evaluator.log"),
             start_role("learner", common, logs / "learner.log"),
             start_role("actor", [*common, "--actor-index", "0"], logs / "actor.log")]
    read = """() => Object.fromEntries(%s.map(id => [id, document.getElementById(id).textContent]))""" % json.dumps(
        ASYNC_FIGURES)
    hidden = """() => Object.fromEntries(["card-gradients", "card-replay", "chart-box-gradients", "chart-box-replay"]
        .map(id => [id, document.getElementById(id).hidden]))"""
    try:
        url_file = run_dir / "dashboard.url"
        url = wait_for("dashboard.url", lambda: url_file.exists() and url_file.read_text().strip(), 120)
        # A page of its own in the module's browser (one Playwright per module: a second one cannot start).
        pg = page.context.browser.new_page(viewport={"width": 1280, "height": 1400})
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(url)
        key = "learner/entropy" if algo == "a3c" else "actor/epsilon_mean"
        wait_for("gradients on the page", lambda: pg.evaluate(read)["learner-updates-per-s"] not in ("-", "0.0")
                 and pg.evaluate(read)["learner-staleness"] != "-", 120)
        for p in procs[1:]:
            os.kill(p.pid, signal.SIGSTOP)  # nothing reports while page and state are read
        try:
            time.sleep(0.3)
            with urllib.request.urlopen(url + "api/state", timeout=10) as r:
                state = json.loads(r.read())
            wait_for("the page's next poll", lambda: pg.evaluate(
                "() => window.apexDashboard.state && window.apexDashboard.state.now") > state["now"], 10, 0.1)
            shown, flags = pg.evaluate(read), pg.evaluate(hidden)
        finally:
            for p in procs[1:]:
                os.kill(p.pid, signal.SIGCONT)
        pg.close()
        latest = state["latest"]
        assert flags == {"card-gradients": False, "card-replay": True, "chart-box-gradients": False,
                         "chart-box-replay": True}
        assert shown["algo"] == algo
        rate = latest["learner/updates_per_s"]
        assert num(shown["learner-updates-per-s"]) == pytest.approx(rate, abs=0.5001 if rate >= 100 else 0.0501)
        assert num(shown["learner-staleness"]) == pytest.approx(latest["learner/staleness"], rel=5e-3, abs=1e-9)
        assert num(shown["learner-staleness-max"]) == latest["learner/staleness_max"]
        assert num(shown["learner-stale-dropped"]) == latest["learner/stale_dropped"]
        assert key in latest and num(shown[key.replace("/", "-").replace("_", "-")]) == pytest.approx(
            latest[key], rel=5e-3)
        assert shown["actor-exploration"] == ("sampled from the policy (epsilon 0)" if algo == "a3c"
                                              else "epsilon annealed from 1 to 0.1 / 0.01 / 0.5")
        assert errors == []
    finally:
        stop_all(procs)
    for p in procs:
        assert p.returncode == 0
