"""The actor program: K envs stepped as a batch, batched inference, n-step chunks pushed to the replay."""

from __future__ import annotations

import asyncio
import sys
import time

import numpy as np
import torch
import zmq

from . import config as C
from .envs import env_spec, make_vector_env
from .exploration import actor_epsilons, epsilon_greedy
from .networks import build_network, load_arrays, make_acting_network, weights_mismatch
from .nstep import SegmentBuffer
from .transport import Sockets, call_in_loop, install_stop, recv_latest, run_role
from .wire import MAX_EPISODES, ExperienceChunk, Telemetry, WireError, compress_obs, decode_weights, encode, frame_table


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

    def __init__(self, env, first: int, eps: np.ndarray, seg: SegmentBuffer, obs: np.ndarray) -> None:
        self.env = env
        self.stepper = _Stepper(env)
        self.first = first  # index of this group's first env within the actor
        self.eps = eps
        self.seg = seg
        self.obs = obs
        k = len(eps)
        self.actions = np.zeros(k, dtype=np.int64)
        self.in_flight = False
        self.valid = np.ones(k, dtype=bool)
        self.ep_return = np.zeros(k)
        self.ep_length = np.zeros(k, dtype=np.int64)


class ActorCore:
    """Everything an actor does except I/O: step envs, act, build chunks, track episodes.

    The K envs are split into ``cfg.env_groups`` groups, each its own ale-py vector env. Groups are
    served round robin: while one group's envs step in ale-py's C++ threads (``send`` returns at
    once), the Q network runs on the next group's observations, so env stepping and inference
    overlap instead of taking turns on the cores.
    """

    def __init__(self, cfg: C.ActorConfig) -> None:
        self.cfg = cfg
        self.spec = env_spec(cfg.env)
        self.name = f"actor-{cfg.actor_index}"
        seed = cfg.seed + 1000 * cfg.actor_index
        K = cfg.envs_per_actor
        self.net = build_network(self.spec, cfg.hidden).eval()
        self.policy = make_acting_network(self.net, cfg.acting_dtype)
        eps = actor_epsilons(cfg.actor_index, K, cfg.num_actors, cfg.eps_base, cfg.eps_alpha)
        self.rng = np.random.default_rng(seed)
        g = max(1, min(cfg.env_groups, K)) if self.spec.atari else 1  # gymnasium envs have no async send
        bounds = np.linspace(0, K, g + 1).astype(int)
        self.groups: list[EnvGroup] = []
        for i in range(g):
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            env = make_vector_env(cfg.env, hi - lo, seed + lo, train=True, num_threads=cfg.env_threads)
            obs, _ = env.reset(seed=seed + lo)
            seg = SegmentBuffer(hi - lo, cfg.chunk_steps, cfg.n_step, cfg.gamma, self.spec.num_actions)
            self.groups.append(EnvGroup(env, lo, eps[lo:hi], seg, obs))
        self.eps = eps
        self._next = 0
        self.episodes: list[dict[str, float]] = []
        self.weights_version = -1
        self.agent_steps = 0
        self.seq = 0

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

    def set_weights(self, names: list[str], arrays: list[np.ndarray], version: int) -> None:
        """Adopt newer network weights."""
        load_arrays(self.net, names, arrays)
        self.policy.sync(self.net)
        self.weights_version = version

    @torch.inference_mode()
    def step(self) -> ExperienceChunk | None:
        """One step of the next group of envs; returns a chunk when that group's segment fills."""
        grp = self.groups[self._next]
        self._next = (self._next + 1) % len(self.groups)
        if grp.in_flight:
            self._observe(grp)
        q = self.policy(torch.as_tensor(grp.obs)).numpy()
        grp.seg.add_obs(compress_obs(grp.obs), q)
        chunk = self._chunk(grp) if grp.seg.full else None
        grp.actions = epsilon_greedy(q, grp.eps, self.rng)
        grp.stepper.send(grp.actions)
        grp.in_flight = True
        return chunk

    def _observe(self, grp: EnvGroup) -> None:
        obs, rewards, term, trunc, _ = grp.stepper.recv()
        grp.obs = obs
        grp.seg.add_step(grp.actions, rewards, term, trunc, grp.valid)
        self._track_episodes(grp, rewards, term | trunc)
        grp.valid = ~(term | trunc)  # the step after an episode end is an autoreset step
        grp.in_flight = False
        self.agent_steps += len(grp.eps)

    def _chunk(self, grp: EnvGroup) -> ExperienceChunk:
        f = grp.seg.emit()
        data, offsets = frame_table(f.pop("blobs"))
        self.seq += 1
        return ExperienceChunk(sender=self.name, seq=self.seq, obs_shape=self.spec.obs_shape,
                               obs_dtype=self.spec.obs_dtype, frame_data=data, frame_offsets=offsets, **f)

    def _track_episodes(self, grp: EnvGroup, rewards: np.ndarray, done: np.ndarray) -> None:
        live = grp.valid
        grp.ep_return += np.where(live, rewards, 0.0)
        grp.ep_length += live
        base = self.cfg.actor_index * self.cfg.envs_per_actor + grp.first
        for k in np.nonzero(done & live)[0]:
            self.episodes.append({"slot": base + int(k), "epsilon": float(grp.eps[k]),
                                  "return": float(grp.ep_return[k]), "length": int(grp.ep_length[k])})
            grp.ep_return[k] = 0.0
            grp.ep_length[k] = 0


async def main_async(cfg: C.ActorConfig) -> None:
    """Wire the actor core to its sockets and run until stopped."""
    torch.set_num_threads(cfg.torch_threads)
    core = ActorCore(cfg)
    socks = Sockets(cfg.insecure, cfg.keys)
    exp = socks.connect(zmq.PUSH, cfg.experience, hwm=8)
    weights = socks.connect(zmq.SUB, cfg.weights, hwm=2, subscribe=True)
    tel = socks.connect(zmq.PUB, cfg.telemetry, hwm=100)
    stop = asyncio.Event()
    install_stop(stop)
    loop = asyncio.get_running_loop()
    pending: list = []  # newest decoded weights, handed to the stepping thread
    counters = {"rejected": 0}

    def stepping() -> None:
        # CPU-bound: env stepping and inference, off the event loop; sends block on backpressure.
        while not stop.is_set() and (cfg.max_actor_steps == 0 or core.steps < cfg.max_actor_steps):
            if pending:
                w = pending.pop()
                core.set_weights(w.names, w.arrays, w.version)
            chunk = core.step()
            if chunk is not None:
                frames = encode(chunk)
                call_in_loop(loop, lambda: exp.send_multipart(frames, copy=False), stop)

    async def receive_weights() -> None:
        while True:
            frames = await recv_latest(weights)
            try:
                w = decode_weights(frames)
                why = weights_mismatch(core.net, w.names, w.arrays)
                if why is not None:  # well-formed, but for another network: dropped, not a crash
                    raise WireError(why)
            except WireError:
                counters["rejected"] += 1
                continue
            if w.version > core.weights_version:
                pending[:] = [w]

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
                         "actor/rejected": counters["rejected"]})))

    try:
        await run_role(stop, [receive_weights(), report()], [stepping])
    finally:
        socks.close()
        core.close()


def main(argv: list[str] | None = None) -> None:
    """``apex-zmq actor``: run one actor process."""
    cfg = C.parse(C.ActorConfig, argv, "actor")
    C.save(cfg, cfg.run_dir, f"config_actor_{cfg.actor_index}")
    asyncio.run(main_async(cfg))


if __name__ == "__main__":
    main(sys.argv[1:])
