"""Typed configuration, one dataclass per role, from CLI flags and an optional TOML (or JSON) file.

Precedence, lowest first: field defaults, the preset of the chosen ``--env`` and ``--algo`` (see
``preset_for``), the algorithm preset (``--preset``), the ``--config`` file, explicit flags. Each role
saves what it ran with as JSON in the run directory.
Every socket address lives here and nowhere else.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import sys
import tomllib
import traceback
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

LOOPBACK = "127.0.0.1"
DEFAULT_PORTS = {"experience": 5551, "samples": 5552, "priorities": 5553, "weights": 5554,
                 "telemetry": 5555, "gradients": 5557}
RELAY_PORT = 5556  # a relay's local weights endpoint (./run.sh starts no relay)


def endpoint(host: str, port: int) -> str:
    """A tcp endpoint string."""
    return f"tcp://{host}:{port}"


# The endpoints each replay shard binds (shard i: these at an offset, see ``shard_endpoint``).
SHARD_ENDPOINTS = ("experience", "samples", "priorities")


def shard_endpoint(ep: str, shard: int, port_step: int) -> str:
    """Replay shard ``shard``'s address for the base endpoint ``ep``: a tcp port moved up by
    ``shard * port_step``, an ipc/inproc name suffixed ``-<shard>``; shard 0 is ``ep`` itself (so one
    shard binds exactly the endpoints it always did). A tcp endpoint without a fixed port (``*``, 0)
    cannot be offset: ``ValueError``."""
    if shard == 0:
        return ep
    if ep.startswith(("ipc://", "inproc://")):
        return f"{ep}-{shard}"
    head, sep, port = ep.rpartition(":")
    if not ep.startswith("tcp://") or not sep or not port.isdigit() or int(port) == 0:
        raise ValueError(f"{ep}: replay shards need a tcp endpoint with a fixed port (or ipc/inproc)")
    moved = int(port) + shard * port_step
    if moved > 65535:
        raise ValueError(f"{ep}: shard {shard} would use port {moved} (> 65535); lower --shard-port-step")
    return f"{head}:{moved}"


def shard_endpoints(cfg: Any, name: str) -> list[str]:
    """Every replay shard's endpoint for ``name`` (one of ``SHARD_ENDPOINTS``), shard 0 first."""
    return [shard_endpoint(getattr(cfg, name), i, cfg.shard_port_step) for i in range(cfg.replay_shards)]


def for_shard(cfg: Any, shard: int) -> Any:
    """A copy of ``cfg`` whose replay endpoints are replay shard ``shard``'s (the ones it binds)."""
    return dataclasses.replace(cfg, **{name: shard_endpoint(getattr(cfg, name), shard, cfg.shard_port_step)
                                       for name in SHARD_ENDPOINTS})


def loopback_endpoints(base_port: int) -> dict[str, str]:
    """Every socket endpoint on loopback from ``base_port`` upwards, at the default ports' offsets
    (tests and ``--port-base``; ``base_port + 5`` stays free, as the relay's port is by default)."""
    first = min(DEFAULT_PORTS.values())
    return {name: endpoint(LOOPBACK, base_port + port - first) for name, port in DEFAULT_PORTS.items()}


# The kernel buffer settings (bytes; apex_zmq/flow.py). Below MIN_BUFFER Linux would hold its own floor
# (~4.5 KiB), not twice the value given, and the bounds computed from the value would not hold.
BUFFER_FIELDS = ("experience_buffer", "samples_buffer", "priorities_buffer", "weights_buffer", "telemetry_buffer",
                 "gradients_buffer")
MIN_BUFFER = 4096


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


# Learning rules (--algo); learner/algos.py has one factory for each. The first three learn from the
# replay (Ape-X); the asynchronous family (Mnih et al. 2016) has no replay server: actor-learners push
# gradients of their own experience and the learner applies them as a parameter server.
REPLAY_ALGOS = ("dqn", "rainbow", "iqn")
ASYNC_ALGOS = ("a3c", "nstep_q", "onestep_q", "onestep_sarsa")
ALGOS = REPLAY_ALGOS + ASYNC_ALGOS


def is_async(cfg: Any) -> bool:
    """Whether ``cfg.algo`` is of the asynchronous family (no replay server, gradients to the learner)."""
    return cfg.algo in ASYNC_ALGOS


