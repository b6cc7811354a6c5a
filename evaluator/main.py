"""The evaluator program: evaluation episodes with the latest weights, run metrics, progress report."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from apex_zmq import checkpoint
from apex_zmq import config as C
from apex_zmq.checkpoint import save_atomic
from apex_zmq.distributional import set_noise
from apex_zmq.envs import env_spec
from apex_zmq.logger import Logger
from apex_zmq.memory import release_freed_memory
from apex_zmq.models import build_network
from apex_zmq.networks import load_arrays, weights_mismatch
from apex_zmq.transport import Sockets, install_stop, recv_latest, run_role
from apex_zmq.wire import Weights, WireError, decode_weights

from .dashboard.curves import write_learning_curves
from .dashboard.server import Dashboard
from .monitor import CsvFollower, RunMonitor
from .play import best_checkpoint
from .protocols import Evaluation, evaluate_policy, protocol_for


def evaluate(net: torch.nn.Module, env_id: str, episodes: int, epsilon: float, seed: int,
             protocol: str = "classic", max_frames: int = 0) -> Evaluation:
    """Play ``episodes`` episodes side by side (env i seeded ``seed + i``) and return their scores.

    Atari plays under the named protocol (see ``protocols``; ``max_frames`` > 0 overrides its frame
    cap); other envs play their own episodes. ``Evaluation`` has ``returns``, ``lengths``, ``mean``,
    the protocol, seeds, HNS and SABER's 5/30-minute returns.
    """
    return evaluate_policy(net, env_id, episodes, epsilon, seed, protocol_for(env_id, protocol),
                           max_frames=max_frames)


CURVE_MIN_INTERVAL_S = 5.0  # learning-curve files are redrawn at most this often (matplotlib takes ~0.3 s)


def _write_url(run_dir: str, url: str) -> Path:
    # Atomically: ./run.sh and tests poll for this file and must never read half a URL.
    path = Path(run_dir, "dashboard.url")
    tmp = path.with_name("dashboard.url.tmp")
    tmp.write_text(url + "\n")
    tmp.replace(path)
    return path


async def main_async(cfg: C.EvaluatorConfig) -> None:
    """Bind telemetry, follow weights, evaluate periodically until stopped."""
    torch.set_num_threads(cfg.torch_threads)
    spec = env_spec(cfg.env)
    net = build_network(spec, cfg.hidden, cfg.algo, **C.net_options(cfg)).eval()
    set_noise(net, False)  # evaluation acts with the mean weights of noisy layers
    logger = Logger(cfg.run_dir)
    started = time.time()
    monitor = RunMonitor(logger, num_slots=cfg.num_actors * cfg.envs_per_actor,
                         heartbeat_timeout=cfg.heartbeat_timeout, ladder_window=cfg.ladder_window,
                         started=started, info={"env": cfg.env, "algo": cfg.algo,
                                                   "run_dir": str(Path(cfg.run_dir).resolve())})
    # Before any socket: a refused dashboard address exits here, naming the flag to use.
    dashboard = Dashboard(lambda: monitor.state(time.time()), cfg.dashboard_host, cfg.insecure)
    socks = Sockets(cfg.insecure, cfg.keys)
    tel = socks.open(cfg, "evaluator", "telemetry")
    weights = socks.open(cfg, "evaluator", "weights")
    stop = asyncio.Event()
    install_stop(stop)
    latest: list[Weights] = []
    fresh = threading.Event()   # newer weights arrived
    halt = threading.Event()    # stop, as seen from the evaluation thread
    state = {"reached": False, "evaluated_version": (-1, -1)}  # (learner incarnation, version)

    async def receive_telemetry() -> None:
        while True:
            monitor.on_telemetry(await tel.recv_multipart(copy=False))

    async def receive_weights() -> None:
        while True:
            try:
                w = decode_weights(await recv_latest(weights))
                why = weights_mismatch(net, w.names, w.arrays)
                if why is not None:  # well-formed, but for another network: dropped, not a crash
                    raise WireError(why)
                latest[:] = [w]
                if (latest[0].incarnation, latest[0].version) != state["evaluated_version"]:
                    fresh.set()
            except WireError:
                monitor.rejected += 1

    def evaluation() -> None:
        # CPU-bound episodes off the event loop; one evaluation per period with the newest weights.
        protocol = protocol_for(cfg.env, cfg.eval_protocol)
        best_file = checkpoint.best_path(cfg.run_dir)
        best = checkpoint.best_score(best_file, protocol.name)  # a restarted evaluator keeps the run's best
        n = 0
        while not halt.is_set():
            fresh.wait()
            fresh.clear()
            if halt.is_set() or not latest or (latest[0].incarnation, latest[0].version) == state["evaluated_version"]:
                continue
            w = latest[0]
            load_arrays(net, w.names, w.arrays)
            res = evaluate(net, cfg.env, cfg.eval_episodes, cfg.eval_epsilon, cfg.seed + 7919 * n,
                           protocol.name, cfg.eval_max_frames)
            n += 1
            state["evaluated_version"] = (w.incarnation, w.version)
            now = time.time()
            stats = res.summary()  # protocol, episodes, mean, std, min, max (+ hns, return_5min/30min)
            summary = {"time": now, "elapsed_s": now - started, "learner_steps": w.version, **stats}
            monitor.last_eval = {"mean": res.mean, "version": w.version,
                                 **({"hns": stats["hns"]} if "hns" in stats else {})}
            logger.rows("eval", [summary])
            logger.rows("eval_episodes", [{"time": now, "learner_steps": w.version, "protocol": res.protocol,
                                           **row} for row in res.rows()])
            scalars = {"eval/return_mean": res.mean, "eval/return_max": stats["max"]}
            if "hns" in stats and not np.isnan(stats["hns"]):
                scalars["eval/hns"] = stats["hns"]
            for name, _ in protocol.score_marks:
                scalars[f"eval/{name}"] = stats[name]
            logger.write(scalars, w.version)
            if res.mean > best:  # these weights are the run's best so far: keep them for `play`
                best = res.mean
                save_atomic(best_checkpoint(net, cfg.env, cfg.hidden, w.version, res, cfg.algo,
                                                cfg.env_module, C.net_options(cfg)), best_file)
            if cfg.stop_at_return is not None and res.mean >= cfg.stop_at_return:
                state["reached"] = True
                Path(cfg.run_dir, "finished.json").write_text(json.dumps(summary))
                print(f"evaluator: mean return {res.mean:.1f} reached --stop-at-return "
                      f"{cfg.stop_at_return} after {summary['elapsed_s']:.1f}s", flush=True)
                return
            halt.wait(cfg.eval_period)

    def redraw(rows: list[dict]) -> bool:
        try:
            return write_learning_curves(cfg.run_dir, rows, cfg.env)
        finally:
            # Without it the evaluator's resident memory grew ~8%/h in the hour's soak (matplotlib's freed
            # memory left fragmented in this thread's arena); with it, flat (BENCHMARKS.md, soak).
            release_freed_memory()

    async def follow_evals() -> None:
        # The dashboard and the learning-curve files show eval.csv as it grows (with the rows of
        # earlier sessions of a resumed run), whatever the evaluation protocol writes into it.
        evals = CsvFollower(Path(cfg.run_dir, "eval.csv"))
        drawn, drawn_at, png_note = 0, 0.0, False
        while True:
            monitor.on_eval_rows(evals.poll())
            if len(monitor.evals) > drawn and time.monotonic() - drawn_at >= CURVE_MIN_INTERVAL_S:
                drawn, drawn_at = len(monitor.evals), time.monotonic()
                try:
                    png = await asyncio.to_thread(redraw, list(monitor.evals))
                except OSError as e:  # a full disk must not stop the evaluations
                    print(f"evaluator: cannot write the learning curve: {e}", flush=True)
                    png = True
                if not png and not png_note:
                    png_note = True
                    print("evaluator: matplotlib is not installed: learning_curve.png is not drawn "
                          "(learning_curve.html is)", flush=True)
            await asyncio.sleep(1.0)

    async def report() -> None:
        # On a terminal the status line is rewritten in place; into a pipe or a log, one line each time.
        live = sys.stdout.isatty()
        while True:
            await asyncio.sleep(cfg.report_period)
            line = monitor.progress_line(time.time())
            print(f"\r\x1b[K{line}" if live else line, end="" if live else "\n", flush=True)
            # Malformed telemetry and weights dropped so far (a climbing count: a bad or hostile peer).
            logger.write({"eval/rejected": monitor.rejected}, int(monitor.metrics.get("learner/steps", 0)))

    await dashboard.start(cfg.dashboard_port)
    url_file = _write_url(cfg.run_dir, dashboard.url)
    print(f"evaluator: dashboard at {dashboard.url}"
          + (f" (port {cfg.dashboard_port} is taken)" if dashboard.fell_back else ""), flush=True)
    try:
        await run_role(stop, [receive_telemetry(), receive_weights(), follow_evals(), report()], [evaluation],
                       on_stop=[halt, fresh], torch_threads=cfg.torch_threads)
    finally:
        url_file.unlink(missing_ok=True)  # no stale address for the next session to find
        await dashboard.close()
        socks.close()
        logger.close()


def main(argv: list[str] | None = None) -> None:
    """``apex-zmq evaluator``: run the evaluator."""
    cfg = C.parse(C.EvaluatorConfig, argv, "evaluator")
    C.save(cfg, cfg.run_dir, "config_evaluator")
    asyncio.run(main_async(cfg))


if __name__ == "__main__":
    main(sys.argv[1:])
