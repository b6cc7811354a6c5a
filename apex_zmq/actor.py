"""The actor program: K envs stepped as a batch, batched inference, n-step chunks pushed to the replay."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import numpy as np
import torch
import zmq

from . import config as C
from .envs import env_spec, make_vector_env
from .exploration import actor_epsilons, epsilon_greedy
from .networks import ActingNetwork, build_network, load_arrays
from .nstep import SegmentBuffer
from .transport import Sockets, call_in_loop, install_stop, recv_latest, run_role
from .wire import ExperienceChunk, Telemetry, WireError, compress_obs, decode_weights, encode, frame_table


class ActorCore:
    """Everything an actor does except I/O: step envs, act, build chunks, track episodes."""

    def __init__(self, cfg: C.ActorConfig) -> None:
        self.cfg = cfg
        self.spec = env_spec(cfg.env)
        self.name = f"actor-{cfg.actor_index}"
        seed = cfg.seed + 1000 * cfg.actor_index
        self.env = make_vector_env(cfg.env, cfg.envs_per_actor, seed, train=True,
                                   num_threads=cfg.env_threads)
        self.net = build_network(self.spec, cfg.hidden).eval()
        self.policy = ActingNetwork(self.net)
        self.eps = actor_epsilons(cfg.actor_index, cfg.envs_per_actor, cfg.num_actors,
                                  cfg.eps_base, cfg.eps_alpha)
        self.rng = np.random.default_rng(seed)
        self.seg = SegmentBuffer(cfg.envs_per_actor, cfg.chunk_steps, cfg.n_step, cfg.gamma,
                                 self.spec.num_actions)
        self.obs, _ = self.env.reset(seed=seed)
        self.valid = np.ones(cfg.envs_per_actor, dtype=bool)
        self.ep_return = np.zeros(cfg.envs_per_actor)
        self.ep_length = np.zeros(cfg.envs_per_actor, dtype=np.int64)
        self.episodes: list[dict[str, float]] = []
        self.weights_version = -1
        self.steps = 0
        self.seq = 0

    def set_weights(self, names: list[str], arrays: list[np.ndarray], version: int) -> None:
        """Adopt newer network weights."""
        load_arrays(self.net, names, arrays)
        self.policy.sync(self.net)
        self.weights_version = version

    @torch.inference_mode()
    def step(self) -> ExperienceChunk | None:
        """One vector step of all K envs; returns a chunk when a segment fills."""
        q = self.policy(torch.as_tensor(self.obs)).numpy()
        self.seg.add_obs(compress_obs(self.obs), q)
        chunk = self._chunk() if self.seg.full else None
        actions = epsilon_greedy(q, self.eps, self.rng)
        self.obs, rewards, term, trunc, _ = self.env.step(actions)
        self.seg.add_step(actions, rewards, term, trunc, self.valid)
        self._track_episodes(rewards, term | trunc)
        self.valid = ~(term | trunc)  # the step after an episode end is an autoreset step
        self.steps += 1
        return chunk

    def _chunk(self) -> ExperienceChunk:
        f = self.seg.emit()
        data, offsets = frame_table(f.pop("blobs"))
        self.seq += 1
        return ExperienceChunk(sender=self.name, seq=self.seq, obs_shape=self.spec.obs_shape,
                               obs_dtype=self.spec.obs_dtype, frame_data=data, frame_offsets=offsets, **f)

    def _track_episodes(self, rewards: np.ndarray, done: np.ndarray) -> None:
        live = self.valid
        self.ep_return += np.where(live, rewards, 0.0)
        self.ep_length += live
        base = self.cfg.actor_index * self.cfg.envs_per_actor
        for k in np.nonzero(done & live)[0]:
            self.episodes.append({"slot": base + int(k), "epsilon": float(self.eps[k]),
                                  "return": float(self.ep_return[k]), "length": int(self.ep_length[k])})
            self.ep_return[k] = 0.0
            self.ep_length[k] = 0


async def main_async(cfg: C.ActorConfig) -> None:
    """Wire the actor core to its sockets and run until stopped."""
    torch.set_num_threads(cfg.torch_threads)
    core = ActorCore(cfg)
    socks = Sockets(cfg.insecure)
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
            except WireError:
                counters["rejected"] += 1
                continue
            if w.version > core.weights_version:
                pending[:] = [w]

    async def report() -> None:
        last, last_steps = time.monotonic(), 0
        while True:
            await asyncio.sleep(cfg.telemetry_period)
            now = time.monotonic()
            sps = (core.steps - last_steps) * cfg.envs_per_actor / (now - last)
            last, last_steps = now, core.steps
            episodes, core.episodes = core.episodes, []
            await tel.send_multipart(encode(Telemetry(
                sender=core.name, seq=core.seq, role="actor", time=time.time(), episodes=episodes,
                metrics={"actor/steps_per_s": sps, "actor/frames": core.steps * cfg.envs_per_actor,
                         "actor/weights_version": core.weights_version,
                         "actor/rejected": counters["rejected"]})))

    try:
        await run_role(stop, [receive_weights(), report()], [stepping])
    finally:
        socks.close()
        core.env.close()


def main(argv: list[str] | None = None) -> None:
    """``apex-zmq actor``: run one actor process."""
    cfg = C.parse(C.ActorConfig, argv, "actor")
    C.save(cfg, cfg.run_dir, f"config_actor_{cfg.actor_index}")
    asyncio.run(main_async(cfg))


if __name__ == "__main__":
    main(sys.argv[1:])