@dataclass
class Common:
    """Settings every role shares."""

    env: str = _f("ALE/Pong-v5", "gymnasium id (CartPole-v1) or ALE id (ALE/Pong-v5); any env with a Discrete "
                                 "action space and a 1-D Box or uint8 image observation")
    env_module: str = _f("", "Python module(s) to import before --env is made, comma-separated: packages that "
                             "register gymnasium envs (as RL Zoo's gym packages do); imported by every role, "
                             "from the working directory or PYTHONPATH")
    run_dir: str = _f("", "directory for config, logs, checkpoints and metrics (default: runs/<env>); "
                          "running the same command again resumes the run in it")
    seed: int = _f(0, "base random seed")
    experience: str = _f(endpoint(LOOPBACK, DEFAULT_PORTS["experience"]),
                         "actors -> replay experience endpoint (bound by the replay server)")
    samples: str = _f(endpoint(LOOPBACK, DEFAULT_PORTS["samples"]),
                      "replay -> learner sample batches endpoint (bound by the replay server)")
    priorities: str = _f(endpoint(LOOPBACK, DEFAULT_PORTS["priorities"]),
                         "learner -> replay priority updates endpoint (bound by the replay server)")
    weights: str = _f(endpoint(LOOPBACK, DEFAULT_PORTS["weights"]),
                      "learner -> actors/evaluator weights endpoint (bound by the learner)")
    telemetry: str = _f(endpoint(LOOPBACK, DEFAULT_PORTS["telemetry"]),
                        "every role -> evaluator telemetry endpoint (bound by the evaluator)")
    gradients: str = _f(endpoint(LOOPBACK, DEFAULT_PORTS["gradients"]),
                        "actor-learners -> learner gradients endpoint (bound by the learner; asynchronous "
                        "algorithms only)")
    # Kernel buffers (bytes given to SO_SNDBUF and SO_RCVBUF of each socket; Linux holds up to twice that;
    # 0: the OS's autotuning, up to net.ipv4.tcp_wmem/tcp_rmem's maximum, 4 + 32 MiB by default). They bound
    # the bytes in flight between two roles where the high-water marks count only messages (apex_zmq/flow.py,
    # PROTOCOL.md 2.4). Larger: more throughput over a link with a long round trip, more batches in flight.
    experience_buffer: int = _f(65536, "kernel buffer of the experience sockets, bytes (0: the OS's autotuning)")
    samples_buffer: int = _f(65536, "kernel buffer of the samples sockets, bytes: with --prefetch it bounds the "
                                    "batches in flight to the learner (0: the OS's autotuning)")
    priorities_buffer: int = _f(8192, "kernel buffer of the priorities sockets, bytes (0: the OS's autotuning)")
    weights_buffer: int = _f(262144, "kernel buffer of the weights sockets (and a relay's), bytes (0: the OS's "
                                     "autotuning)")
    telemetry_buffer: int = _f(16384, "kernel buffer of the telemetry sockets, bytes (0: the OS's autotuning)")
    gradients_buffer: int = _f(262144, "asynchronous algorithms: kernel buffer of the gradients sockets, bytes "
                                       "(0: the OS's autotuning)")
    insecure: bool = _f(False, "allow binding a non-loopback address without CURVE keys")
    keys: str = _f("", "CURVE key directory from `apex-zmq keys DIR`: every socket is then encrypted "
                       "and only authorized client keys may connect (empty: no CURVE)")
    algo: Literal[ALGOS] = _f("dqn", "learning rule (learner/algos.py): dqn = double DQN, dueling, n-step, PER "
                                    "(Horgan et al. 2018); rainbow = C51 + noisy nets + dueling + double + "
                                    "n-step + PER (Hessel et al. 2018); iqn = implicit quantile network "
                                    "(Dabney et al. 2018); asynchronous, no replay (Mnih et al. 2016): "
                                    "a3c = advantage actor-critic, nstep_q = n-step Q, onestep_q = one-step "
                                    "Q, onestep_sarsa = one-step Sarsa; every role builds the network the "
                                    "rule needs")
    preset: Literal["none", "rainbow", "rainbow-iqn"] = _f(
        "none", "algorithm preset over the env's: rainbow (Hessel et al.'s alpha 0.5, beta 0.4 annealed to 1, "
                "Adam eps 1.5e-4) or rainbow-iqn (the seed's Rainbow-IQN Ape-X: iqn, noisy, dueling, Adam 5e-5 "
                "eps 3.125e-4, alpha 0.2, beta 0.4); a config file and flags override it")
    atoms: int = _f(51, "rainbow: atoms of the value distribution")
    v_min: float = _f(-10.0, "rainbow: lowest atom (return units, after clipping)")
    v_max: float = _f(10.0, "rainbow: highest atom")
    noisy: Literal["auto", "on", "off"] = _f("auto", "NoisyNet linear layers in the head (auto: on for "
                                                     "rainbow, off for iqn; dqn has none)")
    sigma0: float = _f(0.5, "NoisyNet factorised-noise sigma_0")
    dueling: bool = _f(True, "dqn and iqn: dueling head, else one head (rainbow is always dueling)")
    n_cos: int = _f(64, "iqn: cosine features of the quantile embedding")
    iqn_n: int = _f(64, "iqn: quantile samples N of the online network in the loss")
    iqn_n_prime: int = _f(64, "iqn: quantile samples N' of the target network in the loss")
    iqn_k: int = _f(32, "iqn: quantile samples K averaged to act")
    kappa: float = _f(1.0, "iqn: Huber threshold of the quantile-Huber loss")
    hidden: int = _f(512, "hidden units of the dueling head (and of the MLP torso)")
    n_step: int = _f(3, "steps in the n-step return")
    gamma: float = _f(0.99, "discount per agent step")
    num_actors: int = _f(0, "actor processes in the whole run, sizing the epsilon ladder "
                            "(0: ./run.sh starts cores - 2, at least 1; a lone actor counts 1)")
    envs_per_actor: int = _f(32, "environments each actor process steps as one batch")
    telemetry_period: float = _f(1.0, "seconds between telemetry reports")
    replay_shards: int = _f(1, "replay server processes, each its own prioritized replay (sum-tree, FIFO, "
                               "incarnation): shard i binds --experience, --samples and --priorities moved up "
                               "by i x --shard-port-step ports; actors spread chunks over them, the learner "
                               "draws each batch from one shard with probability proportional to its total "
                               "priority (PROTOCOL.md)")
    shard_port_step: int = _f(100, "ports between one replay shard's endpoints and the next's (--replay-shards)")
    torch_threads: int = _f(1, "intra-op threads for torch in each worker thread of this process (./run.sh "
                              "sets it per role from its core budget: see --learner-threads)")


