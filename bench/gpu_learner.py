"""The Python side of ``bench/gpu_check.sh``: learner figures on a GPU, each written as JSON.

    .venv/bin/python bench/gpu_learner.py info --out torch_info.json
    .venv/bin/python bench/gpu_learner.py standalone --device cuda --batch 512 --out standalone.json
    .venv/bin/python bench/gpu_learner.py pipeline --device cuda --batch 512 --out pipeline.json
    .venv/bin/python bench/gpu_learner.py pong-summary RUN_DIR --out pong.json

``standalone``: the learner's training step (``DQNLearner.step`` on the Nature dueling CNN for
ALE/Pong-v5, random uint8 batches already on the device, priorities and loss copied back every step
as the learner does) in several variants: ``fp32``; ``bf16`` (autocast and channels-last, what the
learner runs on CUDA); ``bf16_graph`` / ``fp32_graph`` (the same step captured whole in a CUDA graph,
Adam ``capturable``); ``bf16_compile`` (``torch.compile`` of the network, mode ``--compile-mode``),
``bf16_compile_max`` (max-autotune-no-cudagraphs), ``bf16_compile_ro`` (reduce-overhead); ``bf16_async``
(the learner program's own step: ``step_tensors`` with the priorities copied back behind an event, no sync
per step, ``learner.readback``) and ``bf16_async_compile`` (the same with ``--compile``: the loss's forward
and backward captured by torch.compile mode reduce-overhead, CUDA graphs; CUDA only). Each variant
is guarded: a failure is recorded in its entry and the next one runs; the JSON is rewritten after every
variant (an entry left ``running`` was cut off by the step's timeout).

``pipeline``: the learner program in a live system (replay server process, a producer process
inserting real Pong transitions, ``python -m learner.main --device D`` with the launcher's loader
and torch threads), its steps/s (median of its per-second telemetry) against the same step standalone
(``LearnerCore``'s network, amp and channels-last on one real sampled batch) = efficiency.
``bench/learner_pipeline.py`` measures the same on CPU only (no ``--device`` flag), hence this one.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, feed, live_endpoints, real_chunks, wait_for_metric  # noqa: E402

ENV = "ALE/Pong-v5"
VARIANTS = ("fp32", "bf16", "fp32_graph", "bf16_graph", "bf16_compile", "bf16_compile_max", "bf16_compile_ro",
            "bf16_async", "bf16_async_compile")
COMPILE_MODES = {"bf16_compile": None, "bf16_compile_max": "max-autotune-no-cudagraphs",
                 "bf16_compile_ro": "reduce-overhead"}
ASYNC_VARIANTS = {"bf16_async": False, "bf16_async_compile": True}  # name -> --compile


def write_json(path: str | Path, data: dict) -> None:
    """Atomically (a step's timeout may kill us mid-write)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def machine() -> str:
    try:
        from apex_zmq import cpu
        return cpu.detect().describe()
    except Exception as e:  # noqa: BLE001 - a header line must not stop a benchmark
        return f"? ({e})"


# ---------------------------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    import torch
    info = {"machine": machine(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    gpu_capability=f"{p.major}.{p.minor}", gpu_count=torch.cuda.device_count(),
                    bf16_supported=torch.cuda.is_bf16_supported(),
                    cudnn=torch.backends.cudnn.version())
    try:
        import triton  # noqa: F401 - torch.compile's GPU backend
        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    write_json(args.out, info)
    print(json.dumps(info))
    return 0


# ---------------------------------------------------------------------------------------- standalone
def learner_settings(algo: str = "dqn"):
    from apex_zmq import config as C
    return C.parse(C.LearnerConfig, ["--env", ENV, "--algo", algo], "learner")


def random_batch(spec, batch: int, device, channels_last: bool, seed: int):
    """A Batch of random uint8 frames and plausible targets, on ``device``."""
    import numpy as np
    import torch

    from learner.dqn import Batch
    g = torch.Generator().manual_seed(seed)
    obs = torch.randint(0, 256, (batch, *spec.obs_shape), dtype=torch.uint8, generator=g)
    nxt = torch.randint(0, 256, (batch, *spec.obs_shape), dtype=torch.uint8, generator=g)
    t = dict(obs=obs, next_obs=nxt, action=torch.randint(0, spec.num_actions, (batch,), generator=g),
             ret=torch.randn(batch, generator=g), disc=torch.full((batch,), 0.99 ** 3),
             weight=torch.rand(batch, generator=g) * 0.5 + 0.5)
    t = {k: v.to(device) for k, v in t.items()}
    if channels_last:
        for k in ("obs", "next_obs"):
            t[k] = t[k].contiguous(memory_format=torch.channels_last)
    return Batch(ids=np.arange(batch), **t)


def make_learner(spec, cfg, device, amp: bool, channels_last: bool):
    """The learning rule of ``cfg.algo`` as ``LearnerCore`` builds it."""
    from learner.algos import make_rule
    return make_rule(spec, cfg, device, amp, channels_last)


def graphed(learner, static, amp: bool):
    """A step function replaying the whole training step (forward, loss, backward, clip, Adam) as
    one CUDA graph; the batch is copied into the captured input tensors first."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from learner.dqn import double_dqn_td
    net, target = learner.net, learner.target
    from apex_zmq import optim
    # torch.optim's capturable variant, which a graph can replay: Adam's update is ours; torch's RMSprop puts
    # epsilon outside the square root (ours, the papers', inside): the same kernels' cost, another update
    h = learner.opt.hyper
    if isinstance(learner.opt, optim.Adam):
        opt = torch.optim.Adam(net.parameters(), lr=h["lr"], betas=h["betas"], eps=h["eps"], capturable=True)
    else:
        opt = torch.optim.RMSprop(net.parameters(), lr=h["lr"], alpha=h["alpha"], eps=h["eps"],
                                  centered=h["centered"], capturable=True)
    learner.opt = opt

    def body():
        # No autocast cache inside a graph capture (torch.cuda.graph's documented restriction).
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
            td = double_dqn_td(net, target, static).float()
        loss = (static.weight * F.smooth_l1_loss(td, torch.zeros_like(td), reduction="none")).mean()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), learner.grad_clip)
        opt.step()
        return td, loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: lazy state (Adam moments, cuDNN plans)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)  # grads are then allocated inside the graph and overwritten each replay
    with torch.cuda.graph(graph):
        td_out, loss_out = body()
    names = ("obs", "next_obs", "action", "ret", "disc", "weight")

    def step(b):
        if b is not static:
            for k in names:
                getattr(static, k).copy_(getattr(b, k), non_blocking=True)
        graph.replay()
        learner.steps += 1
        if learner.steps % learner.target_update == 0:
            learner.target.load_state_dict(learner.net.state_dict())  # in place: the graph sees it
        return td_out.detach().abs().cpu().numpy(), float(loss_out)
    return step


def measure(step, batches, seconds: float, min_steps: int, warmup: int, sync) -> dict:
    """Steps/s of ``step`` over alternating batches after ``warmup`` steps (which include any
    compilation or capture: reported as ``warmup_s``)."""
    t = time.perf_counter()
    loss = float("nan")
    for i in range(warmup):
        _, loss = step(batches[i % len(batches)])
    sync()
    warm = time.perf_counter() - t
    n, t0 = 0, time.perf_counter()
    while n < min_steps or time.perf_counter() - t0 < seconds:
        _, loss = step(batches[n % len(batches)])
        n += 1
    sync()
    dt = time.perf_counter() - t0
    return {"status": "ok", "steps_per_s": n / dt, "ms_per_step": 1000 * dt / n, "steps": n,
            "seconds": dt, "warmup_s": warm, "loss_finite": math.isfinite(loss)}


def async_step(learner, device, loss_every: int):
    """The learner program's step (``learner.main.train``'s): priorities and every ``loss_every``-th loss
    copied back without a sync, at most ``MAX_PENDING`` steps in flight; returns (step, sync)."""
    import torch

    from learner.main import MAX_PENDING
    from learner.readback import PendingUpdates, copier_for
    pending = PendingUpdates(copier_for(device, MAX_PENDING + 1), MAX_PENDING, loss_every)
    loss = [float("nan")]

    def take(updates) -> None:
        for u in updates:
            if u.loss is not None:
                loss[0] = u.loss

    def step(b):
        take(pending.push(b, learner.steps, learner.step_tensors(b)))
        return None, loss[0]

    def sync() -> None:
        take(pending.drain())
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step, sync


def run_variant(name: str, spec, cfg, device, batch: int, args) -> dict:
    import dataclasses

    import torch
    amp = name.startswith("bf16")
    channels_last = amp and spec.atari  # as LearnerCore: channels-last goes with mixed precision
    if ASYNC_VARIANTS.get(name):
        cfg = dataclasses.replace(cfg, compile=True)
    learner = make_learner(spec, cfg, device, amp, channels_last)
    batches = [random_batch(spec, batch, device, channels_last, seed) for seed in (1, 2)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step = learner.step
    extra = {}
    if name.endswith("_graph"):
        t = time.perf_counter()
        step = graphed(learner, random_batch(spec, batch, device, channels_last, 3), amp)
        extra["capture_s"] = time.perf_counter() - t  # 3 warm-up steps and the capture
    elif name in COMPILE_MODES:
        mode = COMPILE_MODES[name] if name != "bf16_compile" else (args.compile_mode or None)
        learner.net = torch.compile(learner.net, mode=mode)
        learner.target = torch.compile(learner.target, mode=mode)
        extra["compile_mode"] = mode or "default"
    elif name in ASYNC_VARIANTS:
        loss_every = cfg.loss_every if device.type == "cuda" else 1  # as LearnerCore.pending_updates
        step, sync = async_step(learner, device, loss_every)
        extra.update(compile=learner.compiled, loss_every=loss_every)
    # compiled: the first call compiles; reduce-overhead records its graphs on the next ones
    warmup = args.warmup + (2 if name in COMPILE_MODES else 3 if ASYNC_VARIANTS.get(name) else 0)
    res = measure(step, batches, args.seconds, args.min_steps, warmup, sync)
    return {**res, "amp": amp, "channels_last": channels_last, **extra}


def cmd_standalone(args: argparse.Namespace) -> int:
    import torch

    from apex_zmq.envs import env_spec
    from learner.main import pick_device
    started = time.monotonic()
    deadline = started + args.budget
    try:
        device = pick_device(args.device)
    except SystemExit as e:  # no CUDA: say so in the figures' file too
        write_json(args.out, {"device": args.device, "batch": args.batch, "status": "error", "error": str(e),
                              "variants": {}})
        raise
    torch.set_num_threads(args.threads)
    spec = env_spec(ENV)
    cfg = learner_settings(args.algo)
    names = [v for v in args.variants.split(",") if v]
    network = {"dqn": "Nature dueling CNN", "rainbow": "Nature CNN, C51 dueling noisy head",
               "iqn": "Nature CNN, IQN dueling head"}[args.algo]
    out = {"env": ENV, "algo": args.algo, "network": network, "device": str(device), "batch": args.batch,
           "threads": args.threads, "machine": machine(), "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
           "optimizer": cfg.optimizer, "variants": {}}
    inject = os.environ.get("APEX_GPU_INJECT_FAIL", "")
    print(f"standalone: {out['network']} batch={args.batch} device={device} ({out['gpu'] or out['machine']})",
          flush=True)
    for name in names:
        out["variants"][name] = {"status": "running"}
        write_json(args.out, out)
        left = deadline - time.monotonic()
        try:
            if name == inject:
                raise RuntimeError("injected failure (APEX_GPU_INJECT_FAIL)")
            if name not in VARIANTS:
                entry = {"status": "error", "error": f"unknown variant (known: {', '.join(VARIANTS)})"}
            elif cfg.algo != "dqn" and (name.endswith("_graph") or name in COMPILE_MODES):
                entry = {"status": "skipped", "reason": "the graphed and compiled steps are dqn's only"}
            elif (name.endswith("_graph") or ASYNC_VARIANTS.get(name)) and device.type != "cuda":
                entry = {"status": "skipped", "reason": "CUDA graphs need a CUDA device"}
            elif (name in COMPILE_MODES or ASYNC_VARIANTS.get(name)) and args.no_compile:
                entry = {"status": "skipped", "reason": "torch.compile off (--no-compile)"}
            elif left < (args.compile_min_s if name in COMPILE_MODES or ASYNC_VARIANTS.get(name)
                         else args.seconds + 3):
                entry = {"status": "skipped", "reason": f"time budget ({left:.0f}s left)"}
            else:
                entry = run_variant(name, spec, cfg, device, args.batch, args)
        except Exception as e:  # noqa: BLE001 - one variant's failure is a result, not the end
            traceback.print_exc()
            entry = {"status": "error", "error": f"{type(e).__name__}: {e}"[:800]}
        try:  # a variant that broke the CUDA context must not take the JSON with it
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            if name in COMPILE_MODES or ASYNC_VARIANTS.get(name):
                torch._dynamo.reset()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            entry["cleanup_error"] = f"{type(e).__name__}: {e}"[:400]
        out["variants"][name] = entry
        write_json(args.out, out)
        figure = f"{entry['steps_per_s']:.1f} steps/s ({entry['ms_per_step']:.2f} ms/step, warm-up " \
                 f"{entry['warmup_s']:.1f}s)" if entry["status"] == "ok" else \
                 f"{entry['status']}: {entry.get('error') or entry.get('reason')}"
        print(f"standalone {name}: {figure}", flush=True)
    ok = {k: v["steps_per_s"] for k, v in out["variants"].items() if v["status"] == "ok"}
    if ok:
        best = max(ok, key=ok.get)
        out["best"] = {"variant": best, "steps_per_s": ok[best]}
        if "bf16" in ok:  # the learner's own configuration on CUDA
            out["speedup_vs_bf16"] = {k: v / ok["bf16"] for k, v in ok.items()}
    out["elapsed_s"] = time.monotonic() - started
    write_json(args.out, out)
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------ pipeline
def launcher_threads(num_actors: int, device: str) -> tuple[int, int]:
    """(loader threads, torch threads) ``./run.sh`` gives the learner of a Pong run with
    ``num_actors`` actors on this machine (its ``plan_budgets`` where the launcher has one)."""
    from apex_zmq import config as C
    from apex_zmq import launch
    cfg = C.parse(C.LaunchConfig, ["--env", ENV, "--num-actors", str(num_actors), "--device", device], "run")
    plan = getattr(launch, "plan_budgets", None)
    if plan is None:
        return cfg.loader_threads, cfg.torch_threads
    budget = plan(cfg, os.cpu_count() or 1, device == "cuda")["learner"]
    return cfg.loader_threads, budget.torch_threads


def in_system(args, chunks: list, loaders: int, threads: int) -> dict:
    """Median learner steps/s (and other telemetry) of the learner program in a live system."""
    from apex_zmq.wire import decode_telemetry
    ep, flags, tel = live_endpoints()
    spawn = mp.get_context("spawn")
    throttle, stop, out = spawn.Event(), spawn.Event(), spawn.Queue()
    procs: list = []
    prod = None
    logs = Path(args.log_dir) if args.log_dir else None
    if logs:
        logs.mkdir(parents=True, exist_ok=True)

    from apex_zmq.launch import role_module

    def start(role: str, extra: list[str], threads: int) -> subprocess.Popen:
        # As ./run.sh starts a role: its torch threads, and the same number as the OpenMP/MKL/OpenBLAS floor.
        f = open(logs / f"pipeline_{role}.log", "wb") if logs else None
        env = {**os.environ, **{v: str(threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                          "OPENBLAS_NUM_THREADS")}}
        return subprocess.Popen([sys.executable, "-m", role_module(role), *common, *extra,
                                 "--torch-threads", str(threads)], cwd=ROOT, env=env,
                                stdout=f, stderr=subprocess.STDOUT if f else None)

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--env", ENV, "--run-dir", tmp, *flags]
        try:
            procs.append(start("replay_server", ["--batch-size", str(args.batch), "--capacity", str(args.fill),
                                                 "--min-size", str(args.fill)], 1))
            prod = spawn.Process(target=feed, args=(ep["experience"], chunks, args.fill, args.insert_rate,
                                                    throttle, stop, out), daemon=True)
            prod.start()
            wait_for_metric(tel, "replay/size", args.fill, timeout=args.timeout)
            filled = time.monotonic()
            throttle.set()
            procs.append(start("learner", ["--loader-threads", str(loaders), "--device", args.device,
                                           "--amp", "auto", "--checkpoint-period", "1e9"], threads))
            wait_for_metric(tel, "learner/steps", args.warmup_steps, timeout=args.timeout)
            warmed = time.monotonic()
            series: dict[str, dict[str, list[float]]] = {}
            t_end = time.monotonic() + args.seconds
            while time.monotonic() < t_end:
                if tel.poll(200):
                    t = decode_telemetry(tel.recv_multipart())
                    if t.role in ("learner", "replay"):
                        for k, v in t.metrics.items():
                            if isinstance(v, (int, float)) and math.isfinite(v):
                                series.setdefault(t.role, {}).setdefault(k, []).append(float(v))
            rates = series.get("learner", {}).get("learner/steps_per_s", [])
            if not rates:
                raise RuntimeError("no learner telemetry while measuring")
            return {"learner_steps_per_s": statistics.median(rates), "reports": len(rates),
                    "wait_fraction": statistics.median(series["learner"].get("perf/learner_wait_fraction", [math.nan])),
                    "fill_s": filled - t0, "learner_startup_s": warmed - filled,
                    "telemetry_medians": {role: {k: statistics.median(v) for k, v in m.items()}
                                          for role, m in series.items()}}
        finally:
            stop.set()
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
            if prod is not None:
                prod.join(5)
                if prod.is_alive():
                    prod.kill()
            tel.close(0)


def standalone_real(args, chunks: list, threads: int) -> dict:
    """The learner's own step (``LearnerCore``: network, amp, channels-last) on real sampled batches
    built the way the loader builds them, no I/O."""
    import torch

    from apex_zmq import config as C
    from learner.dqn import batch_from_sample
    from learner.main import LearnerCore
    from replay_server.replay import PrioritizedReplay
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = C.parse(C.LearnerConfig, ["--env", ENV, "--run-dir", tmp, "--device", args.device,
                                        "--amp", "auto", "--torch-threads", str(threads)], "learner")
        core = LearnerCore(cfg)
    replay = PrioritizedReplay(100_000)
    for c in chunks:
        replay.add(c)
    cuda = core.device.type == "cuda"
    batches = [batch_from_sample(replay.sample(args.batch, 0.4), core.spec.num_actions, core.device, pin=cuda,
                                 channels_last=core.channels_last,
                                 obs_spec=(core.spec.obs_shape, core.spec.obs_dtype)) for _ in range(2)]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    res = measure(core.learner.step, batches, args.standalone_seconds, 5, 5, sync)
    return {**res, "amp": core.amp, "channels_last": core.channels_last}


def cmd_pipeline(args: argparse.Namespace) -> int:
    from learner.main import pick_device
    try:
        pick_device(args.device)  # --device cuda without CUDA: stop here, not after the fill
    except SystemExit as e:
        write_json(args.out, {"device": args.device, "batch": args.batch, "status": "error", "error": str(e)})
        raise
    launch_loaders, launch_threads = launcher_threads(args.num_actors, args.device)
    loaders = args.loader_threads or launch_loaders
    threads = args.threads or launch_threads
    out = {"env": ENV, "network": "Nature dueling CNN", "device": args.device, "batch": args.batch,
           "loader_threads": loaders, "torch_threads": threads, "launcher_loader_threads": launch_loaders,
           "fill": args.fill, "insert_rate": args.insert_rate, "seconds": args.seconds, "machine": machine(),
           "source": "bench/gpu_learner.py pipeline",
           "learner_pipeline_flags": args.bench_flags.split() if args.bench_flags else None}
    print(f"pipeline: batch={args.batch} device={args.device} loader_threads={loaders} torch_threads={threads}",
          flush=True)
    out["status"] = "running"
    write_json(args.out, out)
    try:
        t = time.monotonic()
        chunks = real_chunks(ENV, args.pool, args.envs, acting_dtype="float32")  # no int8 set-up to wait for
        out["chunks"] = {"count": len(chunks), "transitions": sum(len(c.action) for c in chunks),
                         "envs": args.envs, "seconds": time.monotonic() - t}
        print(f"pipeline: {len(chunks)} real chunks ({out['chunks']['transitions']} transitions) in "
              f"{out['chunks']['seconds']:.1f}s", flush=True)
        out["system"] = in_system(args, chunks, loaders, threads)
        print(f"pipeline: in the system {out['system']['learner_steps_per_s']:.1f} steps/s, waiting for data "
              f"{out['system']['wait_fraction']:.1%}", flush=True)
        write_json(args.out, out)
        out["standalone"] = standalone_real(args, chunks, threads)
        print(f"pipeline: standalone {out['standalone']['steps_per_s']:.1f} steps/s", flush=True)
        out["learner_steps_per_s"] = out["system"]["learner_steps_per_s"]
        out["standalone_steps_per_s"] = out["standalone"]["steps_per_s"]
        out["efficiency"] = out["learner_steps_per_s"] / out["standalone_steps_per_s"]
        out["status"] = "ok"
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        out["status"] = "error"
        out["error"] = f"{type(e).__name__}: {e}"[:800]
    write_json(args.out, out)
    if out["status"] == "ok":
        print(f"learner_steps_per_s={out['learner_steps_per_s']:.1f} "
              f"standalone_steps_per_s={out['standalone_steps_per_s']:.1f} efficiency={out['efficiency']:.2f}")
        return 0
    return 1


def parse_bench_line(text: str) -> dict:
    """``learner_steps_per_s=x standalone_steps_per_s=y efficiency=z`` (learner_pipeline.py's last line)."""
    for line in reversed(text.strip().splitlines()):
        kv = dict(p.split("=", 1) for p in line.split() if "=" in p)
        if "efficiency" in kv:
            try:
                return {k: float(v) for k, v in kv.items()
                        if k in ("learner_steps_per_s", "standalone_steps_per_s", "efficiency")}
            except ValueError:
                return {}
    return {}


def cmd_parse_pipeline(args: argparse.Namespace) -> int:
    """Turn bench/learner_pipeline.py's output (a log) into pipeline.json."""
    text = Path(args.log).read_text(errors="replace")
    figures = parse_bench_line(text)
    out = {"source": f"bench/learner_pipeline.py {args.flags}".strip(), "device": args.device,
           "batch": args.batch, "status": "ok" if len(figures) == 3 else "error", **figures}
    if out["status"] != "ok":
        out["error"] = "no 'learner_steps_per_s=... efficiency=...' line in its output"
    write_json(args.out, out)
    return 0 if out["status"] == "ok" else 1


# -------------------------------------------------------------------------------------- pong summary
def _num(s: str) -> float | None:
    try:
        v = float(s)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def cmd_pong_summary(args: argparse.Namespace) -> int:
    run = Path(args.run_dir)
    out: dict = {"run_dir": str(run), "env": args.env, "max_seconds": args.max_seconds}
    evals = []
    if (run / "eval.csv").exists():
        with open(run / "eval.csv", newline="") as f:
            evals = list(csv.DictReader(f))
    means = [(_num(r.get("learner_steps")), _num(r.get("elapsed_s")), _num(r.get("mean"))) for r in evals]
    means = [m for m in means if m[2] is not None]
    out["eval_rows"] = len(means)
    if means:
        out["first_eval_mean"] = means[0][2]
        out["last_eval_mean"] = means[-1][2]
        out["best_eval_mean"] = max(m[2] for m in means)
        out["last_eval_learner_steps"] = means[-1][0]
        out["last_eval_elapsed_s"] = means[-1][1]
        out["evals"] = [{"learner_steps": s, "elapsed_s": t, "mean": m} for s, t, m in means]
    tags: dict[str, list[tuple[float, float]]] = {}
    if (run / "metrics.csv").exists():
        with open(run / "metrics.csv", newline="") as f:
            for r in csv.DictReader(f):
                v, t = _num(r.get("value")), _num(r.get("time"))
                if v is not None and t is not None:
                    tags.setdefault(r["tag"], []).append((t, v))
    # Rates: median over the second half of the run (after start-up and the replay's fill).
    rates = {}
    for tag, pts in tags.items():
        if tag.endswith("_per_s") or tag.endswith("wait_fraction"):
            t0, t1 = pts[0][0], pts[-1][0]
            late = [v for t, v in pts if t >= (t0 + t1) / 2] or [v for _, v in pts]
            rates[tag] = statistics.median(late)
    out["median_rates_second_half"] = rates
    for tag in ("learner/steps", "replay/size", "replay/inserted", "replay/sampled"):
        if tag in tags:
            out[tag.replace("/", "_")] = tags[tag][-1][1]
    out["metrics_tags"] = len(tags)
    out["status"] = "ok" if means else "error"
    if not means:
        out["error"] = "no evaluation rows in eval.csv"
    write_json(args.out, out)
    print(json.dumps({k: v for k, v in out.items() if k not in ("evals", "median_rates_second_half")}))
    return 0 if means else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="torch, CUDA and GPU facts")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_info)
    p = sub.add_parser("standalone", help="training-step variants on random batches")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--variants", default="fp32,bf16,bf16_graph,bf16_compile")
    p.add_argument("--algo", default="dqn", choices=("dqn", "rainbow", "iqn"),
                   help="learning rule (graphed and compiled variants: dqn only)")
    p.add_argument("--seconds", type=float, default=4.0, help="measured seconds per variant")
    p.add_argument("--min-steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile-mode", default="", help="mode of bf16_compile (empty: default)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--budget", type=float, default=80.0, help="seconds for all variants; a variant that "
                   "would not fit is skipped")
    p.add_argument("--compile-min-s", type=float, default=30.0, help="least budget left to start a compile")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_standalone)
    p = sub.add_parser("pipeline", help="learner program in a live system against standalone")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--num-actors", type=int, default=12, help="as the Pong run (sizes the launcher's defaults)")
    p.add_argument("--loader-threads", type=int, default=0, help="0: what the launcher gives the learner")
    p.add_argument("--threads", type=int, default=0, help="learner torch threads (0: the launcher's)")
    p.add_argument("--fill", type=int, default=50_000)
    p.add_argument("--pool", type=int, default=12, help="real chunks the producer cycles through")
    p.add_argument("--envs", type=int, default=32, help="environments making those chunks")
    p.add_argument("--insert-rate", type=float, default=1000.0)
    p.add_argument("--seconds", type=float, default=15.0, help="measured seconds in the system")
    p.add_argument("--standalone-seconds", type=float, default=5.0)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--timeout", type=float, default=120.0, help="for the fill and the learner's start")
    p.add_argument("--log-dir", default="", help="role logs here")
    p.add_argument("--bench-flags", default="", help="the flags bench/learner_pipeline.py takes (recorded)")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_pipeline)
    p = sub.add_parser("parse-pipeline", help="bench/learner_pipeline.py's output to JSON")
    p.add_argument("log")
    p.add_argument("--flags", default="")
    p.add_argument("--device", default="")
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_parse_pipeline)
    p = sub.add_parser("pong-summary", help="eval.csv and metrics.csv of a run, summarized")
    p.add_argument("run_dir")
    p.add_argument("--env", default=ENV)
    p.add_argument("--max-seconds", type=float, default=0.0)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_pong_summary)
    args = ap.parse_args()
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
