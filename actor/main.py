"""The actor program: K envs stepped as a batch, batched inference, n-step chunks pushed to the replay."""

from __future__ import annotations

import asyncio
import sys
import time

import numpy as np
import torch

from apex_zmq import config as C
from apex_zmq import cpu
from apex_zmq.envs import env_spec, make_vector_env
from apex_zmq.exploration import actor_epsilons, actor_seed, epsilon_greedy
from apex_zmq.models import build_network
from apex_zmq.networks import (
    ActingChoice,
    Int8ActingNetwork,
    choose_acting,
    greedy_agreement,
    int8_engine,
    load_arrays,
    make_acting_network,
)
from apex_zmq.torsos import nature_cnn
from apex_zmq.transport import Sockets, install_stop, run_role, send_until
from apex_zmq.wire import (
    MAX_EPISODES,
    ExperienceChunk,
    Telemetry,
    compress_obs,
    encode,
    frame_table,
    new_incarnation,
)

from .acting import make_acting
from .common import EXPLORATION_CODES, EpisodeTracker, life_lost, take_weights
from .frames import FrameStacker
from .nstep import SegmentBuffer


class _Stepper:
    """``send``/``recv`` over a vector env: ale-py's own (non-blocking send) or a plain ``step``."""

    def __init__(self, env) -> None:
        self.env = env
        self.native = hasattr(env, "send") and hasattr(env, "recv")
        self._actions: np.ndarray | None = None

    def send(self, actions: np.ndarray) -> None:
        if self.native:
            self.env.send(actions)  # returns at once: ale-py's threads step while we do other work
        else:
            self._actions = actions

    def recv(self) -> tuple:
        return self.env.recv() if self.native else self.env.step(self._actions)


class EnvGroup:
    """A slice of the actor's env slots stepped as one vector env, with its own n-step segment."""

    def __init__(self, env, first: int, eps: np.ndarray, seg: SegmentBuffer, obs: np.ndarray,
                 lives: np.ndarray | None, first_slot: int) -> None:
        self.env = env
        self.stepper = _Stepper(env)
        self.first = first  # index of this group's first env within the actor
        self.eps = eps
        self.seg = seg
        self.obs = obs
        self.lives = lives  # Atari: lives left in each env's game (None: the env has no lives)
        k = len(eps)
        self.actions = np.zeros(k, dtype=np.int64)
        self.in_flight = False
        self.valid = np.ones(k, dtype=bool)
        self.tracker = EpisodeTracker(k, first_slot)
        self.stacker: FrameStacker | None = None  # set: observations go out as stacks of frame references