@dataclass
class ActorConfig(Common):
    """One actor process: K envs, batched inference, n-step transitions with initial priorities."""

    actor_index: int = _f(0, "index of this actor process, 0..num_actors-1")
    eps_base: float = _f(0.4, "epsilon ladder base (Ape-X: 0.4)")
    eps_alpha: float = _f(7.0, "epsilon ladder exponent (Ape-X: 7)")
    chunk_steps: int = _f(16, "vector-env steps per experience chunk (chunk = steps x envs transitions)")
    env_threads: int = _f(1, "ale-py threads stepping each env group of this actor")
    # Off by default: measured under load (BENCHMARKS.md, "Frames stored once"), it stores 24-32% fewer bytes
    # per Atari transition but a sampled batch needs ~3.5x more frame blobs, so the replay's sample + update
    # CPU roughly doubled and the sample message grew 1.7x: the replay server is what bounds a GPU learner.
    frames_once: bool = _f(False, "Atari: send each new frame once and observations as stacks of frame "
                                  "references (the wire's stack layout: a quarter to a third less replay memory, ~2x the "
                                  "replay's sampling CPU); off: each observation's whole stack")
    frames_hc: int = _f(0, "with --frames-once: lz4 high-compression level of the frames, 1-12 (0: lz4's fast "
                           "mode). 4: frames about a fifth smaller (Pong, MsPacman) for ~10x the compression CPU")
    env_groups: int = _f(2, "Atari: groups the K envs are split into; one group steps while the "
                            "network acts on the next (1: no overlap)")
    exploration: Literal["auto", "ladder", "noisy", "both"] = _f(
        "auto", "ladder: Ape-X's epsilon ladder; noisy: the network's noisy layers, resampled every step for "
                "every env slot, epsilon 0; both (auto: both with noisy layers, else ladder)")
    acting_dtype: Literal["auto", "float32", "bfloat16", "int8"] = _f(
        "auto", "number format of the actor's network copy (auto: int8 for Atari on x86 CPUs, with "
                "7-bit activations where the CPU lacks VNNI; else bfloat16 where native, else float32)")
    max_actor_steps: int = _f(0, "stop after this many vector steps (0: run until stopped)")
    t_max: int = _f(5, "asynchronous algorithms: vector steps of the K envs per gradient (t_max)")
    eps_anneal_frames: int = _f(4_000_000, "asynchronous Q algorithms: frames (agent steps x frame-skip, of "
                                           "this actor-learner's envs) over which each env slot's epsilon "
                                           "falls from 1 to its final value, drawn from {0.1, 0.01, 0.5} "
                                           "with probabilities {0.4, 0.3, 0.3}")
    entropy_beta: float = _f(0.01, "a3c: weight of the policy-entropy bonus")
    value_coef: float = _f(0.5, "a3c: weight of the value loss (0.5 x squared advantage)")
    gradient_dtype: Literal["float32", "bfloat16"] = _f("float32", "asynchronous algorithms: number format "
                                                                   "of the gradients sent to the learner")
    restart: int = _f(0, "times this actor has been restarted (./run.sh's supervisor sets it); part of "
                         "the seed of its envs and exploration, so a restarted actor plays fresh games")


@dataclass
class ReplayConfig(Common):
    """The replay server: prioritized storage, sampling and priority updates."""

    capacity: int = _f(2_000_000, "transitions kept (FIFO eviction)")
    alpha: float = _f(0.6, "priority exponent")
    beta: float = _f(0.4, "importance-sampling exponent")
    beta_anneal: int = _f(0, "batches over which beta rises to 1 (0: constant)")
    batch_size: int = _f(512, "transitions per sampled batch")
    min_size: int = _f(50_000, "transitions stored before sampling starts")
    prefetch: int = _f(4, "sampled batches queued towards the learner (send high-water mark)")
    samples_per_insert: float = _f(0.0, "sampled transitions per inserted one that sampling is held to "
                                        "(Reverb's SampleToInsertRatio; 0: off, as in Ape-X)")
    spi_tolerance: float = _f(0.0, "sampled transitions by which sampling may run ahead of or behind "
                                   "--samples-per-insert (0: 4 batches)")
    spi_block_inserts: bool = _f(False, "with --samples-per-insert: also stop taking experience while the "
                                        "actors run ahead of the ratio (they then wait on their send queues)")
    snapshot_period: float = _f(0.0, "seconds between atomic replay snapshots to <run_dir>/replay/"
                                     "snapshot.npz (shard i > 0: snapshot-<i>.npz), restored when the "
                                     "server restarts (0: off)")
    shard: int = _f(0, "which replay shard this server is, 0..--replay-shards - 1 (./run.sh sets it): it "
                       "binds that shard's endpoints")


@dataclass
class LearnerConfig(Common):
    """The learner: double DQN with a dueling network and prioritized n-step targets."""

    optimizer: Literal["adam", "rmsprop"] = _f("adam", "optimizer of the replay learners: adam, or rmsprop = "
                                                       "the Ape-X paper's centered RMSProp (epsilon inside "
                                                       "the square root); the asynchronous family always "
                                                       "uses its shared RMSProp")
    adam_eps: float = _f(1.5e-4, "Adam's epsilon")
    lr: float = _f(0.00025 / 4, "learning rate")
    target_update: int = _f(2500, "learner steps between target network syncs")
    grad_clip: float = _f(40.0, "gradient norm clip (0: no clipping)")
    weights_period: float = _f(2.0, "seconds between weight broadcasts")
    checkpoint_period: float = _f(60.0, "seconds between checkpoints")
    loader_threads: int = _f(2, "threads decoding and decompressing batches ahead of training (0: the training "
                                "thread decodes each batch itself, the fastest for a small network on few cores)")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "training device")
    amp: Literal["auto", "on", "off"] = _f("auto", "bf16 mixed precision and channels-last convolutions "
                                                   "(auto: on for cuda)")
    max_learner_steps: int = _f(0, "stop after this many learner steps (0: run until stopped)")
    loss_every: int = _f(50, "learner steps between reads of the training loss on CUDA (copied to the host "
                             "behind the step, never waited for; on the CPU every step's is read)")
    compile: bool = _f(False, "CUDA only: capture the training step's loss, forward and backward, with "
                              "torch.compile mode reduce-overhead (replayed as CUDA graphs; the first steps "
                              "compile for tens of seconds, each new batch size recompiles); refused on the CPU")
    max_staleness: int = _f(32, "asynchronous algorithms: gradients computed more than this many updates "
                                "ago (weights versions) are dropped and counted")
    rmsprop_alpha: float = _f(0.95, "RMSProp's decay of its squared-gradient statistics (--optimizer rmsprop; "
                                    "the asynchronous family's shared RMSProp: 0.99 in its presets)")
    rmsprop_eps: float = _f(1.5e-7, "RMSProp's epsilon, added inside the square root as TensorFlow does "
                                    "(the asynchronous family's presets: 1e-5)")


