"""MinAtar: our learning rules against a reference DQN anchor, for the same wall time on this machine.

For each game asked (``--games``) and each of our algorithms (``--algos``), in one invocation, one
after the other (never side by side: each run takes every core of the machine):

- the **anchor**, once per game (shared by its algorithms), run first: Stable-Baselines3's ``DQN``
  (version pinned in requirements-bench.txt) set up as Young & Tian's (2019) reference DQN, for
  ``--minutes`` of wall time from the launch of its process (imports count);
- then for each algorithm one fresh ``./run.sh --env MinAtar/<Game>-v0 --algo <algo>`` run for the
  same wall time from the launch of its process (run.sh's venv check and imports count), stopped at
  the budget (SIGINT to its process group; ``--max-seconds`` is passed too, as a backstop).

Ours is evaluated by its own evaluator while it trains, with the env's preset: 30 episodes at epsilon
0.01 (``--eval-episodes``; the flags are passed to run.sh only where the preset differs). An
evaluation counts at the moment it *ends* (eval.csv's ``time``, minus our launch time), so its figures
are of weights a few seconds older than their time stamp; rows stamped after the budget are left out.

The anchor is Young & Tian's DQN: one 3x3 convolution of 16 channels, stride 1, ReLU, then 128 ReLU
units and one output per action (all 6 actions); replay 100,000, batch 32, one update per frame after
5,000 uniformly random frames, target network every 1,000 updates (SB3 counts
``target_update_interval`` in env steps from step 0; with one gradient step per env step after
5,000 it syncs at steps 5,000, 6,000, ..., i.e. every 1,000 updates), centred RMSProp (lr 2.5e-4,
decay 0.95, epsilon 0.01), epsilon-greedy 1 -> 0.1 linearly over the 100,000 frames that follow the
5,000 random ones (their schedule; SB3's own would start at frame 0, so it is replaced), gamma 0.99,
Huber loss (SB3's ``smooth_l1_loss``), no gradient clipping (``max_grad_norm`` infinite), plain (not
double) Q-learning targets as theirs. MinAtar's 0/1 frames (``observation_space.high == 1``) are not
an image space to SB3, so they reach the convolution as 0/1 floats, without /255 (checked at the first
training batch; the check is printed). It runs in its own process with one torch thread (and OMP/MKL
threads 1): Young & Tian's reference is single-threaded and the network is tiny (a batch of 32 through
a 1024x128 layer), so a second thread buys nothing but synchronisation; it also leaves the second
core to the env and Python. Every 60 s of wall time from its launch (and once at its first step, and
at the budget) it saves its Q network (``torch.save`` of the state dict, a few ms); after the budget,
off the clock, each saved network plays ``--eval-episodes`` episodes at epsilon 0.01 with the same
function as our evaluator (``evaluator.protocols.evaluate_policy``), each plotted at the wall time it
was saved. So evaluating the anchor never slows it; ours evaluates on the machine it trains on.

Per game and algorithm it prints: frames (env steps: MinAtar has no frame skip; ours from metrics.csv's
``actor/frames``), learner steps, the final evaluation (mean and standard error), the seconds to reach
the anchor's final evaluation mean (the first evaluation whose mean is at least it; ``>budget`` if
never), the anchor's own figures (its seconds to its own final mean: its first saved network that
reaches it) and the published figures beside them. It draws ``minatar.png`` (evaluation return
against wall time per game: our curves, the anchor's, the published levels as lines) and writes every
curve to ``minatar.json``, both in ``--out``. Last line, for the first game and algorithm asked::

    minatar game=<id> algo=<algo> ours_s=<s to the anchor's final, or the budget> anchor_s=<s> ratio=<ours/anchor> ours_final=<x> anchor_final=<y>

    .venv/bin/python bench/minatar.py [--games Breakout,SpaceInvaders] [--algos dqn,rainbow] [--minutes 15]
                                      [--eval-episodes 30] [--out DIR] [--skip-anchor] [--run-flags "..."]

Published figures: Young & Tian 2019 (30 runs; *training* episodes at epsilon 0.1) DQN at 250k, 1M and
5M frames, and their actor-critic at 1M (the a3c rows); Obando-Ceron & Castro 2021 ("Revisiting
Rainbow": evaluation at epsilon 0.01 after 9-10M frames) DQN and Rainbow.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from _common import ROOT, complete_rows, free_port_base, machine_line, print_machine, stop_launcher  # noqa: E402

# This file has the name of the ``minatar`` package: with bench/ on sys.path (where Python puts a script's
# folder), the env family's look-up of that package (``importlib.util.find_spec("minatar")``) finds this
# script instead. _common is imported, so bench/ leaves sys.path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]

GAMES = ("Asterix", "Breakout", "Freeway", "Seaquest", "SpaceInvaders")
EVAL_EPSILON = 0.01
SAVE_PERIOD_S = 60.0
ANCHOR_SEED = 0
ANCHOR_EVAL_SEED = 500_000  # the anchor's evaluation seeds: apart from the training env's

# Young & Tian 2019's DQN (their dqn.py), as SB3 DQN settings.
YT_RANDOM_FRAMES = 5_000
YT_ANNEAL_FRAMES = 100_000
YT_EPS_START, YT_EPS_END = 1.0, 0.1
YT_CONV_CHANNELS, YT_HIDDEN = 16, 128
YT_DQN = dict(learning_rate=2.5e-4, buffer_size=100_000, learning_starts=YT_RANDOM_FRAMES, batch_size=32,
              train_freq=1, gradient_steps=1, target_update_interval=1_000, gamma=0.99,
              exploration_initial_eps=YT_EPS_START, exploration_final_eps=YT_EPS_END,
              max_grad_norm=float("inf"))
ANCHOR_TOTAL_STEPS = 10_000_000  # never reached in the budgets here: the run stops on wall time

# Published returns by short game name. Young & Tian 2019 (training episodes, epsilon 0.1, 30 runs).
YT_DQN_PUBLISHED: dict[str, dict[str, Optional[float]]] = {
    "Breakout": {"250k": 6.8, "1M": 9.2, "5M": 10.0},
    "SpaceInvaders": {"250k": 21.4, "1M": 32.5, "5M": 43.3},
    "Freeway": {"250k": None, "1M": 47.8, "5M": 50.2},
    "Asterix": {"250k": 0.8, "1M": 7.3, "5M": 17.2},
    "Seaquest": {"250k": 0.8, "1M": 1.0, "5M": 20.3},
}
YT_AC_1M: dict[str, float] = {"Breakout": 9.9, "SpaceInvaders": 51.7}
# Obando-Ceron & Castro 2021 (evaluation at epsilon 0.01, 9-10M frames); "~": read off their plots.
OC_PUBLISHED: dict[str, dict[str, float]] = {
    "dqn": {"Breakout": 7.4, "SpaceInvaders": 34.0, "Freeway": 60.1, "Asterix": 28.3, "Seaquest": 5.4},
    "rainbow": {"Breakout": 11.3, "SpaceInvaders": 92.7, "Freeway": 57.0, "Asterix": 41.8, "Seaquest": 10.0},
}
OC_APPROX = {("dqn", "Seaquest"), ("rainbow", "Freeway")}


# --- small helpers ---------------------------------------------------------------------------------

def env_id_of(game: str) -> str:
    """``Breakout`` or ``MinAtar/Breakout-v0`` -> ``MinAtar/Breakout-v0``."""
    if game.startswith("MinAtar/"):
        return game
    match = {g.lower(): g for g in GAMES}.get(game.lower())
    if match is None:
        raise ValueError(f"unknown MinAtar game {game!r}; expected one of {', '.join(GAMES)}")
    return f"MinAtar/{match}-v0"


def short_name(env_id: str) -> str:
    """``MinAtar/Breakout-v0`` -> ``Breakout``."""
    return env_id.split("/", 1)[-1].rsplit("-v", 1)[0]


def std_error(std_pop: float, n: int) -> float:
    """Standard error of a mean from the population std (``np.std``, as eval.csv's) of ``n`` returns."""
    return std_pop / math.sqrt(n - 1) if n > 1 else float("nan")


def seconds_to(curve: list[dict], target: float) -> Optional[float]:
    """Time ``t`` of the first point of ``curve`` whose ``mean`` reaches ``target``; None if none does."""
    return next((p["t"] for p in curve if p["mean"] >= target), None)


def fmt_s(s: Optional[float], budget: float) -> str:
    """Seconds for the table: ``>budget`` when never reached."""
    return f">{budget:.0f}" if s is None else f"{s:.0f}"


def published_for(game: str, algo: str) -> str:
    """The published figures that go with ``algo`` on ``game``, in words ("-" if none)."""
    parts = []
    if algo in ("a3c",) and game in YT_AC_1M:
        parts.append(f"Y&T AC 1M {YT_AC_1M[game]:g}")
    if algo in OC_PUBLISHED and game in OC_PUBLISHED[algo]:
        approx = "~" if (algo, game) in OC_APPROX else ""
        parts.append(f"O&C {algo} 10M {approx}{OC_PUBLISHED[algo][game]:g}")
    if algo in ("dqn", "anchor"):
        yt = YT_DQN_PUBLISHED.get(game, {})
        parts.insert(0, "Y&T DQN " + "/".join("n/a" if v is None else f"{v:g}" for v in yt.values())
                     + " @250k/1M/5M")
    if algo == "anchor" and game in OC_PUBLISHED["dqn"]:
        approx = "~" if ("dqn", game) in OC_APPROX else ""
        parts.append(f"O&C dqn 10M {approx}{OC_PUBLISHED['dqn'][game]:g}")
    return "; ".join(parts) or "-"


# --- the anchor: SB3 DQN as Young & Tian's ------------------------------------------------------

def anchor_child(env_id: str, t0: float, budget: float, ckpt_dir: str, episodes: int, seed: int,
                 out_path: str) -> None:
    """The anchor's process body: train for ``budget`` s from ``t0``, saving its Q network every
    minute, then (off the clock) evaluate every saved network; the result goes to ``out_path`` as JSON."""
    import torch
    torch.set_num_threads(1)
    from stable_baselines3 import DQN
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    from apex_zmq.envs import make_env
    from evaluator.protocols import PLAIN, evaluate_policy

    class YoungTianConv(BaseFeaturesExtractor):
        """Young & Tian's torso: Conv2d(C, 16, 3, stride 1) + ReLU, flattened (16 x 8 x 8 on 10x10)."""

        def __init__(self, observation_space, features_dim: int = 0) -> None:
            c, h, w = observation_space.shape
            super().__init__(observation_space, YT_CONV_CHANNELS * (h - 2) * (w - 2))
            self.net = torch.nn.Sequential(torch.nn.Conv2d(c, YT_CONV_CHANNELS, 3, 1), torch.nn.ReLU(),
                                           torch.nn.Flatten())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    def yt_epsilon(progress_remaining: float) -> float:
        """Their schedule: 1 -> 0.1 over the 100,000 frames after the 5,000 random ones."""
        frame = (1.0 - progress_remaining) * ANCHOR_TOTAL_STEPS - YT_RANDOM_FRAMES
        frac = min(max(frame / YT_ANNEAL_FRAMES, 0.0), 1.0)
        return YT_EPS_START + frac * (YT_EPS_END - YT_EPS_START)

    env = make_env(env_id)
    model = DQN("MlpPolicy", env, seed=seed, device="cpu", verbose=0,
                policy_kwargs=dict(features_extractor_class=YoungTianConv, net_arch=[YT_HIDDEN],
                                   activation_fn=torch.nn.ReLU, normalize_images=False,
                                   optimizer_class=torch.optim.RMSprop,
                                   optimizer_kwargs=dict(alpha=0.95, eps=0.01, centered=True)),
                exploration_fraction=YT_ANNEAL_FRAMES / ANCHOR_TOTAL_STEPS, **YT_DQN)
    model.exploration_schedule = yt_epsilon
    check: dict[str, Any] = {}

    def input_hook(module, inputs) -> None:  # the first training batch: what reaches the convolution
        if "input" not in check and torch.is_grad_enabled():
            x = inputs[0]
            values = sorted(float(v) for v in torch.unique(x))
            check["input"] = f"{x.dtype} {list(x.shape)} values {values}"
            check["ok"] = x.dtype == torch.float32 and set(values) <= {0.0, 1.0} and 1.0 in values

    model.q_net.features_extractor.net[0].register_forward_pre_hook(input_hook)
    ckpt = Path(ckpt_dir)
    saves: list[dict] = []

    def save(t: float) -> None:
        path = ckpt / f"q_{len(saves):03d}_{t:08.1f}s_{model.num_timesteps}f.pt"
        torch.save(model.q_net.state_dict(), path)
        saves.append({"t": t, "frames": int(model.num_timesteps), "updates": int(model._n_updates),
                      "path": str(path)})

    class Clock(BaseCallback):
        """Save at the first step, every ``SAVE_PERIOD_S`` s from launch and at the budget; stop there."""

        next_save = 0.0

        def _on_step(self) -> bool:
            t = time.time() - t0
            if t >= budget:
                save(t)
                return False
            if t >= self.next_save:
                save(t)
                self.next_save = (math.floor(t / SAVE_PERIOD_S) + 1) * SAVE_PERIOD_S
            return True

    model.learn(total_timesteps=ANCHOR_TOTAL_STEPS, callback=Clock())
    train_end = time.time() - t0
    # Off the clock: every saved network plays as our evaluator plays.
    model.q_net.eval()
    for k, s in enumerate(saves):
        model.q_net.load_state_dict(torch.load(s["path"]))
        with torch.inference_mode():
            ev = evaluate_policy(model.q_net, env_id, episodes, EVAL_EPSILON, ANCHOR_EVAL_SEED + 7919 * k, PLAIN)
        std = float(ev.returns.std())
        s.update(mean=float(ev.mean), std=std, se=std_error(std, len(ev.returns)), episodes=len(ev.returns))
    res = {"curve": saves, "frames": int(model.num_timesteps), "updates": int(model._n_updates),
           "train_end_s": train_end, "eval_s": time.time() - t0 - train_end, "torch_threads": 1,
           "input_check": check.get("input", "no training batch seen"), "input_ok": bool(check.get("ok"))}
    Path(out_path).write_text(json.dumps(res))


def run_anchor(env_id: str, budget: float, episodes: int, work: Path) -> dict:
    """The anchor in its own process, timed from its launch; its curve and counters."""
    name = short_name(env_id)
    ckpt = work / f"anchor-{name}"
    ckpt.mkdir(parents=True, exist_ok=True)
    out, log = work / f"anchor-{name}.json", work / f"anchor-{name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    with open(log, "wb") as f:
        t0 = time.time()
        argv = [sys.executable, str(Path(__file__).resolve()), "--anchor-child", str(out), "--t0", repr(t0),
                "--games", env_id, "--minutes", repr(budget / 60), "--eval-episodes", str(episodes),
                "--ckpt-dir", str(ckpt)]
        rc = subprocess.run(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL).returncode
    if rc != 0 or not out.exists():
        raise SystemExit(f"the anchor run failed (exit {rc}):\n{log.read_text(errors='replace')[-3000:]}")
    res = json.loads(out.read_text())
    for p in res["curve"]:
        p.pop("path", None)
    return res


# --- ours: ./run.sh ------------------------------------------------------------------------------

def eval_flags(env_id: str, algo: str, episodes: int) -> list[str]:
    """The evaluation flags run.sh needs for ``episodes`` at epsilon 0.01: none where the preset has them."""
    from apex_zmq import config as C
    preset = C.preset_for(env_id, algo)
    flags = []
    if preset.get("eval_episodes") != episodes:
        flags += ["--eval-episodes", str(episodes)]
    if preset.get("eval_epsilon") != EVAL_EPSILON:
        flags += ["--eval-epsilon", str(EVAL_EPSILON)]
    return flags


def frames_from_metrics(rows: list[dict], t_end: float, num_actors: int) -> tuple[int, str]:
    """Actor frames by ``t_end`` (absolute time) from metrics.csv rows, and how they were counted.

    One actor: its ``actor/frames`` counter (a restarted actor's new count added to the old one's).
    Several: metrics.csv does not name the sender, so the run's summed ``actor/steps_per_s`` (the
    monitor's sum over live actors) is integrated over time, times frames per agent step (approximate).
    """
    rows = [r for r in rows if float(r["time"]) <= t_end]
    frames = [float(r["value"]) for r in rows if r["tag"] == "actor/frames"]
    if num_actors <= 1:
        total, last = 0.0, 0.0
        for v in frames:
            if v < last:  # a restarted actor counts from 0 again
                total += last
            last = v
        return int(total + last), "actor/frames"
    steps = [float(r["value"]) for r in rows if r["tag"] == "actor/agent_steps"]
    per_step = frames[-1] / steps[-1] if frames and steps and steps[-1] else 1.0
    rate = [(float(r["time"]), float(r["value"])) for r in rows if r["tag"] == "actor/steps_per_s"]
    total = sum((t1 - t0) * v1 for (t0, _), (t1, v1) in zip(rate, rate[1:]))
    return int(total * per_step), "~integrated actor/steps_per_s"


def run_ours(env_id: str, algo: str, budget: float, episodes: int, extra: list[str], work: Path) -> dict:
    """One fresh ``./run.sh`` run for ``budget`` s from its launch; its evaluation curve and counters."""
    run_dir = work / f"ours-{short_name(env_id)}-{algo}"
    log = work / f"ours-{short_name(env_id)}-{algo}.log"
    argv = [str(ROOT / "run.sh"), "--env", env_id, "--algo", algo, "--run-dir", str(run_dir),
            "--port-base", str(free_port_base()), "--max-seconds", f"{budget:g}",
            *eval_flags(env_id, algo, episodes), *extra]
    with open(log, "wb") as out:
        t0 = time.time()
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        while proc.poll() is None and time.time() - t0 < budget:
            time.sleep(min(1.0, max(0.0, budget - (time.time() - t0))))
    finally:
        stop_launcher(proc)
    early = time.time() - t0 < budget - 1
    cfg_path = run_dir / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    curve = []
    for r in complete_rows(run_dir / "eval.csv"):
        t = float(r["time"]) - t0
        if t <= budget:
            n, std = int(r["episodes"]), float(r["std"])
            curve.append({"t": t, "learner_steps": int(r["learner_steps"]), "mean": float(r["mean"]),
                          "std": std, "se": std_error(std, n), "episodes": n})
    metrics = complete_rows(run_dir / "metrics.csv")
    frames, how = frames_from_metrics(metrics, t0 + budget, int(cfg.get("num_actors", 1) or 1))
    steps = [float(r["value"]) for r in metrics if r["tag"] == "learner/steps" and float(r["time"]) <= t0 + budget]
    res = {"curve": curve, "frames": frames, "frames_from": how,
           "learner_steps": int(steps[-1]) if steps else (curve[-1]["learner_steps"] if curve else 0),
           "eval_episodes": cfg.get("eval_episodes"), "eval_epsilon": cfg.get("eval_epsilon"),
           "eval_period": cfg.get("eval_period"), "argv": argv[1:], "exit": proc.returncode,
           # The head the run's network had (the preset's or a flag's): minatar_compare tells dqn's apart by it.
           "dueling": cfg.get("dueling")}
    if early or not curve:
        tail = log.read_text(errors="replace")[-3000:]
        why = f"ended after {time.time() - t0:.0f} s (exit {proc.returncode})" if early else "no evaluation in time"
        print(f"warning: ours {env_id} {algo}: {why}; the log's tail:\n{tail}", file=sys.stderr, flush=True)
        res["failed"] = why
    return res


# --- report --------------------------------------------------------------------------------------

def final(curve: list[dict]) -> Optional[dict]:
    """The last evaluation of a curve (None if it has none)."""
    return curve[-1] if curve else None


def summarize(env_id: str, algos: list[str], anchor: Optional[dict], ours: dict[str, dict],
              budget: float) -> dict[str, dict]:
    """Per algorithm: ours' final, seconds to the anchor's final, and the anchor's own seconds to it."""
    a_final = final(anchor["curve"]) if anchor else None
    anchor_s = seconds_to(anchor["curve"], a_final["mean"]) if a_final else None
    out = {}
    for algo in algos:
        o = ours[algo]
        o_final = final(o["curve"])
        ours_s = seconds_to(o["curve"], a_final["mean"]) if a_final else None
        out[algo] = {"ours_final": o_final["mean"] if o_final else float("nan"),
                     "ours_se": o_final["se"] if o_final else float("nan"),
                     "ours_s": ours_s, "ours_s_or_budget": budget if ours_s is None else ours_s,
                     "anchor_final": a_final["mean"] if a_final else float("nan"),
                     "anchor_se": a_final["se"] if a_final else float("nan"), "anchor_s": anchor_s}
    return out


def print_table(env_id: str, algos: list[str], anchor: Optional[dict], ours: dict[str, dict],
                summary: dict[str, dict], budget: float, episodes: int) -> None:
    """One plain-text table for a game: the anchor's row, then one row per algorithm."""
    game = short_name(env_id)
    print(f"\n{env_id}: {budget:.0f} s of wall time per run, evaluation {episodes} episodes at epsilon "
          f"{EVAL_EPSILON:g} (mean +- standard error)", flush=True)
    head = ("run", "frames", "learner steps", "evals", "final eval", "s to anchor final", "published")
    rows = []
    if anchor:
        a = anchor["curve"][-1] if anchor["curve"] else None
        rows.append(("anchor SB3 DQN (Y&T)", f"{anchor['frames']:,}", f"{anchor['updates']:,}",
                     str(len(anchor["curve"])), f"{a['mean']:.2f} +- {a['se']:.2f}" if a else "-",
                     fmt_s(next(iter(summary.values()))["anchor_s"], budget) + " (own)" if a else "-",
                     published_for(game, "anchor")))
    for algo in algos:
        o, s = ours[algo], summary[algo]
        f = final(o["curve"])
        rows.append((f"ours {algo}" + (" (FAILED)" if o.get("failed") else ""), f"{o['frames']:,}",
                     f"{o['learner_steps']:,}", str(len(o["curve"])),
                     f"{f['mean']:.2f} +- {f['se']:.2f}" if f else "-",
                     fmt_s(s["ours_s"], budget) if anchor else "n/a", published_for(game, algo)))
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    for r in (head, *rows):
        print("  " + "  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip(), flush=True)
    if anchor:
        print(f"  anchor: training ended at {anchor['train_end_s']:.1f} s, its {len(anchor['curve'])} saved "
              f"networks evaluated off the clock in {anchor['eval_s']:.0f} s; torch threads "
              f"{anchor['torch_threads']}; input to its convolution at the first training batch: "
              f"{anchor['input_check']} ({'0/1 floats, ok' if anchor['input_ok'] else 'NOT 0/1 floats'})")
    for algo in algos:
        o = ours[algo]
        print(f"  ours {algo}: run.sh {' '.join(o['argv'])}; its evaluations: {o['eval_episodes']} episodes at "
              f"epsilon {o['eval_epsilon']} every {o['eval_period']} s; frames from {o['frames_from']}"
              + (f"; FAILED: {o['failed']}" if o.get("failed") else ""))
    print("  published: Y&T = Young & Tian 2019, training episodes at epsilon 0.1; O&C = Obando-Ceron & "
          "Castro 2021, evaluation at epsilon 0.01 (~: read off their plots)", flush=True)


def draw(path: Path, games: list[str], algos: list[str], results: dict[str, dict], budget: float) -> None:
    """minatar.png: evaluation return against wall time per game, ours and the anchor's, published levels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(games)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, env_id in zip(axes.flat, games):
        game, r = short_name(env_id), results[env_id]
        if r["anchor"]:
            c = r["anchor"]["curve"]
            ax.errorbar([p["t"] / 60 for p in c], [p["mean"] for p in c], yerr=[p["se"] for p in c],
                        color="black", marker="o", ms=3, capsize=2,
                        label="anchor: SB3 DQN as Young & Tian's (+- 1 s.e.)")
        for i, algo in enumerate(algos):
            c, color = r["ours"][algo]["curve"], colors[i % len(colors)]
            t, m, se = ([p[k] / 60 if k == "t" else p[k] for p in c] for k in ("t", "mean", "se"))
            ax.plot(t, m, color=color, marker=".", lw=1.3, label=f"ours: {algo} (+- 1 s.e.)")
            ax.fill_between(t, [a - b for a, b in zip(m, se)], [a + b for a, b in zip(m, se)], color=color, alpha=0.2)
        yt = YT_DQN_PUBLISHED.get(game, {})
        for key, style in (("1M", ":"), ("5M", "--")):
            if yt.get(key) is not None:
                ax.axhline(yt[key], color="grey", ls=style, lw=1, label=f"Y&T DQN {key} frames (train, eps 0.1)")
        if game in OC_PUBLISHED["dqn"]:
            ax.axhline(OC_PUBLISHED["dqn"][game], color="grey", ls="-.", lw=1, label="O&C DQN ~10M (eps 0.01)")
        for i, algo in enumerate(algos):
            level = (OC_PUBLISHED["rainbow"].get(game) if algo == "rainbow" else
                     YT_AC_1M.get(game) if algo == "a3c" else None)
            if level is not None:
                ax.axhline(level, color=colors[i % len(colors)], ls="--", lw=1,
                           label="O&C Rainbow ~10M" if algo == "rainbow" else "Y&T actor-critic 1M")
        ax.set_title(env_id)
        ax.set_xlim(0, budget / 60 * 1.02)
        ax.set_xlabel("wall time (minutes)")
        ax.set_ylabel(f"evaluation return (eps {EVAL_EPSILON:g})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="best")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(f"MinAtar, {budget / 60:g} min per run on {machine_line()[5:60]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ----------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The command line (see the module's docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--games", default="Breakout", help=f"comma-separated, of {', '.join(GAMES)} (or full ids)")
    ap.add_argument("--algos", default="dqn", help="our algorithms, comma-separated (./run.sh --algo)")
    ap.add_argument("--minutes", type=float, default=15.0, help="wall time of each run, from its launch")
    ap.add_argument("--eval-episodes", type=int, default=30, help="episodes per evaluation (epsilon 0.01)")
    ap.add_argument("--out", default=".", help="folder for minatar.png and minatar.json")
    ap.add_argument("--skip-anchor", action="store_true", help="ours only (quick tests)")
    ap.add_argument("--run-flags", default="", help="extra flags for every ./run.sh run, one string")
    ap.add_argument("--work-dir", help="keep run dirs, logs and the anchor's networks here (default: a "
                                       "temporary folder, removed at the end)")
    ap.add_argument("--anchor-child", help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.minutes <= 0 or args.eval_episodes < 2:
        ap.error("--minutes must be > 0 and --eval-episodes >= 2")
    try:
        args.games = list(dict.fromkeys(env_id_of(g.strip()) for g in args.games.split(",") if g.strip()))
    except ValueError as e:
        ap.error(str(e))
    args.algos = list(dict.fromkeys(a.strip() for a in args.algos.split(",") if a.strip()))
    from apex_zmq.config import ALGOS
    bad = [a for a in args.algos if a not in ALGOS]
    if bad or not args.algos or not args.games:
        ap.error(f"--algos {','.join(args.algos)!r}: allowed values are {', '.join(ALGOS)}")
    return args


def main() -> None:
    args = parse_args()
    budget = args.minutes * 60
    if args.anchor_child:
        anchor_child(args.games[0], args.t0, budget, args.ckpt_dir, args.eval_episodes, ANCHOR_SEED,
                     args.anchor_child)
        return
    print_machine()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = shlex.split(args.run_flags)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="minatar-bench-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for env_id in args.games:  # one run at a time: each takes every core
            anchor = None
            if not args.skip_anchor:
                print(f"{env_id}: anchor (SB3 DQN as Young & Tian's), {budget:.0f} s ...", flush=True)
                anchor = run_anchor(env_id, budget, args.eval_episodes, work)
            ours = {}
            for algo in args.algos:
                print(f"{env_id}: ours --algo {algo}, {budget:.0f} s ...", flush=True)
                ours[algo] = run_ours(env_id, algo, budget, args.eval_episodes, extra, work)
            summary = summarize(env_id, args.algos, anchor, ours, budget)
            results[env_id] = {"anchor": anchor, "ours": ours, "summary": summary}
            print_table(env_id, args.algos, anchor, ours, summary, budget, args.eval_episodes)
    png = out / "minatar.png"
    draw(png, args.games, args.algos, results, budget)
    published = {"young_tian_dqn_train_eps0.1": YT_DQN_PUBLISHED, "young_tian_ac_1M": YT_AC_1M,
                 "obando_ceron_castro_eps0.01_10M": OC_PUBLISHED}
    (out / "minatar.json").write_text(json.dumps(
        {"machine": machine_line(), "budget_s": budget, "eval_episodes": args.eval_episodes,
         "eval_epsilon": EVAL_EPSILON, "games": results, "published": published}, indent=1))
    print(f"\nwrote {png.resolve()} and {(out / 'minatar.json').resolve()}", flush=True)
    game, algo = args.games[0], args.algos[0]
    s = results[game]["summary"][algo]
    ratio = (s["ours_s_or_budget"] / s["anchor_s"]) if s["anchor_s"] else float("nan")
    ours_s = "nan" if args.skip_anchor else f"{s['ours_s_or_budget']:.1f}"
    anchor_s = "nan" if s["anchor_s"] is None else f"{s['anchor_s']:.1f}"
    print(f"minatar game={game} algo={algo} ours_s={ours_s} anchor_s={anchor_s} ratio={ratio:.2f} "
          f"ours_final={s['ours_final']:.2f} anchor_final={s['anchor_final']:.2f}", flush=True)


if __name__ == "__main__":
    main()
