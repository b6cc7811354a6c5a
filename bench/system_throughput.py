"""Each role's rate inside the launcher's whole system against the same role alone with the same budget.

System: ``python -m apex_zmq.launch`` (what ``./run.sh`` runs) on ``--env`` (ALE/Pong-v5) with the
launcher's own per-role budgets (``apex_zmq.launch.plan_budgets``: torch threads, OpenMP/MKL/OpenBLAS
floors) and its default number of actors for this machine (or ``--num-actors``), a small
``--min-size`` so learning starts soon. Once the learner has taken ``--warmup-steps`` steps, a window
of ``--seconds`` is measured: each role's rate from ``<run_dir>/metrics.csv`` (the counters' increase
over the window; the medians of the per-second rates are printed beside them), and each process's
CPU from ``/proc`` (pids from ``roles.json``) against its budget's cores and busy threads.

Evaluations are kept out of the window: the evaluator evaluates the first weights it receives at
once (at start-up, long before learning starts), so that one evaluation is made short
(``--eval-episodes 1 --eval-max-frames 2000``) and ``--eval-period 1e9`` allows no other; the window
starts only after its row is in ``eval.csv``. In the window the evaluator only gathers telemetry.

Alone, each with the system's own saved ``config.json`` (so the same K, env groups, env threads,
acting copy, batch size, capacity, ...) and the budget the launcher gave that role (its
``--torch-threads`` and the same OpenMP/MKL/OpenBLAS floor in the process environment):

- actor: the real actor program; its transitions are counted at a PULL socket held here, while a
  publisher here sends new weights every ``weights_period`` as the learner does;
- learner: ``LearnerCore``'s training step (same network, optimizer, device, batch size) in a process
  of its own on pre-made batches of real frames (decompressed once), no I/O;
- replay server: the real program fed at full speed by one pusher process (real Atari chunks, encoded
  once and resent) while a consumer process takes batches as fast as it can (strict decode) and sends
  a priority update for each (with the batch's incarnation, as the learner does).

Alone runs may use every core of the machine (nothing pins them): the CPU each used is printed too.

    .venv/bin/python bench/system_throughput.py [--env ALE/Pong-v5] [--num-actors N] [--min-size 5000]
        [--seconds 60] [--alone-seconds 20]

Last line: ``system_actor_ratio=<x> system_learner_ratio=<y> system_replay_insert_ratio=<z>
system_replay_batch_ratio=<w>`` (rate in the system / rate alone; the actor's per actor process).
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, endpoints, free_port_base, live_endpoints, print_machine, publish_weights, real_chunks  # noqa: E402
from procstat import TICK, thread_ticks  # noqa: E402  (tests/ is on the path through _common)

BUSY = 0.1  # a thread using more than a tenth of a core counts as busy (as tests/test_budget_live.py)
FLOOR_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


# --------------------------------------------------------------------------- CPU from /proc

def proc_ticks(pid: int) -> int:
    """user + system clock ticks of the whole process (threads that ended included)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