@dataclass
class EvaluatorConfig(Common):
    """The evaluator: evaluation episodes with the latest weights, metrics, progress report."""

    eval_episodes: int = _f(10, "episodes per evaluation (run side by side)")
    eval_period: float = _f(30.0, "seconds between evaluations")
    eval_epsilon: float = _f(0.001, "epsilon during evaluation")
    eval_protocol: Literal["classic", "sticky", "saber"] = _f(
        "classic", "Atari evaluation protocol: classic (up to 30 no-op starts, 108k-frame cap, minimal "
                   "actions), sticky (ALE v5: repeat-action probability 0.25), saber (sticky, 18 actions, "
                   "ends after 5 min without reward, 100 h cap, 5/30-min returns); other envs: plain")
    eval_max_frames: int = _f(0, "cap on an Atari evaluation episode in emulator frames, 4 per agent step "
                                 "(0: the protocol's cap)")
    stop_at_return: Optional[float] = _f(None, "stop the run when the mean evaluation return reaches this")
    report_period: float = _f(5.0, "seconds between progress lines on the terminal")
    dashboard_host: str = _f(LOOPBACK, "address the dashboard's HTTP server binds (a non-loopback one "
                                       "needs --insecure: the page has no authentication)")
    dashboard_port: int = _f(8080, "dashboard port (0: any free port; a taken port also falls back to a "
                                   "free one); the URL is printed and written to <run_dir>/dashboard.url")
    heartbeat_timeout: float = _f(10.0, "seconds of silence after which the dashboard marks a role down")
    ladder_window: int = _f(10, "recent episodes per env slot averaged on the dashboard's epsilon ladder")


@dataclass
class RelayConfig(Common):
    """A weights relay on one actor host: one subscription to the learner, re-published locally."""

    relay_weights: str = _f(endpoint(LOOPBACK, RELAY_PORT),
                            "endpoint the relay binds for this host's actors and evaluator (their --weights)")


@dataclass
class LaunchConfig(ActorConfig, ReplayConfig, LearnerConfig, EvaluatorConfig):
    """``./run.sh``: all roles on this machine, supervised; takes every role's flags and passes them on."""

    port_base: int = _f(0, "put all five endpoints on loopback ports from here (0: use the endpoints)")
    learner_threads: int = _f(0, "torch threads of the learner (0: the cores left after the actors, replay "
                                 "server and evaluator get one each, at least 1; 1 with a GPU); every other "
                                 "role gets one core and one torch thread")
    max_restarts: int = _f(5, "restarts of one role in a row before the run is given up")
    max_seconds: float = _f(0.0, "stop the whole run after this many seconds (0: no limit)")


ROLE_CONFIGS: dict[str, type] = {"actor": ActorConfig, "replay_server": ReplayConfig,
                                 "learner": LearnerConfig, "evaluator": EvaluatorConfig}
# Programs run on their own only: ./run.sh (one host) neither starts them nor takes their flags.
STANDALONE_CONFIGS: dict[str, type] = {"relay": RelayConfig}

# Presets by env: values that make each family train well out of the box. Gymnasium envs other than
# ALE's (CartPole, --env-module envs) start from the classic-control one: small nets, fast evaluations.
_CLASSIC: dict[str, Any] = dict(
    hidden=64, envs_per_actor=8, chunk_steps=8, capacity=50_000, batch_size=128, min_size=500,
    lr=1e-3, target_update=250, weights_period=0.25, checkpoint_period=10.0, eval_period=1.0,
    eval_episodes=10, eval_epsilon=0.0, report_period=2.0, prefetch=8, loader_threads=0,
    eps_base=0.4, eps_alpha=7.0, n_step=3, gamma=0.99,
    # Sample batches of ~11 KB: with 16 KiB given (Linux holds 32 KiB a side) the kernels held at most 48 KiB
    # of them in a CartPole run, where autotuned buffers held 2.8 MB (~260 batches) and priorities lagged so.
    samples_buffer=16384, experience_buffer=16384)
PRESETS: dict[str, dict[str, Any]] = {
    "classic": _CLASSIC,
    "CartPole-v1": _CLASSIC,
    "atari": dict(hidden=512, envs_per_actor=32, chunk_steps=16, capacity=2_000_000,
                  batch_size=512, min_size=50_000, lr=0.00025 / 4, target_update=2500),
    # MinAtar (Young & Tian 2019): their DQN's replay (100k, learning from 5k), network (one 16-channel
    # 3x3 convolution, 128 units: torsos.TINY_CONVS; dqn with their single head, below) and learning rate, at batch
    # 128 (per transition ~half the CPU of batch 32) with the target every 250 steps (their 1,000 updates of
    # 32 in sampled transitions). Eight sampled transitions per inserted one, inserts held: on 2 cores the
    # lone actor would otherwise make ~10k steps/s that the learner (~90 steps/s of 128) never replays, and
    # take the learner's core; held, acting is cheap and the learner gets a core (BENCHMARKS.md). Evaluations
    # of 30 episodes at epsilon 0.01 (the published protocol) every 20 s.
    "minatar": dict(hidden=128, envs_per_actor=8, chunk_steps=8, capacity=100_000, batch_size=128,
                    min_size=5_000, lr=2.5e-4, target_update=250, samples_per_insert=8.0,
                    spi_block_inserts=True, weights_period=0.5, checkpoint_period=60.0, eval_period=20.0,
                    eval_episodes=30, eval_epsilon=0.01, report_period=5.0, prefetch=4, loader_threads=0,
                    eps_base=0.4, eps_alpha=7.0, n_step=3, gamma=0.99, samples_buffer=16384,
                    experience_buffer=16384),
}


# Algorithm presets (--preset), over the env's preset.
ALGO_PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    # Hessel et al. 2018: PER alpha 0.5, beta 0.4 annealed to 1 (here over 1M batches), Adam eps 1.5e-4.
    "rainbow": dict(algo="rainbow", alpha=0.5, beta=0.4, beta_anneal=1_000_000, adam_eps=1.5e-4),
    # The seed's Rainbow-IQN Ape-X: IQN with noisy layers, dueling, n-step and PER; Adam 5e-5 with eps
    # 3.125e-4 (0.01 / 32), PER alpha 0.2 and beta 0.4; the target network follows every 2500 learner steps.
    "rainbow-iqn": dict(algo="iqn", noisy="on", dueling=True, lr=5e-5, adam_eps=3.125e-4, alpha=0.2, beta=0.4,
                        target_update=2500),
}


