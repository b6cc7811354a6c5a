"""The evaluator program: evaluation episodes with the latest weights, run metrics, progress report."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zmq

from . import config as C
from .envs import env_spec, make_vector_env
from .exploration import epsilon_greedy
from .logger import Logger
from .networks import build_network, load_arrays
from .transport import Sockets, install_stop, recv_latest, run_role
from .wire import Telemetry, Weights, WireError, decode_telemetry, decode_weights


@dataclass
class EvalResult:
    """Returns and lengths of one evaluation."""

    returns: np.ndarray
    lengths: np.ndarray

    @property
    def mean(self) -> float:
        return float(self.returns.mean())


@torch.no_grad()
def evaluate(net: torch.nn.Module, env_id: str, episodes: int, epsilon: float, seed: int) -> EvalResult:
    """Play ``episodes`` episodes side by side (one env each) and return their scores."""
    env = make_vector_env(env_id, episodes, seed, train=False)
    try:
        obs, _ = env.reset(seed=seed)
        rng = np.random.default_rng(seed)
        eps = np.full(episodes, epsilon)
        returns = np.zeros(episodes)
        lengths = np.zeros(episodes, dtype=np.int64)
        running = np.ones(episodes, dtype=bool)
        while running.any():
            actions = epsilon_greedy(net(torch.as_tensor(obs)).numpy(), eps, rng)
            obs, r, term, trunc, _ = env.step(actions)
            returns += np.where(running, r, 0.0)
            lengths += running
            running &= ~(term | trunc)
        return EvalResult(returns, lengths)
    finally:
        env.close()


class RunMonitor:
    """What the evaluator knows about the run: latest metrics and heartbeats of every role."""

    def __init__(self, logger: Logger) -> None:
        self.logger = logger
        self.metrics: dict[str, float] = {}
        self.heartbeat: dict[str, float] = {}
        self.rejected = 0
        self.last_eval: dict[str, float] = {}

    def on_telemetry(self, frames: list) -> None:
        """Log a role's report; a malformed one is dropped and counted."""
        try:
            t = decode_telemetry(frames)
        except WireError:
            self.rejected += 1
            return
        self.heartbeat[t.sender] = time.time()
        metrics = {k: v for k, v in t.metrics.items() if k.startswith(f"{t.role}/") or k.startswith("perf/")}
        if t.role == "actor":  # one actor's rate among many: keep it per sender
            self.metrics[f"{t.sender}/steps_per_s"] = metrics.get("actor/steps_per_s", 0.0)
            metrics["actor/steps_per_s"] = sum(v for k, v in self.metrics.items() if k.endswith("/steps_per_s")
                                               and k.startswith("actor-"))
        self.metrics.update(metrics)
        step = int(self.metrics.get("learner/steps", 0))
        if metrics:
            self.logger.write(metrics, step)
        if t.episodes:
            self.logger.rows("actor_episodes", [{"time": t.time, "actor": t.sender, **e} for e in t.episodes])
            self.logger.write({"actor/episode_return": float(np.mean([e["return"] for e in t.episodes]))}, step)

    def progress_line(self, elapsed: float) -> str:
        """One line: time, evaluation, learner, replay, actors."""
        m = self.metrics
        ev = self.last_eval
        eval_part = f"eval {ev['mean']:.1f} (v{int(ev['version'])})" if ev else "eval -"
        return (f"[{elapsed:7.1f}s] {eval_part} | learner {m.get('learner/steps', 0):.0f} steps "
                f"{m.get('learner/steps_per_s', 0):.0f}/s loss {m.get('learner/loss', float('nan')):.3g} | "
                f"replay {m.get('replay/size', 0):.0f} +{m.get('replay/inserted_per_s', 0):.0f}/s | "
                f"actors {m.get('actor/steps_per_s', 0):.0f} steps/s")


async def main_async(cfg: C.EvaluatorConfig) -> None:
    """Bind telemetry, follow weights, evaluate periodically until stopped."""
    torch.set_num_threads(cfg.torch_threads)
    spec = env_spec(cfg.env)
    net = build_network(spec, cfg.hidden).eval()
    logger = Logger(cfg.run_dir)
    monitor = RunMonitor(logger)
    socks = Sockets(cfg.insecure)
    tel = socks.bind(zmq.SUB, cfg.telemetry, hwm=1000)
    tel.setsockopt(zmq.SUBSCRIBE, b"")
    weights = socks.connect(zmq.SUB, cfg.weights, hwm=2, subscribe=True)
    stop = asyncio.Event()
    install_stop(stop)
    loop = asyncio.get_running_loop()
    started = time.time()
    latest: list[Weights] = []
    fresh = threading.Event()   # newer weights arrived
    halt = threading.Event()    # stop, as seen from the evaluation thread
    state = {"reached": False, "evaluated_version": -1}

    async def receive_telemetry() -> None:
        while True:
            monitor.on_telemetry(await tel.recv_multipart(copy=False))

    async def receive_weights() -> None:
        while True:
            try:
                latest[:] = [decode_weights(await recv_latest(weights))]
                if latest[0].version != state["evaluated_version"]:
                    fresh.set()
            except WireError:
                monitor.rejected += 1

    def evaluation() -> None:
        # CPU-bound episodes off the event loop; one evaluation per period with the newest weights.
        n = 0
        while not halt.is_set():
            fresh.wait()
            fresh.clear()
            if halt.is_set() or not latest or latest[0].version == state["evaluated_version"]:
                continue
            w = latest[0]
            load_arrays(net, w.names, w.arrays)
            res = evaluate(net, cfg.env, cfg.eval_episodes, cfg.eval_epsilon, cfg.seed + 7919 * n)
            n += 1
            state["evaluated_version"] = w.version
            now = time.time()
            summary = {"time": now, "elapsed_s": now - started, "learner_steps": w.version,
                       "mean": res.mean, "std": float(res.returns.std()), "min": float(res.returns.min()),
                       "max": float(res.returns.max()), "episodes": len(res.returns)}
            monitor.last_eval = {"mean": res.mean, "version": w.version}
            logger.rows("eval", [summary])
            logger.rows("eval_episodes", [{"time": now, "learner_steps": w.version, "episode": i,
                                           "return": float(r), "length": int(l)}
                                          for i, (r, l) in enumerate(zip(res.returns, res.lengths))])
            logger.write({"eval/return_mean": res.mean, "eval/return_max": summary["max"]}, w.version)
            if cfg.stop_at_return is not None and res.mean >= cfg.stop_at_return:
                state["reached"] = True
                Path(cfg.run_dir, "finished.json").write_text(json.dumps(summary))
                print(f"evaluator: mean return {res.mean:.1f} reached --stop-at-return "
                      f"{cfg.stop_at_return} after {summary['elapsed_s']:.1f}s", flush=True)
                return
            halt.wait(cfg.eval_period)

    async def report() -> None:
        while True:
            await asyncio.sleep(cfg.report_period)
            print(monitor.progress_line(time.time() - started), flush=True)

    try:
        await run_role(stop, [receive_telemetry(), receive_weights(), report()], [evaluation],
                       on_stop=[halt, fresh])
    finally:
        socks.close()
        logger.close()


def main(argv: list[str] | None = None) -> None:
    """``apex-zmq evaluator``: run the evaluator."""
    cfg = C.parse(C.EvaluatorConfig, argv, "evaluator")
    C.save(cfg, cfg.run_dir, "config_evaluator")
    asyncio.run(main_async(cfg))


if __name__ == "__main__":
    main(sys.argv[1:])