class CpuWindow:
    """CPU of named processes between ``start()`` and ``stop()``: cores and per-thread use."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.p0 = {n: proc_ticks(p) for n, p in self.pids.items()}
        self.th0 = {n: thread_ticks(p) for n, p in self.pids.items()}

    def stop(self) -> dict[str, dict]:
        wall = time.monotonic() - self.t0
        out = {}
        for n, pid in self.pids.items():
            try:
                cores = (proc_ticks(pid) - self.p0[n]) / TICK / wall
                after = thread_ticks(pid)
            except OSError:  # the process ended in the window
                out[n] = {"cores": float("nan"), "threads": []}
                continue
            rows = [(name, (t - self.th0[n].get(tid, (name, 0))[1]) / TICK / wall)
                    for tid, (name, t) in after.items()]
            out[n] = {"cores": cores, "threads": sorted(rows, key=lambda r: -r[1])}
        return out


def busy_threads(usage: dict) -> list[tuple[str, float]]:
    return [(n, round(c, 2)) for n, c in usage["threads"] if c > BUSY]


def floor_env(threads: int) -> dict[str, str]:
    """The process environment the launcher gives a role of ``threads`` torch threads."""
    return {**os.environ, **{v: str(threads) for v in FLOOR_VARS}}


# --------------------------------------------------------------------------- the whole system

def read_metrics(path: Path) -> list[tuple[float, str, float]]:
    """(time, tag, value) rows of metrics.csv (a half-written last line is skipped)."""
    if not path.exists():
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            try:
                rows.append((float(r["time"]), r["tag"], float(r["value"])))
            except (TypeError, ValueError, KeyError):
                continue
    return rows


def first_time(rows, tag: str, at_least: float) -> float | None:
    return next((t for t, g, v in rows if g == tag and v >= at_least), None)


def counter_rate(rows, tag: str) -> float:
    """Increase of a cumulative counter per second between its first and last report in ``rows``."""
    pts = [(t, v) for t, g, v in rows if g == tag]
    if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
        return float("nan")
    return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])


def step_rate(rows, tag: str) -> float:
    """Per second of a slow counter (the learner's steps) between the first and the last time it
    changed in ``rows``: not quantized by the report period. Falls back to ``counter_rate``."""
    pts = [(t, v) for t, g, v in rows if g == tag]
    changes = [pts[i] for i in range(1, len(pts)) if pts[i][1] != pts[i - 1][1]]
    if len(changes) < 3:
        return counter_rate(rows, tag)
    return (changes[-1][1] - changes[0][1]) / (changes[-1][0] - changes[0][0])


def median_of(rows, tag: str) -> float:
    vals = [v for _, g, v in rows if g == tag]
    return statistics.median(vals) if vals else float("nan")


def eval_rows(run_dir: Path) -> int:
    path = run_dir / "eval.csv"
    if not path.exists():
        return 0
    with open(path, newline="") as f:
        return max(0, sum(1 for _ in f) - 1)


def run_system(args, tmp: Path) -> dict:
    """Launch the whole system, wait for learning, measure a window; returns rates, CPU and config."""
    from apex_zmq import config as C
    from apex_zmq.launch import plan_budgets

    run_dir = tmp / "system"
    limit = args.startup_timeout + args.seconds + 120  # the launcher's own safety stop
    argv = [sys.executable, "-m", "apex_zmq.launch", "--env", args.env, "--run-dir", str(run_dir),
            "--port-base", str(free_port_base()), "--dashboard-port", "0", "--min-size", str(args.min_size),
            "--eval-period", "1e9", "--eval-episodes", "1", "--eval-max-frames", str(args.eval_max_frames),
            "--telemetry-period", "1", "--max-seconds", str(limit)]
    if args.num_actors:
        argv += ["--num-actors", str(args.num_actors)]
    log_path = tmp / "launcher.log"
    print("system: " + " ".join(["python", *argv[1:]]), flush=True)
    launched = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + args.startup_timeout
            while True:
                rows = read_metrics(run_dir / "metrics.csv")
                steps = max([v for _, g, v in rows if g == "learner/steps"], default=0.0)
                if steps >= args.warmup_steps and eval_rows(run_dir) >= 1:
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the system did not start learning in {args.startup_timeout:.0f}s "
                                       f"(learner steps {steps:.0f}, eval rows {eval_rows(run_dir)}); "
                                       f"launcher log:\n{log_path.read_text()[-3000:]}")
                time.sleep(1.0)
            ready = time.time()
            roles = json.loads((run_dir / "roles.json").read_text())
            pids = {name: info["pid"] for name, info in roles.items()}
            if not all(pids.values()):
                raise RuntimeError(f"a role is not running: {roles}")
            pids["launcher"] = proc.pid
            cpu = CpuWindow(pids)
            cpu.start()
            t0 = time.time()
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                if proc.poll() is not None:
                    raise RuntimeError(f"the launcher stopped in the window:\n{log_path.read_text()[-3000:]}")
                time.sleep(min(1.0, max(0.0, end - time.monotonic())))
            usage = cpu.stop()
            t1 = time.time()
            roles_after = json.loads((run_dir / "roles.json").read_text())
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # the launcher stops every role cleanly
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    restarts = {n: (roles_after[n]["restarts"], roles_after[n]["pid"] != pids[n]) for n in roles_after
                if roles_after[n]["restarts"] or roles_after[n]["pid"] != pids[n]}
    all_rows = read_metrics(run_dir / "metrics.csv")
    win = [r for r in all_rows if t0 <= r[0] <= t1]
    cfg = C.role_config(C.LaunchConfig, json.loads((run_dir / "config.json").read_text()))
    cores = os.cpu_count() or 1
    on_gpu = cfg.device != "cpu" and _cuda()
    budgets = plan_budgets(cfg, cores, on_gpu)
    bs = cfg.batch_size
    res = {
        "cfg": cfg, "config_path": run_dir / "config.json", "budgets": budgets, "usage": usage,
        "restarts": restarts, "window_s": t1 - t0,
        "fill_s": (first_time(all_rows, "replay/size", cfg.min_size) or float("nan")) - launched,
        "first_step_s": (first_time(all_rows, "learner/steps", 1) or float("nan")) - launched,
        "ready_s": ready - launched,
        # per second, from the counters' increase over the window
        "actor": counter_rate(win, "replay/inserted") / cfg.num_actors,  # transitions the actors delivered
        "learner": step_rate(win, "learner/steps"),
        "insert": counter_rate(win, "replay/inserted"),
        "batch": counter_rate(win, "replay/sampled") / bs,
        # medians of the per-second reports
        "med_actor": median_of(win, "actor/steps_per_s") / cfg.num_actors,
        "med_learner": median_of(win, "learner/steps_per_s"),
        "med_insert": median_of(win, "replay/inserted_per_s"),
        "med_batch": median_of(win, "replay/sampled_per_s") / bs,
        "med_updated": median_of(win, "replay/updated_per_s"),
        "wait": median_of(win, "perf/learner_wait_fraction"),
        "replay_size": (median_of(win, "replay/size")),
        "learner_steps": (min([v for _, g, v in win if g == "learner/steps"], default=float("nan")),
                          max([v for _, g, v in win if g == "learner/steps"], default=float("nan"))),
        "evals_in_window": sum(1 for _, g, _ in win if g == "eval/return_mean"),
    }
    return res


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


# --------------------------------------------------------------------------- actor alone

def actor_alone(config_path: Path, cfg, threads: int, seconds: float, warmup: float, tmp: Path) -> tuple[float, dict, int]:
    """Transitions/s of the real actor program alone (counted at a PULL socket), its CPU over the
    counting window, and the weights version it acted with at the end."""
    import zmq

    from apex_zmq.wire import decode_experience, decode_telemetry
    ep = endpoints(free_port_base())
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.bind(ep["experience"])
    tel = ctx.socket(zmq.SUB)
    tel.setsockopt(zmq.SUBSCRIBE, b"")
    tel.bind(ep["telemetry"])
    stop = threading.Event()
    pub = threading.Thread(target=publish_weights, args=(ep["weights"], cfg.env, cfg.hidden, cfg.weights_period, stop))
    pub.start()
    flags = [x for k, v in ep.items() for x in (f"--{k}", v)]
    proc = subprocess.Popen([sys.executable, "-m", "actor", "--config", str(config_path),
                             "--run-dir", str(tmp / "actor_alone"), *flags, "--actor-index", "0",
                             "--torch-threads", str(threads)],
                            cwd=ROOT, env=floor_env(threads), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    version = 0
    try:
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        poller.register(tel, zmq.POLLIN)
        start = t0 = t_end = None
        count = 0
        cpu = CpuWindow({"actor": proc.pid})
        deadline = time.monotonic() + 120 + seconds
        while time.monotonic() < deadline:
            ready = dict(poller.poll(1000))
            if not ready and proc.poll() is not None:
                raise RuntimeError(f"actor exited with code {proc.returncode}")
            if tel in ready:
                m = decode_telemetry(tel.recv_multipart()).metrics
                version = max(version, int(m.get("actor/weights_version", 0)))
            if pull not in ready:
                continue
            n = len(decode_experience(pull.recv_multipart(copy=False)).action)
            now = time.perf_counter()
            if start is None:
                start = now + warmup  # from the first chunk: count after the warm-up
            elif now >= start and t0 is None:
                t0, t_end = now, now + seconds  # count the chunks that arrive after this one
                cpu.start()
            elif t0 is not None:
                count += n
                if now >= t_end:
                    return count / (now - t0), cpu.stop()["actor"], version
        raise RuntimeError("the actor produced no experience in time")
    finally:
        proc.terminate()
        proc.wait(15)
        stop.set()
        pub.join()
        pull.close(linger=0)
        tel.close(linger=0)


# --------------------------------------------------------------------------- learner alone

def learner_alone_proc(config_path: str, run_dir: str, threads: int, batch_size: int, alpha: float, chunks: list,
                       seconds: float, out) -> None:
    """A process body: ``LearnerCore``'s training step on pre-made batches, as the trainer thread runs it."""
    import torch

    from apex_zmq import config as C
    from learner.dqn import batch_from_sample
    from learner.main import LearnerCore
    from replay_server.replay import PrioritizedReplay
    torch.set_num_threads(threads)
    cfg = C.parse(C.LearnerConfig, ["--config", config_path, "--run-dir", run_dir,
                                    "--torch-threads", str(threads)], "learner")
    core = LearnerCore(cfg)
    replay = PrioritizedReplay(1_000_000, alpha)
    for c in chunks:
        replay.add(c)
    batches = [batch_from_sample(replay.sample(batch_size, 0.4, seq=i), core.spec.num_actions,
                                 core.device, pin=core.device.type == "cuda", channels_last=core.channels_last,
                                 obs_spec=(core.spec.obs_shape, core.spec.obs_dtype)) for i in range(4)]
    learner = core.learner
    for i in range(2):  # warm-up
        learner.step(batches[i % len(batches)])
    if core.device.type == "cuda":
        torch.cuda.synchronize()
    cpu = CpuWindow({"learner": os.getpid()})
    cpu.start()
    n, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < seconds or n < 3:
        learner.step(batches[n % len(batches)])  # returns the priorities on the CPU: synchronous
        n += 1
    rate = n / (time.monotonic() - t0)
    out.put(("learner", rate, cpu.stop()["learner"], str(core.device)))


def learner_alone(config_path: Path, cfg, threads: int, chunks: list, seconds: float, tmp: Path) -> tuple[float, dict, str]:
    spawn = mp.get_context("spawn")
    out = spawn.Queue()
    saved = {v: os.environ.get(v) for v in FLOOR_VARS}
    os.environ.update({v: str(threads) for v in FLOOR_VARS})  # the child's environment, as the launcher's
    try:
        p = spawn.Process(target=learner_alone_proc,
                          args=(str(config_path), str(tmp / "learner_alone"), threads, cfg.batch_size, cfg.alpha,
                                chunks, seconds, out))
        p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        _, rate, usage, device = out.get(timeout=300 + seconds)
    finally:
        p.join(30)
        if p.is_alive():
            p.kill()
    return rate, usage, device


# --------------------------------------------------------------------------- replay server alone

def pusher(endpoint: str, chunks: list, start, stop, out) -> None:
    """A process body: push the chunks (encoded once) round and round as fast as the server takes them;
    counts what it sent between ``start`` and ``stop``."""
    import zmq

    from apex_zmq.wire import encode
    pool = [encode(c) for c in chunks]
    sizes = [len(c.action) for c in chunks]
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 8)  # the actor's experience socket's high-water mark
    push.connect(endpoint)
    sent, i, t0 = 0, 0, None
    while not stop.is_set():
        if t0 is None and start.is_set():
            sent, t0 = 0, time.monotonic()
        if push.poll(200, zmq.POLLOUT):
            push.send_multipart(pool[i % len(pool)], copy=False)
            sent += sizes[i % len(pool)]
            i += 1
    out.put(("pusher", sent / (time.monotonic() - t0) if t0 else 0.0))
    push.close(linger=0)