# The asynchronous family over the env's preset (Mnih et al. 2016: RMSProp at ~7e-4, t_max 5, the target
# network every 40,000 frames, which is 125 updates of 16 envs x 5 steps x 4 frames). Weights go out
# often: an actor-learner computes each gradient at the newest weights it has (staleness).
# Their shared RMSProp keeps this project's decay 0.99 and epsilon 1e-5 (Mnih et al. 2016: 0.99 and 0.1).
_ASYNC_RMSPROP: dict[str, Any] = dict(rmsprop_alpha=0.99, rmsprop_eps=1e-5)
ASYNC_PRESETS: dict[str, dict[str, Any]] = {
    "classic": dict(lr=1e-3, t_max=5, envs_per_actor=8, weights_period=0.02, target_update=100,
                    eps_anneal_frames=20_000, max_staleness=32, **_ASYNC_RMSPROP),
    "atari": dict(lr=7e-4, t_max=5, envs_per_actor=16, hidden=256, weights_period=0.1, target_update=125,
                  eps_anneal_frames=4_000_000, max_staleness=32, **_ASYNC_RMSPROP),
    # MinAtar: Young & Tian's network (128 units), epsilon annealed over their 100k frames.
    "minatar": dict(lr=1e-3, t_max=5, envs_per_actor=8, hidden=128, weights_period=0.05, target_update=250,
                    eps_anneal_frames=100_000, max_staleness=32, **_ASYNC_RMSPROP),
}


# Presets of one algorithm on one env, over the env's and the family's.
ENV_ALGO_PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    # Returns up to ~1 / (1 - gamma) = 100: the C51 support must reach them. Rainbow explores with the
    # ladder alone (its noisy layers on top slowed learning here). Learning rate 2e-3 at batch 64, as IQN's:
    # its step costs ~2.4x dqn's at batch 128; screening runs reached 475 in 11-29 s against 33-37 s.
    ("CartPole-v1", "rainbow"): dict(v_min=0.0, v_max=110.0, exploration="ladder", lr=2e-3, batch_size=64),
    # N, N', K = 8 / 8 / 4 quantile samples and one head (no dueling): IQN's step at 64 / 64 / 32 costs ~10x
    # dqn's on this small net, at 16 / 16 / 8 with dueling 4x (7.9 ms), here ~2.5x; runs reached 475 in
    # 88-114 s with it against 166-207 s at 16 / 16 / 8 (BENCHMARKS.md). Learning rate 2e-3 at batch 64:
    # the quantile loss's gradients are bounded (|tau - 1{u<0}| per pair), so the values (up to ~100) grow
    # slowly at 1e-3; screening runs reached 475 after 4-17k learner steps against 17-20k (BENCHMARKS.md).
    # Eight sampled transitions per inserted one, inserts held: IQN's learner is the slower stage (its step
    # ~1.9x dqn's), and an actor left free made ~10k transitions/s on one of the two cores (63% of it)
    # that the learner could not use; held, the actor takes ~17% and the learner ~96% (from ~85%).
    # Runs reached 475 in a median 32 s over 12 against ~45 s without (dqn: no gain; BENCHMARKS.md).
    ("CartPole-v1", "iqn"): dict(iqn_n=8, iqn_n_prime=8, iqn_k=4, dueling=False, lr=2e-3, batch_size=64,
                                 samples_per_insert=8.0, spi_block_inserts=True),
}


# Returns on MinAtar reach ~100 (SpaceInvaders, Asterix): Revisiting Rainbow's MinAtar support, +-100.
# IQN at 16 / 16 / 8 quantile samples: its step at 64 / 64 / 32 costs several times dqn's on CPU.
# dqn with Young & Tian's own single head: its learner step costs ~0.6 of the dueling head's on this small
# network, and on Breakout it learned faster per wall second too (Breakout 19.1 against 13.5 in 15 minutes;
# the anchor's final 6.3 at 107 s against 268 s: BENCHMARKS.md).
for _game in ("Asterix", "Breakout", "Freeway", "Seaquest", "SpaceInvaders"):
    for _v in ("v0", "v1"):
        ENV_ALGO_PRESETS[(f"MinAtar/{_game}-{_v}", "dqn")] = dict(dueling=False)
        ENV_ALGO_PRESETS[(f"MinAtar/{_game}-{_v}", "rainbow")] = dict(v_min=-100.0, v_max=100.0)
        ENV_ALGO_PRESETS[(f"MinAtar/{_game}-{_v}", "iqn")] = dict(iqn_n=16, iqn_n_prime=16, iqn_k=8)


def preset_for(env: str, algo: str = "dqn") -> dict[str, Any]:
    """The preset of ``env`` for ``algo``: the env's (ALE ids share the ``atari`` one, other envs without
    their own the ``classic`` one), then the asynchronous family's over it, then ``ENV_ALGO_PRESETS``'."""
    kind = "atari" if env.startswith("ALE/") else "minatar" if env.startswith("MinAtar/") else "classic"
    out = dict(PRESETS[kind] if kind != "classic" else PRESETS.get(env, PRESETS["classic"]))
    if algo in ASYNC_ALGOS:
        out.update(ASYNC_PRESETS[kind])
    out.update(ENV_ALGO_PRESETS.get((env, algo), {}))
    return out


def resolve(cfg: Any) -> Any:
    """Fill the settings whose default depends on others: run_dir from env, num_actors from cores."""
    if not cfg.run_dir:
        cfg.run_dir = str(Path("runs") / cfg.env.replace("/", "-"))
    if cfg.num_actors == 0:
        # No replay server in the asynchronous family: its core goes to one more actor-learner.
        spare = 1 if not isinstance(cfg, RelayConfig) and is_async(cfg) else 2
        cfg.num_actors = max(1, (os.cpu_count() or 1) - spare) if isinstance(cfg, LaunchConfig) else 1
    return cfg


