"""Seconds until CartPole-v1 is solved: the whole distributed system against Stable-Baselines3's DQN.

Both are measured the same way, in the same invocation on the same machine, ``--runs`` fresh runs
each (alternating, ours first, so a change in the machine's load touches both):

- the clock starts when the run's process is launched (Python start-up and imports count);
- every second of wall time the current greedy network plays 10 episodes side by side
  (``evaluator.protocols.evaluate_policy``, epsilon 0, CartPole-v1's own 500-step cap);
- a run is solved at the end of the first such evaluation whose mean reaches ``--target`` (475),
  **confirmed** by a 100-episode greedy evaluation of that same network (CartPole-v1's threshold is a
  100-episode mean of 475) on other seeds. An unconfirmed hit does not count: the run goes on to the
  next hit;
- a run that is not solved within ``--limit`` seconds counts as ``--limit`` (and says so).

Ours: ``./run.sh --env CartPole-v1`` (the launcher: evaluator, replay server, learner, actors as
separate processes over loopback ZeroMQ, the CartPole preset: its evaluator plays 10 greedy episodes
every second with the newest weights). The hit time is the evaluator's own timestamp in eval.csv. The
benchmark subscribes to the learner's weight broadcasts itself and keeps each version, so the network
it confirms is the one the evaluator played (eval.csv names its version, ``learner_steps``); the
confirmation runs in this process (1 torch thread) while the system goes on.

Theirs: Stable-Baselines3's ``DQN`` (version pinned in requirements-bench.txt) with RL Zoo's tuned
CartPole-v1 hyperparameters (rl-baselines3-zoo ``hyperparams/dqn.yml``: 5e4 steps, MlpPolicy
[256, 256], lr 2.3e-3, batch 64, buffer 1e5, learning_starts 1000, gamma 0.99, target update every 10
steps, train_freq 256, 128 gradient steps, exploration over 16% to 0.04), in a fresh process with
torch threads = 1 (and OMP/MKL threads 1: one core for the one process, the other free, on 2 cores).
A callback checks wall time at every env step and, at most once per second (a second after the previous
evaluation ended), plays the current Q-network greedily over 10 episodes with the same function. The
time spent in its 100-episode confirmations is not counted (training is paused meanwhile); ours'
confirmations run beside the live system and are counted. If 5e4 steps pass unsolved, it keeps
training (epsilon stays at 0.04) until the limit.

The time to 195 (the first 10-episode evaluation with a mean >= 195, not confirmed) is printed too.

    .venv/bin/python bench/cartpole_solve.py [--runs 3] [--target 475] [--limit 300]
                                             [--algo dqn[,rainbow,iqn,a3c,nstep_q]] [--only ours|sb3]

``--algo`` takes any mix of our learning rules: the Ape-X ones (dqn, rainbow, iqn) and the asynchronous
family's a3c and nstep_q (Mnih et al. 2016: ``./run.sh --algo a3c`` runs evaluator, learner as parameter
server and actor-learners, no replay server). dqn always runs too: it is the others' reference, measured
in the same invocation, alternating with them. For each other rule it prints
``<algo>_solve_s=... dqn_solve_s=... ratio_to_dqn=...`` (medians). The same confirmation applies to
every rule: the bench builds the rule's network from the run's config.json
(``models.build_network(spec, hidden, algo)``; nstep_q's weights carry its target network next to the
online one, ``QWithTarget``, and the whole message loads) and plays it greedily with the evaluator's
function, which acts on ``networks.q_values``: the online Q network for nstep_q, the argmax of the
policy logits for a3c (its most likely action).

Targets (the issues'): rainbow and iqn <= 1.5x the dqn median and <= 90 s; a3c and nstep_q: median
seconds to a confirmed eval mean >= 475 over 3 fresh runs <= 2x the dqn median of the same invocation:

    .venv/bin/python bench/cartpole_solve.py --only ours --algo a3c,nstep_q --runs 3 --limit 300

Other flags go to ./run.sh (for every rule of the invocation). Last line: ``cartpole_solve_s=<ours,
dqn> sb3_solve_s=<theirs> ratio=<ours/theirs>`` (medians).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, complete_rows, free_port_base, print_machine, stop_launcher  # noqa: E402

ENV = "CartPole-v1"
ALGOS = ("dqn", "rainbow", "iqn", "a3c", "nstep_q")  # replay (Ape-X) rules, then the asynchronous family's
EVAL_EPISODES = 10
CONFIRM_EPISODES = 100
EVAL_PERIOD_S = 1.0
LOW_TARGET = 195.0
CONFIRM_SEED = 1_000_000  # confirmation seeds: apart from the 10-episode evaluations' seeds

# RL Zoo's CartPole-v1 DQN (rl-baselines3-zoo hyperparams/dqn.yml).
ZOO_DQN = dict(learning_rate=2.3e-3, batch_size=64, buffer_size=100_000, learning_starts=1000, gamma=0.99,
               target_update_interval=10, train_freq=256, gradient_steps=128, exploration_fraction=0.16,
               exploration_final_eps=0.04, policy_kwargs=dict(net_arch=[256, 256]))
ZOO_TIMESTEPS = 50_000


def greedy_eval(net, episodes: int, seed: int) -> float:
    """Mean return of ``episodes`` greedy episodes side by side (the evaluator's own function)."""
    from evaluator.protocols import evaluate_policy, protocol_for
    return float(evaluate_policy(net, ENV, episodes, 0.0, seed, protocol_for(ENV, "classic")).mean)


# --- ours ----------------------------------------------------------------------------------------

class WeightsLog:
    """Every weights broadcast of the learner, kept by version (the evaluator's eval.csv names it)."""

    def __init__(self, endpoint: str, keep: int = 5000) -> None:
        import zmq
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, 10_000)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.by_version: collections.OrderedDict = collections.OrderedDict()
        self.incarnations: set[int] = set()
        self.received = 0
        self.keep = keep
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from apex_zmq.wire import WireError, decode_weights
        while not self.stop.is_set():
            if not self.sock.poll(200):
                continue
            try:
                w = decode_weights(self.sock.recv_multipart())
            except WireError:
                continue
            with self.lock:  # a version seen again (a restarted learner) keeps its newest weights
                self.by_version.pop(w.version, None)
                self.by_version[w.version] = (w.names, [a.copy() for a in w.arrays])
                self.incarnations.add(w.incarnation)
                self.received += 1
                while len(self.by_version) > self.keep:
                    self.by_version.popitem(last=False)

    def get(self, version: int):
        with self.lock:
            return self.by_version.get(version)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