def consumer(samples: str, priorities: str, start, stop, out) -> None:
    """A process body: take batches as fast as they come (strict decode), send a priority update for each
    (with the batch's incarnation, as the learner does); counts batches between ``start`` and ``stop``."""
    import numpy as np
    import zmq

    from apex_zmq.wire import PriorityUpdate, decode_sample, encode
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 2)
    pull.connect(samples)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 64)
    push.connect(priorities)
    rng = np.random.default_rng(0)
    counted, t0 = 0, None
    while not stop.is_set():
        if not pull.poll(200):
            continue
        b = decode_sample(pull.recv_multipart(copy=False))
        push.send_multipart(encode(PriorityUpdate(sender="learner", seq=b.seq, ids=b.ids, incarnation=b.incarnation,
                                                  priority=rng.random(len(b.ids)).astype(np.float32))))
        if start.is_set():
            if t0 is None:
                t0 = time.monotonic()  # count the batches after this one
            else:
                counted += 1
    out.put(("consumer", counted / (time.monotonic() - t0) if t0 else 0.0))
    pull.close(linger=0)
    push.close(linger=0)


def replay_alone(config_path: Path, cfg, threads: int, chunks: list, seconds: float, tmp: Path) -> dict:
    """The real replay server with one full-speed pusher and one as-fast-as-it-can consumer."""
    from apex_zmq.wire import decode_telemetry
    ep, flags, tel = live_endpoints()
    spawn = mp.get_context("spawn")
    start, stop, out = spawn.Event(), spawn.Event(), spawn.Queue()
    server = subprocess.Popen([sys.executable, "-m", "replay_server", "--config", str(config_path),
                               "--run-dir", str(tmp / "replay_alone"), *flags, "--torch-threads", str(threads),
                               "--telemetry-period", "1"],
                              cwd=ROOT, env=floor_env(threads), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    prod = spawn.Process(target=pusher, args=(ep["experience"], chunks, start, stop, out))
    cons = spawn.Process(target=consumer, args=(ep["samples"], ep["priorities"], start, stop, out))
    prod.start()
    cons.start()
    try:
        deadline = time.monotonic() + 120
        while True:  # until sampling runs
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the replay server did not fill to --min-size in time")
            if tel.poll(1000):
                m = decode_telemetry(tel.recv_multipart()).metrics
                if m.get("replay/size", 0) >= cfg.min_size and m.get("replay/sampled", 0) > 0:
                    break
        time.sleep(2)  # settle
        cpu = CpuWindow({"replay_server": server.pid, "pusher": prod.pid, "consumer": cons.pid})
        cpu.start()
        start.set()
        reports = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if tel.poll(250):
                reports.append((time.monotonic(), decode_telemetry(tel.recv_multipart()).metrics))
        usage = cpu.stop()
        stop.set()
        results = dict(out.get(timeout=30) for _ in range(2))
    finally:
        stop.set()
        server.terminate()
        server.wait(30)
        for p in (prod, cons):
            p.join(30)
            if p.is_alive():
                p.kill()
        tel.close(linger=0)

    def rate(key: str) -> float:
        (ta, a), (tb, b) = reports[0], reports[-1]
        return (b[key] - a[key]) / (tb - ta)
    return {"insert": rate("replay/inserted"), "batch": rate("replay/sampled") / cfg.batch_size,
            "updated": rate("replay/updated"), "stale": reports[-1][1].get("replay/stale_incarnation", 0.0),
            "size": reports[-1][1]["replay/size"], "consumer": results["consumer"], "pusher": results["pusher"],
            "usage": usage}


# --------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="ALE/Pong-v5")
    ap.add_argument("--num-actors", type=int, default=0, help="actor processes (0: the launcher's default)")
    ap.add_argument("--min-size", type=int, default=5000, help="transitions stored before sampling starts")
    ap.add_argument("--seconds", type=float, default=60.0, help="measured window of the whole system")
    ap.add_argument("--alone-seconds", type=float, default=20.0, help="measured window of each role alone")
    ap.add_argument("--warmup-steps", type=int, default=2, help="learner steps before the window starts")
    ap.add_argument("--eval-max-frames", type=int, default=2000, help="frames of the one start-up evaluation")
    ap.add_argument("--startup-timeout", type=float, default=240.0)
    args = ap.parse_args()
    print_machine()
    print(f"load average at start (1/5/15 min): {'/'.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory(prefix="system_throughput_") as tmp_s:
        tmp = Path(tmp_s)
        t_start = time.monotonic()
        s = run_system(args, tmp)
        cfg, budgets, usage = s["cfg"], s["budgets"], s["usage"]
        print(f"system: {cfg.env}, {cfg.num_actors} actor(s) x {cfg.envs_per_actor} envs ({cfg.env_groups} groups x "
              f"{cfg.env_threads} env threads), batch {cfg.batch_size}, loader threads {cfg.loader_threads}, "
              f"min size {cfg.min_size}; budgets (cores/torch threads/busy threads): "
              + ", ".join(f"{k} {b.cores:g}/{b.torch_threads}/{b.busy_threads}" for k, b in budgets.items()),
              flush=True)
        print(f"system: replay reached min size {s['fill_s']:.0f}s after launch, first learner step at "
              f"{s['first_step_s']:.0f}s, window from {s['ready_s']:.0f}s for {s['window_s']:.0f}s (learner steps "
              f"{s['learner_steps'][0]:.0f} -> {s['learner_steps'][1]:.0f}, evaluations in window "
              f"{s['evals_in_window']}, restarts {s['restarts'] or 'none'})", flush=True)
        print(f"system: medians of per-second reports: actor {s['med_actor']:.0f} steps/s per actor, learner "
              f"{s['med_learner']:.2f} steps/s, replay inserted {s['med_insert']:.0f}/s, sampled "
              f"{s['med_batch']:.2f} batches/s, updated {s['med_updated']:.0f}/s; learner waiting for data "
              f"{s['wait']:.0%}; replay size {s['replay_size']:.0f}", flush=True)
        total = 0.0
        for name, u in usage.items():
            kind = "actor" if name.startswith("actor") else name
            b = budgets.get(kind)
            total += u["cores"]
            print(f"system cpu: {name}: {u['cores']:.3f} cores"
                  + (f" (budget {b.cores:g}), busy threads {len(busy_threads(u))} (budget {b.busy_threads})" if b
                     else " (no budget)") + f": {busy_threads(u)}", flush=True)
        print(f"system cpu: all processes {total:.2f} of {os.cpu_count()} cores", flush=True)

        chunks = real_chunks(cfg.env, -(-2048 // (cfg.envs_per_actor * cfg.chunk_steps)) + 4, cfg.envs_per_actor)

        a_rate, a_use, a_version = actor_alone(s["config_path"], cfg, budgets["actor"].torch_threads,
                                               args.alone_seconds, 3.0, tmp)
        print(f"actor alone: {a_rate:.0f} steps/s, {a_use['cores']:.2f} cores, busy {busy_threads(a_use)} "
              f"(acting with weights version {a_version})", flush=True)
        l_rate, l_use, device = learner_alone(s["config_path"], cfg, budgets["learner"].torch_threads, chunks,
                                              args.alone_seconds, tmp)
        print(f"learner alone: {l_rate:.2f} steps/s at batch {cfg.batch_size} on {device} with "
              f"{budgets['learner'].torch_threads} torch thread(s), {l_use['cores']:.2f} cores, busy "
              f"{busy_threads(l_use)}", flush=True)
        r = replay_alone(s["config_path"], cfg, budgets["replay_server"].torch_threads, chunks,
                         args.alone_seconds, tmp)
        ru = r["usage"]
        print(f"replay alone: {r['insert']:.0f} inserts/s, {r['batch']:.1f} batches/s (consumer counted "
              f"{r['consumer']:.1f}/s), {r['updated']:.0f} priority updates/s, stale {r['stale']:.0f}, size "
              f"{r['size']:.0f}; pusher sent {r['pusher']:.0f}/s; cpu: server {ru['replay_server']['cores']:.2f} "
              f"busy {busy_threads(ru['replay_server'])}, pusher {ru['pusher']['cores']:.2f}, consumer "
              f"{ru['consumer']['cores']:.2f}", flush=True)

        actors = [n for n in usage if n.startswith("actor-")]
        usage["actor"] = {"cores": statistics.mean(usage[n]["cores"] for n in actors)}  # per actor process
        rows = [("actor (env steps/s, per actor)", s["actor"], a_rate, "actor", "actor", a_use["cores"]),
                ("learner (steps/s)", s["learner"], l_rate, "learner", "learner", l_use["cores"]),
                ("replay inserts/s", s["insert"], r["insert"], "replay_server", "replay_server",
                 ru["replay_server"]["cores"]),
                ("replay batches/s", s["batch"], r["batch"], "replay_server", "replay_server",
                 ru["replay_server"]["cores"]),
                ("evaluator (between evaluations)", None, None, "evaluator", "evaluator", None)]
        print()
        print("| role | rate in system | rate alone | ratio | CPU in system (cores) | CPU budget (cores) "
              "| CPU alone (cores) |")
        print("|---|---|---|---|---|---|---|")
        def fmt(x: float | None) -> str:
            return "—" if x is None else f"{x:.3f}" if x < 0.1 else f"{x:.2f}" if x < 10 else f"{x:.0f}"
        for label, sys_rate, alone, proc_name, kind, alone_cpu in rows:
            ratio = None if sys_rate is None else sys_rate / alone
            print(f"| {label} | {fmt(sys_rate)} | {fmt(alone)} | {fmt(ratio)} | {fmt(usage[proc_name]['cores'])} "
                  f"| {budgets[kind].cores:g} | {fmt(alone_cpu)} |")
        print()
        print(f"total {time.monotonic() - t_start:.0f}s; load average at end (1/5/15 min): "
              f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"system_actor_ratio={s['actor'] / a_rate:.2f} system_learner_ratio={s['learner'] / l_rate:.2f} "
              f"system_replay_insert_ratio={s['insert'] / r['insert']:.3f} "
              f"system_replay_batch_ratio={s['batch'] / r['batch']:.3f}")


if __name__ == "__main__":
    main()