def all_fields() -> dict[str, dataclasses.Field]:
    """Every field of every config class, by name (shared names have one meaning)."""
    out: dict[str, dataclasses.Field] = {}
    for cls in (*ROLE_CONFIGS.values(), *STANDALONE_CONFIGS.values(), LaunchConfig):
        for f in dataclasses.fields(cls):
            out.setdefault(f.name, f)
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _converter(f: dataclasses.Field, hints: dict[str, Any]) -> tuple[Any, tuple | None]:
    tp = hints[f.name]
    if typing.get_origin(tp) is Literal:
        return str, typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union:  # Optional[X]
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return (lambda s, inner=inner: None if s.lower() in ("", "none") else inner(s)), None
    return tp, None


def _parser(cls: type, prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip(),
                                argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="TOML or JSON file of settings (flags override it)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        if hints[f.name] is bool:
            p.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, help=help_text)
        else:
            conv, choices = _converter(f, hints)
            p.add_argument(_flag(f.name), type=conv, choices=choices, help=help_text,
                           metavar=None if choices else f.name.upper())
    return p


def load_file(path: str) -> dict[str, Any]:
    """Settings from a TOML or JSON file; TOML tables named after a role are merged by the caller."""
    text = Path(path).read_bytes()
    try:
        return json.loads(text) if path.endswith(".json") else tomllib.loads(text.decode())
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise SystemExit(f"--config {path}: not valid {'JSON' if path.endswith('.json') else 'TOML'}: {e}")


def _from_file(cls: type, data: dict[str, Any], role: str, path: str) -> dict[str, Any]:
    known = all_fields()
    own = {f.name for f in dataclasses.fields(cls)}
    flat = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for t, table in tables.items():  # every table and key is checked, not only this role's
        if t not in (*ROLE_CONFIGS, *STANDALONE_CONFIGS, "run"):
            raise SystemExit(f"--config {path}: unknown table [{t}], expected one of "
                             f"{[*ROLE_CONFIGS, *STANDALONE_CONFIGS, 'run']}")
        for k in table:
            if k not in known:
                raise SystemExit(f"--config {path}: unknown setting {k!r} in [{t}]")
    # ./run.sh ("run") hands one flat config to every role, so it takes every role's table.
    merged: dict[str, Any] = {}
    for t in ([*ROLE_CONFIGS, "run"] if role == "run" else [role]):
        for k, v in tables.get(t, {}).items():
            if t != "run" and k in merged and merged[k] != v:
                raise SystemExit(f"--config {path}: {k!r} differs between role tables; ./run.sh "
                                 f"runs every role with one value (put it in [run] or at top level)")
            merged[k] = v
    flat.update(merged)
    for k in flat:
        if k not in known:
            raise SystemExit(f"--config {path}: unknown setting {k!r}")
    return {k: v for k, v in flat.items() if k in own}


def _check_value(cls: type, name: str, value: Any) -> Any:
    hints = typing.get_type_hints(cls)
    tp = hints[name]
    if typing.get_origin(tp) is Literal and value not in typing.get_args(tp):
        raise SystemExit(f"{_flag(name)}: {value!r} is not one of {list(typing.get_args(tp))}")
    # File values skip argparse's conversion: check their type here (bool is not a number).
    ok = {bool: ((bool,), "a boolean"), int: ((int,), "an integer"), float: ((int, float), "a number"),
          str: ((str,), "a string"), Optional[float]: ((int, float, type(None)), "a number or none")}
    if tp in ok and (not isinstance(value, ok[tp][0]) or (tp is not bool and isinstance(value, bool))):
        raise SystemExit(f"{_flag(name)}: {value!r} is not {ok[tp][1]}")
    return value


def parse(cls: type, argv: list[str] | None, role: str, prog: str | None = None) -> Any:
    """Build ``cls`` from flags, the ``--config`` file and the env preset; bad input exits naming the flag."""
    args = vars(_parser(cls, prog or f"apex-zmq {role}").parse_args(argv))
    path = args.pop("config", None)
    file_values = _from_file(cls, load_file(path), role, path) if path else {}
    for k, v in file_values.items():  # before the env's preset is looked up
        _check_value(cls, k, v)
    env = args.get("env", file_values.get("env", Common.env))
    own = {f.name for f in dataclasses.fields(cls)}
    preset = args.get("preset", file_values.get("preset", Common.preset))
    algo = args.get("algo", file_values.get("algo", ALGO_PRESETS[preset].get("algo", Common.algo)))
    values = {k: v for k, v in preset_for(env, algo).items() if k in own}
    values.update({k: v for k, v in ALGO_PRESETS[preset].items() if k in own})
    values.update(file_values)
    values.update(args)
    for k, v in values.items():
        _check_value(cls, k, v)
    cfg = resolve(cls(**values))
    try:
        validate(cfg)
        prepare_env(cfg)
    except ConfigError as e:
        print(f"{prog or f'apex-zmq {role}'}: {e}", file=sys.stderr, flush=True)
        raise
    return cfg


class ConfigError(SystemExit):
    """A setting the program cannot run with: exits with ``CONFIG_ERROR_EXIT`` (a role that ./run.sh
    would not restart); ``str()`` is the message, which ``parse`` prints on stderr first."""

    def __init__(self, message: str) -> None:
        super().__init__(CONFIG_ERROR_EXIT)
        self.message = message

    def __str__(self) -> str:
        return self.message


def import_env_modules(names: str) -> None:
    """Import each module of ``--env-module`` (comma-separated), so it registers its gymnasium envs.

    The working directory is searched last, as ``python -m`` does (``apex-zmq`` console scripts do
    not put it on the path). A module that cannot be imported is a ``ConfigError`` naming it.
    """
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and (name == e.name or name.startswith(e.name + ".")):
                raise ConfigError(f"--env-module {name}: no module named {e.name!r} (is it installed, in the "
                                  f"working directory {os.getcwd()} or on PYTHONPATH?)") from None
            raise ConfigError(_import_failure(name, e)) from None
        except Exception as e:  # the module itself failed: say where
            raise ConfigError(_import_failure(name, e)) from None


def _import_failure(name: str, e: BaseException) -> str:
    frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" (at {frame.filename}:{frame.lineno})" if frame else ""
    return f"--env-module {name}: importing it failed: {type(e).__name__}: {e}{where}"