class ActorCore:
    """Everything an actor does except I/O: step envs, act, build chunks, track episodes.

    The K envs are split into ``cfg.env_groups`` groups, each its own ale-py vector env. Groups are
    served round robin: while one group's envs step in ale-py's C++ threads (``send`` returns at
    once), the Q network runs on the next group's observations, so env stepping and inference
    overlap instead of taking turns on the cores.

    Atari envs play whole games: a lost life ends the n-step return (discount 0, as DQN's
    episodic-life trick does) but not the game, and the next step is an ordinary one. Rewards are
    clipped to [-1, 1] for training; episodes are reported with their unclipped score.
    """

    def __init__(self, cfg: C.ActorConfig) -> None:
        self.cfg = cfg
        self.spec = env_spec(cfg.env)
        self.name = f"actor-{cfg.actor_index}"
        # Fresh env seeds and exploration stream after each restart (the restart count is in the seed).
        self.seed = seed = actor_seed(cfg.seed, cfg.actor_index, cfg.restart, cfg.envs_per_actor)
        K = cfg.envs_per_actor
        self.net = build_network(self.spec, cfg.hidden, cfg.algo, **C.net_options(cfg)).eval()
        if cfg.algo == "dqn":
            self.acting = choose_acting(cfg.acting_dtype, nature_cnn(self.spec), cpu.detect(),
                                        int8_engine())
            self.policy = make_acting_network(self.net, self.acting)
        else:  # the fast copies are dqn's network only (config.validate refuses asking for them)
            self.acting = ActingChoice("float32", why=f"--algo {cfg.algo} acts with its float32 network")
            self.policy = self.net
        self.act = make_acting(cfg, self.net, self.policy, self.spec.num_actions, seed)
        self.exploration = C.exploration_of(cfg)
        self.agreement = 1.0
        self._check_agreement = cfg.algo == "dqn"  # at the first step and after every weights update
        eps = actor_epsilons(cfg.actor_index, K, cfg.num_actors, cfg.eps_base, cfg.eps_alpha)
        if self.exploration == "noisy":  # the noisy layers explore alone: every slot greedy
            eps = np.zeros_like(eps)
        self.rng = np.random.default_rng(seed)
        g = max(1, min(cfg.env_groups, K)) if self.spec.atari else 1  # gymnasium envs have no async send
        bounds = np.linspace(0, K, g + 1).astype(int)
        self.groups: list[EnvGroup] = []
        for i in range(g):
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            env = make_vector_env(cfg.env, hi - lo, seed + lo, num_threads=cfg.env_threads)
            obs, info = env.reset(seed=seed + lo)
            seg = SegmentBuffer(hi - lo, cfg.chunk_steps, cfg.n_step, cfg.gamma, self.spec.num_actions,
                                self.act.out_shape, self.act.priority_fn)
            lives = np.array(info["lives"]) if self.spec.atari else None
            self.groups.append(EnvGroup(env, lo, eps[lo:hi], seg, obs, lives, cfg.actor_index * K + lo))
            if self.spec.atari and cfg.frames_once:
                self.groups[-1].stacker = FrameStacker(cfg.frames_hc)
        self.eps = eps
        self._next = 0
        self.episodes: list[dict[str, float]] = []
        self.weights_version = -1
        self.weights_incarnation = -1  # the learner process the weights came from
        self.agent_steps = 0
        self.seq = 0
        self.incarnation = new_incarnation()  # on every chunk: this process's seq 1, 2, ... told from another's

    @property
    def steps(self) -> int:
        """Vector steps of all K envs so far."""
        return self.agent_steps // self.cfg.envs_per_actor

    def close(self) -> None:
        """Close every env (after waiting for steps in flight)."""
        for grp in self.groups:
            if grp.in_flight:
                grp.stepper.recv()
            grp.env.close()

    def set_weights(self, names: list[str], arrays: list[np.ndarray], version: int, incarnation: int = 0) -> None:
        """Adopt newer network weights."""
        load_arrays(self.net, names, arrays)
        if self.policy is not self.net:
            self.policy.sync(self.net)
            self._check_agreement = True
        self.weights_version = version
        self.weights_incarnation = incarnation

    @torch.inference_mode()
    def step(self) -> ExperienceChunk | None:
        """One step of the next group of envs; returns a chunk when that group's segment fills."""
        grp = self.groups[self._next]
        self._next = (self._next + 1) % len(self.groups)
        if grp.in_flight:
            self._observe(grp)
        obs = torch.as_tensor(grp.obs)
        q, outputs = self.act.outputs(obs)
        if self._check_agreement:
            self.agreement = self._measure_agreement(obs, q)
            self._check_agreement = False
        grp.seg.add_obs(grp.stacker.add(grp.obs) if grp.stacker else compress_obs(grp.obs), outputs)
        chunk = self._chunk(grp) if grp.seg.full else None
        grp.actions = epsilon_greedy(q.numpy(), grp.eps, self.rng)
        grp.stepper.send(grp.actions)
        grp.in_flight = True
        return chunk

    def _measure_agreement(self, obs: torch.Tensor, q: torch.Tensor) -> float:
        """How often the acting copy's greedy action is float32's (the int8 copy measures it on
        its calibration batch; the others on up to 16 observations of this batch)."""
        if isinstance(self.policy, Int8ActingNetwork):
            return self.policy.agreement
        step = -(-len(obs) // 16)
        return greedy_agreement(q[::step], self.net(obs[::step]))

    def _observe(self, grp: EnvGroup) -> None:
        obs, rewards, term, trunc, info = grp.stepper.recv()
        grp.obs = obs
        lost = np.zeros_like(term)
        if grp.lives is not None:
            lives = np.asarray(info["lives"])
            lost = life_lost(grp.lives, lives, grp.valid) & ~term  # (a game over is already an end)
            grp.lives = lives
        clipped = np.clip(rewards, -1.0, 1.0) if self.spec.atari else rewards
        # A lost life ends the return (discount 0) but not the game: the next step stays valid.
        grp.seg.add_step(grp.actions, clipped, term | lost, trunc, grp.valid)
        self.episodes += grp.tracker.step(rewards, clipped, term | trunc, grp.valid, grp.eps)
        grp.valid = ~(term | trunc)  # the step after a game's end is an autoreset step
        grp.in_flight = False
        self.agent_steps += len(grp.eps)

    def _chunk(self, grp: EnvGroup) -> ExperienceChunk:
        f = grp.seg.emit()
        data, offsets = frame_table(f.pop("blobs"))
        self.seq += 1
        return ExperienceChunk(sender=self.name, seq=self.seq, obs_shape=self.spec.obs_shape,
                               obs_dtype=self.spec.obs_dtype, frame_data=data, frame_offsets=offsets,
                               incarnation=self.incarnation, **f)


async def main_async(cfg: C.ActorConfig) -> None:
    """Wire the actor core to its sockets and run until stopped."""
    torch.set_num_threads(cfg.torch_threads)
    core = ActorCore(cfg)
    print(f"{core.name}: --algo {cfg.algo}, exploration {core.exploration}, acting copy {core.acting.label} "
          f"({core.acting.why}); CPU {cpu.detect().describe()}; "
          f"restart {cfg.restart}, seed {core.seed}", flush=True)
    socks = Sockets(cfg.insecure, cfg.keys)
    exp = socks.open(cfg, "actor", "experience", sync=True)  # owned by the stepping thread
    # Sharded replay: the same PUSH socket connects to every shard, and ZeroMQ deals the chunks round
    # robin over the shards that are connected and have room (a dead shard gets none: IMMEDIATE).
    for ep in C.shard_endpoints(cfg, "experience")[1:]:
        exp.connect(ep)
    weights = socks.open(cfg, "actor", "weights")
    tel = socks.open(cfg, "actor", "telemetry")
    stop = asyncio.Event()
    install_stop(stop)
    pending: list = []  # newest decoded weights, handed to the stepping thread
    # sent_*: handed to ZeroMQ by this process (chunk seq 1..sent_chunks); the replay's replay/from/<name>/*
    # say which of them it stored, so every lost transition can be counted (bench/soak.py).
    counters = {"rejected": 0, "sent_chunks": 0, "sent_transitions": 0}

    def stepping() -> None:
        # CPU-bound: env stepping and inference, off the event loop. Chunks go straight to the
        # experience socket this thread owns; a send waits only on backpressure (the HWM).
        while not stop.is_set() and (cfg.max_actor_steps == 0 or core.steps < cfg.max_actor_steps):
            if pending:
                w = pending.pop()
                core.set_weights(w.names, w.arrays, w.version, w.incarnation)
            chunk = core.step()
            if chunk is not None and send_until(exp, encode(chunk), stop):
                counters["sent_chunks"] += 1
                counters["sent_transitions"] += len(chunk.action)

    async def report() -> None:
        skip = 4 if core.spec.atari else 1  # env frames per agent step (ALE frame-skip)
        last, last_steps = time.monotonic(), 0
        while True:
            await asyncio.sleep(cfg.telemetry_period)
            now = time.monotonic()
            sps = (core.agent_steps - last_steps) / (now - last)
            last, last_steps = now, core.agent_steps
            # The decoder accepts at most MAX_EPISODES per report: the rest waits for the next one.
            # (del of a slice is atomic under the GIL: an episode appended meanwhile is kept.)
            episodes = core.episodes[:MAX_EPISODES]
            del core.episodes[:len(episodes)]
            await tel.send_multipart(encode(Telemetry(
                sender=core.name, seq=core.seq, role="actor", time=time.time(), episodes=episodes,
                metrics={"actor/steps_per_s": sps, "actor/frames_per_s": sps * skip,
                         "actor/agent_steps": core.agent_steps, "actor/frames": core.agent_steps * skip,
                         "actor/weights_version": core.weights_version,
                         "actor/acting_bits": core.acting.bits, "actor/acting_agreement": core.agreement,
                         "actor/exploration": EXPLORATION_CODES[core.exploration],
                         "actor/rejected": counters["rejected"],
                         # Named per actor: metrics.csv has no sender column, and a soak joins these to replay/from/<name>/*.
                         f"actor/{core.name}/sent_chunks": counters["sent_chunks"],
                         f"actor/{core.name}/sent_transitions": counters["sent_transitions"],
                         f"actor/{core.name}/restart": cfg.restart,
                         f"actor/{core.name}/incarnation": core.incarnation})))

    try:
        await run_role(stop, [take_weights(weights, core, pending, counters), report()], [stepping],
                       torch_threads=cfg.torch_threads)
    finally:
        socks.close()
        core.close()


def main(argv: list[str] | None = None) -> None:
    """``apex-zmq actor``: run one actor process."""
    cfg = C.parse(C.ActorConfig, argv, "actor")
    C.save(cfg, cfg.run_dir, f"config_actor_{cfg.actor_index}")
    if C.is_async(cfg):  # an actor-learner: gradients to the learner, no replay
        from .actor_learner import main_async as run_actor_learner
        asyncio.run(run_actor_learner(cfg))
        return
    asyncio.run(main_async(cfg))


if __name__ == "__main__":
    main(sys.argv[1:])