def run_ours(target: float, limit: float, extra: list[str], log_dir: Path, index: int) -> dict:
    """One fresh run of ./run.sh: seconds from launch to the first confirmed hit (None: not in ``limit``)."""
    from apex_zmq import config as C
    from apex_zmq.distributional import set_noise
    from apex_zmq.envs import env_spec
    from apex_zmq.models import build_network
    from apex_zmq.networks import load_arrays
    res = {"solved_s": None, "low_s": None, "evals": 0, "hits": [], "restarts": ""}
    with tempfile.TemporaryDirectory(prefix="cartpole-solve-") as tmp:
        run_dir = Path(tmp) / "run"
        base = free_port_base()
        weights = WeightsLog(C.loopback_endpoints(base)["weights"])  # subscribed before the learner starts
        argv = [sys.executable, "-m", "apex_zmq.launch", "--env", ENV, "--run-dir", str(run_dir),
                "--port-base", str(base), "--max-seconds", str(limit + 5), *extra]
        log = log_dir / f"ours-{index}.log"
        with open(log, "wb") as out:
            t0 = time.time()
            proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        net, done, past_limit = None, 0, False
        try:
            while proc.poll() is None and time.time() - t0 < limit + 10:
                rows = complete_rows(run_dir / "eval.csv")
                for n, row in enumerate(rows[done:], start=done):
                    done += 1
                    at, mean, version = float(row["time"]) - t0, float(row["mean"]), int(row["learner_steps"])
                    if at > limit:
                        past_limit = True
                        break
                    if res["low_s"] is None and mean >= LOW_TARGET:
                        res["low_s"] = at
                    if mean < target:
                        continue
                    w = weights.get(version)
                    if w is None:
                        res["hits"].append({"at": at, "version": version, "mean10": mean, "mean100": None,
                                            "note": "weights of this version not received by the benchmark"})
                        continue
                    if net is None:
                        cfg = json.loads((run_dir / "config.json").read_text())
                        algo, opts = cfg.get("algo", "dqn"), C.net_options(types.SimpleNamespace(**cfg))
                        net = build_network(env_spec(cfg["env"]), int(cfg["hidden"]), algo, **opts).eval()
                        set_noise(net, False)  # as the evaluator plays
                    load_arrays(net, *w)
                    # The identity check: the evaluator's own 10 episodes (its n-th evaluation is seeded
                    # seed + 7919 n) replayed with these weights give its mean again.
                    replayed = greedy_eval(net, EVAL_EPISODES, int(cfg["seed"]) + 7919 * n)
                    mean100 = greedy_eval(net, CONFIRM_EPISODES, CONFIRM_SEED + 1000 * len(res["hits"]))
                    res["hits"].append({"at": at, "version": version, "mean10": mean, "mean100": mean100,
                                        "replayed10": replayed})
                    if mean100 >= target:
                        res["solved_s"] = at
                        break
                res["evals"] = done
                if res["solved_s"] is not None or past_limit:
                    break
                time.sleep(0.2)
        finally:
            stop_launcher(proc)
            weights.close()
            res["weights_received"] = weights.received
        for line in log.read_text(errors="replace").splitlines():
            if "restarts:" in line:
                res["restarts"] = line.strip()
    return res