def prepare_env(cfg: Any) -> None:
    """Import ``--env-module`` and check that the networks take ``--env``'s spaces (``ConfigError``
    otherwise): every role and ./run.sh at start, before anything else. The relay makes no env."""
    if isinstance(cfg, RelayConfig):
        return
    import_env_modules(cfg.env_module)
    import gymnasium  # only once a program is about to make its env

    from . import envs
    try:
        envs.check_env(cfg.env)
    except envs.UnsupportedEnv as e:
        raise ConfigError(str(e)) from None
    except gymnasium.error.Error as e:  # not registered (a misspelt id, a module not imported)
        hint = "" if cfg.env_module else " (an env of your own: pass --env-module with the module that registers it)"
        raise ConfigError(f"--env {cfg.env}: {e}{hint}") from None


def uses_noisy(cfg: Any) -> bool:
    """Whether the network has NoisyNet layers (``--noisy auto``: rainbow yes, iqn and dqn no)."""
    return cfg.noisy == "on" or (cfg.noisy == "auto" and cfg.algo == "rainbow")


def exploration_of(cfg: Any) -> str:
    """The actor's exploration: ``--exploration`` with ``auto`` resolved (both with noisy layers, else ladder)."""
    if cfg.exploration != "auto":
        return cfg.exploration
    return "both" if uses_noisy(cfg) else "ladder"


def net_options(cfg: Any) -> dict[str, Any]:
    """What ``models.build_network(spec, hidden, algo, **options)`` needs beyond the env and width;
    checkpoints keep it, so ``play`` rebuilds the same network."""
    if cfg.algo == "rainbow":
        return dict(atoms=cfg.atoms, vmin=cfg.v_min, vmax=cfg.v_max, noisy=uses_noisy(cfg), sigma0=cfg.sigma0)
    if cfg.algo == "iqn":
        return dict(n_cos=cfg.n_cos, dueling=cfg.dueling, noisy=uses_noisy(cfg), sigma0=cfg.sigma0)
    if cfg.algo == "dqn" and not cfg.dueling:  # the default says nothing: checkpoints from before load as they were
        return dict(dueling=False)
    return {}


def validate(cfg: Any) -> None:
    """Value and cross-field checks: a ``ConfigError`` (exit ``CONFIG_ERROR_EXIT``) naming the flag."""
    def need(cond: bool, flag: str, what: str) -> None:
        if not cond:
            raise ConfigError(f"{_flag(flag)}: {what}")

    def positive(*names: str) -> None:
        for name in names:
            v = getattr(cfg, name)
            need(0 < v < math.inf, name, f"must be > 0 (and finite), got {v}")

    def at_least(low: int | float, *names: str) -> None:
        for name in names:
            v = getattr(cfg, name)
            need(v >= low, name, f"must be >= {low}, got {v}")

    def within(name: str, low: float, high: float) -> None:
        v = getattr(cfg, name)
        need(low <= v <= high, name, f"must be in [{low}, {high}], got {v}")
    need(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")
    need(cfg.num_actors >= 0, "num_actors", f"must be >= 0, got {cfg.num_actors}")
    need(cfg.envs_per_actor >= 1, "envs_per_actor", f"must be >= 1, got {cfg.envs_per_actor}")
    need(cfg.n_step >= 1, "n_step", f"must be >= 1, got {cfg.n_step}")
    need(0 < cfg.gamma <= 1, "gamma", f"must be in (0, 1], got {cfg.gamma}")
    at_least(1, "hidden")
    need(cfg.replay_shards >= 1, "replay_shards", f"must be >= 1, got {cfg.replay_shards}")
    need(cfg.shard_port_step >= 1, "shard_port_step", f"must be >= 1, got {cfg.shard_port_step}")
    if cfg.replay_shards > 1 and not isinstance(cfg, RelayConfig):
        for name in SHARD_ENDPOINTS:
            try:
                shard_endpoints(cfg, name)
            except ValueError as e:
                raise ConfigError(f"--replay-shards {cfg.replay_shards}: {e}") from None
    positive("telemetry_period")
    for name in BUFFER_FIELDS:  # below the floor Linux would hold its own minimum, not twice the value
        v = getattr(cfg, name)
        need(v == 0 or MIN_BUFFER <= v < 2**31, name, f"must be 0 (the OS's autotuning) or in [{MIN_BUFFER}, 2^31) "
                                                       f"bytes, got {v}")
    if not isinstance(cfg, RelayConfig):
        need(cfg.algo != "dqn" or cfg.noisy != "on", "noisy", "dqn has no noisy layers (use --algo rainbow or iqn)")
        need(cfg.atoms >= 2, "atoms", f"must be >= 2, got {cfg.atoms}")
        need(cfg.v_min < cfg.v_max, "v_min", f"must be below --v-max ({cfg.v_max}), got {cfg.v_min}")
        need(cfg.sigma0 >= 0, "sigma0", f"must be >= 0, got {cfg.sigma0}")
        for name in ("n_cos", "iqn_n", "iqn_n_prime", "iqn_k"):
            need(getattr(cfg, name) >= 1, name, f"must be >= 1, got {getattr(cfg, name)}")
        need(cfg.kappa > 0, "kappa", f"must be > 0, got {cfg.kappa}")
    if isinstance(cfg, ActorConfig):
        need(0 <= cfg.actor_index < cfg.num_actors, "actor_index",
             f"must be in [0, {cfg.num_actors}), got {cfg.actor_index}")
        need(cfg.chunk_steps >= 1, "chunk_steps", f"must be >= 1, got {cfg.chunk_steps}")
        need(cfg.restart >= 0, "restart", f"must be >= 0, got {cfg.restart}")
        need(cfg.acting_dtype != "int8" or cfg.env.startswith("ALE/"), "acting_dtype",
             f"int8 needs an Atari env (the Nature CNN), got --env {cfg.env}")
        need(cfg.acting_dtype in ("auto", "float32") or cfg.algo == "dqn", "acting_dtype",
             f"{cfg.acting_dtype} acting copies exist for dqn's network only; --algo {cfg.algo} acts in float32 "
             f"(use --acting-dtype auto or float32)")
        need(cfg.exploration in ("auto", "ladder") or uses_noisy(cfg), "exploration",
             f"{cfg.exploration} needs noisy layers (--algo rainbow, or --algo iqn --noisy on), "
             f"got --algo {cfg.algo} --noisy {cfg.noisy}")
    if not isinstance(cfg, RelayConfig) and is_async(cfg):
        need(cfg.preset == "none", "preset", f"{cfg.preset} is an Ape-X preset; --algo {cfg.algo} takes none")
        need(cfg.noisy != "on", "noisy", f"--algo {cfg.algo} has no noisy layers")
    if isinstance(cfg, ActorConfig) and is_async(cfg):
        need(cfg.t_max >= 1, "t_max", f"must be >= 1, got {cfg.t_max}")
        need(cfg.eps_anneal_frames >= 0, "eps_anneal_frames", f"must be >= 0, got {cfg.eps_anneal_frames}")
        need(cfg.entropy_beta >= 0, "entropy_beta", f"must be >= 0, got {cfg.entropy_beta}")
        need(cfg.value_coef >= 0, "value_coef", f"must be >= 0, got {cfg.value_coef}")
        need(cfg.exploration == "auto", "exploration",
             f"--algo {cfg.algo} explores as Mnih et al. 2016 do (auto: a3c samples its policy, the Q "
             f"algorithms anneal each env slot's epsilon), got {cfg.exploration}")
    if isinstance(cfg, LearnerConfig) and is_async(cfg):
        need(cfg.max_staleness >= 0, "max_staleness", f"must be >= 0, got {cfg.max_staleness}")
    if isinstance(cfg, RelayConfig):
        # Same endpoint both ways: the relay would bind the learner's port or subscribe to itself.
        need(cfg.relay_weights != cfg.weights, "relay_weights",
             f"must differ from --weights (the learner's endpoint), both are {cfg.weights}")
    if isinstance(cfg, LearnerConfig):
        need(cfg.loader_threads >= 0, "loader_threads", f"must be >= 0 (0: the training thread decodes), "
                                                        f"got {cfg.loader_threads}")
        need(cfg.torch_threads >= 1, "torch_threads", f"must be >= 1, got {cfg.torch_threads}")
        positive("lr", "adam_eps", "rmsprop_eps", "weights_period", "checkpoint_period")
        need(0 <= cfg.rmsprop_alpha < 1, "rmsprop_alpha", f"must be in [0, 1), got {cfg.rmsprop_alpha}")
        need(cfg.target_update >= 1, "target_update",
             f"must be >= 1 (learner steps between target syncs), got {cfg.target_update}")
        need(0 <= cfg.grad_clip < math.inf, "grad_clip", f"must be >= 0 (0: no clipping), got {cfg.grad_clip}")
        at_least(0, "max_learner_steps")
        at_least(1, "loss_every")
        need(not cfg.compile or cfg.device != "cpu", "compile",
             "captures the step in CUDA graphs, which needs --device cuda (on the CPU the step runs eager: drop "
             "--compile)")
        need(not cfg.compile or not is_async(cfg), "compile",
             f"--algo {cfg.algo} applies gradients (a parameter server): no training step to capture")
    if isinstance(cfg, ActorConfig):
        within("eps_base", 0.0, 1.0)
        at_least(0, "eps_alpha", "max_actor_steps")
        at_least(1, "env_threads", "env_groups")
    if isinstance(cfg, EvaluatorConfig):
        need(cfg.eval_episodes >= 1, "eval_episodes", f"must be >= 1, got {cfg.eval_episodes}")
        positive("eval_period", "report_period", "heartbeat_timeout")
        within("eval_epsilon", 0.0, 1.0)
        at_least(1, "ladder_window")
        need(cfg.eval_max_frames >= 0, "eval_max_frames", f"must be >= 0, got {cfg.eval_max_frames}")
    if isinstance(cfg, ReplayConfig):
        at_least(1, "batch_size", "prefetch")
        need(0 <= cfg.shard < cfg.replay_shards, "shard", f"must be in [0, {cfg.replay_shards}), got {cfg.shard}")
        at_least(0, "alpha", "beta_anneal", "snapshot_period")
        within("beta", 0.0, 1.0)
        need(cfg.capacity >= cfg.batch_size, "capacity",
             f"must be at least --batch-size ({cfg.batch_size}), got {cfg.capacity}")
        need(0 < cfg.min_size <= cfg.capacity, "min_size",
             f"must be in (0, --capacity] = (0, {cfg.capacity}], got {cfg.min_size}")
        need(cfg.samples_per_insert >= 0, "samples_per_insert", f"must be >= 0, got {cfg.samples_per_insert}")
        need(cfg.spi_tolerance == 0 or cfg.spi_tolerance >= cfg.batch_size, "spi_tolerance",
             f"must be 0 (4 batches) or at least --batch-size ({cfg.batch_size}), got {cfg.spi_tolerance}")
    if isinstance(cfg, LaunchConfig):
        at_least(0, "max_restarts", "max_seconds", "learner_threads", "port_base")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a config (for JSON)."""
    return dataclasses.asdict(cfg)


def save(cfg: Any, run_dir: str, name: str) -> Path:
    """Write ``cfg`` as JSON into ``run_dir`` (atomically)."""
    path = Path(run_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def role_config(cls: type, values: dict[str, Any]) -> Any:
    """Build a role's config from a dict of (possibly more) settings."""
    own = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in own})


# Exit code of a role that cannot run with what it was given (sysexits EX_CONFIG), such as a checkpoint
# written for another network: a restart would fail the same way, so ./run.sh ends the run instead.
CONFIG_ERROR_EXIT = 78
# Exit code of a role (and of ./run.sh) that cannot bind an address because another process holds it
# (sysexits EX_UNAVAILABLE): not a setting that is wrong, so not 78, but a restart would fail the same
# way while the other process (another run, usually) lives, so ./run.sh ends the run instead.
PORT_IN_USE_EXIT = 69