# --- Stable-Baselines3 ---------------------------------------------------------------------------

def sb3_child(target: float, limit: float, t0: float, seed: int, out_path: str) -> None:
    """The body of one Stable-Baselines3 run (a fresh process): write its result as JSON."""
    import torch
    torch.set_num_threads(1)
    from stable_baselines3 import DQN
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    res = {"solved_s": None, "low_s": None, "evals": 0, "hits": [], "paused_s": 0.0, "timeout": False}

    class Solve(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.last_end = None  # end of the previous evaluation (wall time)

        def clock(self) -> float:  # seconds since launch, confirmations left out
            return time.time() - t0 - res["paused_s"]

        def _on_step(self) -> bool:
            now = time.time()
            if self.last_end is None:
                self.last_end = now
            if self.clock() > limit:
                res["timeout"] = True
                return False
            if now - self.last_end < EVAL_PERIOD_S:
                return True
            q = self.model.q_net
            mean = greedy_eval(q, EVAL_EPISODES, seed + 7919 * res["evals"])
            res["evals"] += 1
            self.last_end = time.time()
            at = self.clock()
            if res["low_s"] is None and mean >= LOW_TARGET:
                res["low_s"] = at
            if mean >= target:
                c0 = time.time()
                mean100 = greedy_eval(q, CONFIRM_EPISODES, CONFIRM_SEED + 1000 * len(res["hits"]))
                res["paused_s"] += time.time() - c0
                self.last_end = time.time()
                res["hits"].append({"at": at, "version": self.num_timesteps, "mean10": mean, "mean100": mean100})
                if mean100 >= target:
                    res["solved_s"] = at
                    return False
            return True

    env = make_vec_env(ENV, n_envs=1, seed=seed)
    model = DQN("MlpPolicy", env, seed=seed, device="cpu", verbose=0, **ZOO_DQN)
    cb = Solve()
    model.learn(total_timesteps=ZOO_TIMESTEPS, callback=cb)
    while res["solved_s"] is None and not res["timeout"]:  # unsolved after 5e4 steps: keep training
        model.learn(total_timesteps=ZOO_TIMESTEPS, callback=cb, reset_num_timesteps=False)
    res["env_steps"] = int(model.num_timesteps)
    res["grad_steps"] = int(model._n_updates)
    Path(out_path).write_text(json.dumps(res))


def run_sb3(target: float, limit: float, seed: int, log_dir: Path, index: int) -> dict:
    """One fresh Stable-Baselines3 run in its own process, timed from its launch."""
    out = log_dir / f"sb3-{index}.json"
    log = log_dir / f"sb3-{index}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    with open(log, "wb") as f:
        t0 = time.time()
        argv = [sys.executable, __file__, "--sb3-child", str(out), "--t0", repr(t0), "--seed", str(seed),
                "--target", str(target), "--limit", str(limit)]
        rc = subprocess.run(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=limit + 300).returncode
    if rc != 0 or not out.exists():
        raise SystemExit(f"the Stable-Baselines3 run failed (exit {rc}):\n{log.read_text(errors='replace')[-3000:]}")
    return json.loads(out.read_text())


# --- report --------------------------------------------------------------------------------------

def describe(name: str, i: int, r: dict, target: float, limit: float) -> str:
    low = "not reached" if r["low_s"] is None else f"{r['low_s']:.1f} s"
    unconfirmed = [h for h in r["hits"] if h["mean100"] is None or h["mean100"] < target]
    misses = ", ".join(f"{h['at']:.1f} s (100-ep {h['mean100']:.1f})" if h["mean100"] is not None
                       else f"{h['at']:.1f} s ({h.get('note')})" for h in unconfirmed)
    if r["solved_s"] is None:
        head = f"not solved within the limit: counted as {limit:.0f} s"
    else:
        h = r["hits"][-1]
        same = ("" if "replayed10" not in h else
                f", the evaluator's 10 episodes replayed with the confirmed weights: {h['replayed10']:.1f}")
        head = (f"{r['solved_s']:.1f} s to eval mean >= {target:g} (10-ep {h['mean10']:.1f}, confirmed by "
                f"100-ep {h['mean100']:.1f}, {'learner steps' if name.startswith('ours') else 'env steps'} {h['version']}"
                f"{same})")
    extra = f"; unconfirmed hits at {misses}" if unconfirmed else ""
    if name == "sb3" and "env_steps" in r:
        extra += (f"; {r['env_steps']} env steps, {r['grad_steps']} gradient steps, "
                  f"{r['paused_s']:.1f} s of confirmations not counted")
    if name.startswith("ours"):
        extra += f"; {r['weights_received']} weight broadcasts received by the benchmark"
    if name.startswith("ours") and r.get("restarts"):
        extra += f"; {r['restarts']}"
    return f"{name} run {i + 1}: {head}; {r['evals']} evaluations; 195 at {low}{extra}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="fresh runs of each system")
    ap.add_argument("--target", type=float, default=475.0)
    ap.add_argument("--limit", type=float, default=300.0, help="seconds before a run counts as failed "
                                                             "(and counts as this many seconds)")
    ap.add_argument("--algo", default="dqn", help=f"our algorithms, comma-separated, of {list(ALGOS)}; SB3's "
                                                  f"DQN is the anchor; every other rule is also compared "
                                                  f"with our dqn, which then runs too")
    ap.add_argument("--only", choices=("ours", "sb3"), help="run one side only (development)")
    ap.add_argument("--sb3-child", help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args, extra = ap.parse_known_args()
    if args.sb3_child:
        sb3_child(args.target, args.limit, args.t0, args.seed, args.sb3_child)
        return
    algos = list(dict.fromkeys(a.strip() for a in args.algo.split(",") if a.strip()))  # in order, once each
    bad = [a for a in algos if a not in ALGOS]
    if bad or not algos:
        ap.error(f"--algo {args.algo!r}: allowed values are {', '.join(ALGOS)} (comma-separated)")
    if args.only != "sb3":  # dqn first: the others' reference, measured in the same invocation
        algos = ["dqn"] + [a for a in algos if a != "dqn"]
    if args.runs < 1 or args.limit <= 0:
        ap.error("--runs must be >= 1 and --limit > 0")
    print_machine()
    import torch
    torch.set_num_threads(1)  # this process's confirmations: one thread beside the live system
    sides = ([f"ours-{a}" for a in algos] if args.only != "sb3" else []) + (["sb3"] if args.only != "ours" else [])
    times: dict[str, list[float]] = {s: [] for s in sides}
    lows: dict[str, list[float]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory(prefix="cartpole-bench-") as logs:
        for i in range(args.runs):
            for side in sides:  # alternating: a change in the machine's load touches every side
                if side == "sb3":
                    r = run_sb3(args.target, args.limit, i, Path(logs), i)
                else:
                    r = run_ours(args.target, args.limit, ["--algo", side[5:], *extra], Path(logs), i)
                times[side].append(args.limit if r["solved_s"] is None else r["solved_s"])
                lows[side].append(args.limit if r["low_s"] is None else r["low_s"])
                print(describe(side, i, r, args.target, args.limit), flush=True)
    for side in sides:
        name = ("SB3 DQN (RL Zoo hyperparameters, 1 torch thread)" if side == "sb3"
                else f"apex-zmq --algo {side[5:]} (./run.sh)")
        t = ", ".join(f"{x:.1f}" for x in times[side])
        lo = ", ".join(f"{x:.1f}" for x in lows[side])
        print(f"{name}: to {args.target:g} (confirmed) median {statistics.median(times[side]):.1f} s "
              f"(runs {t}); to 195 (10-ep, unconfirmed) median {statistics.median(lows[side]):.1f} s (runs {lo})")
    med = {s: statistics.median(times[s]) for s in sides}
    low = {s: statistics.median(lows[s]) for s in sides}
    for a in algos[1:] if "ours-dqn" in sides else []:  # every other rule against our dqn of the same invocation
        side = f"ours-{a}"
        print(f"{a}_solve_s={med[side]:.1f} dqn_solve_s={med['ours-dqn']:.1f} "
              f"ratio_to_dqn={med[side] / med['ours-dqn']:.2f} ({a}_195_s={low[side]:.1f})")
    if "sb3" in sides and "ours-dqn" in sides:
        print(f"cartpole_195_s={low['ours-dqn']:.1f} sb3_195_s={low['sb3']:.1f} "
              f"ratio={low['ours-dqn'] / low['sb3']:.2f}")
        print(f"cartpole_solve_s={med['ours-dqn']:.1f} sb3_solve_s={med['sb3']:.1f} "
              f"ratio={med['ours-dqn'] / med['sb3']:.2f}")
    elif sides == ["sb3"]:
        print(f"sb3_solve_s={med['sb3']:.1f}")
    else:
        print(f"cartpole_solve_s={med['ours-dqn']:.1f}")


if __name__ == "__main__":
    main()
