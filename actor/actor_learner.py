"""The actor-learner of the asynchronous family (``--algo a3c|nstep_q|onestep_q|onestep_sarsa``).

K envs step as one batch (as Distributed BA3C batches its simulators) with a local copy of the shared
network; every ``--t-max`` steps the actor-learner computes the gradient of its algorithm's loss on the
last t_max x K steps, at the weights it acted with, and pushes it to the learner (the parameter server),
which applies it and publishes new weights. Exploration as Mnih et al. 2016: A3C samples from its
policy; the Q algorithms act epsilon-greedily, each env slot's epsilon annealed from 1 to a final value
drawn from {0.1, 0.01, 0.5} with probabilities {0.4, 0.3, 0.3}.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time

import numpy as np
import torch
from torch import nn

from apex_zmq import config as C
from apex_zmq.asyncrl import a3c_loss, gradient_arrays, nstep_cut, q_loss, q_targets, segment_returns
from apex_zmq.envs import env_spec, make_vector_env
from apex_zmq.exploration import actor_seed, annealed_epsilon, draw_final_epsilons, epsilon_greedy
from apex_zmq.models import build_network
from apex_zmq.networks import load_arrays
from apex_zmq.transport import Sockets, install_stop, run_role, send_until
from apex_zmq.wire import MAX_EPISODES, Gradients, Telemetry, encode

from .common import EXPLORATION_CODES, EpisodeTracker, life_lost, take_weights


class ActorLearnerCore:
    """Everything an actor-learner does except I/O: step K envs, act, compute gradients, track episodes."""

    def __init__(self, cfg: C.ActorConfig) -> None:
        self.cfg = cfg
        self.spec = env_spec(cfg.env)
        self.name = f"actor-{cfg.actor_index}"
        self.seed = seed = actor_seed(cfg.seed, cfg.actor_index, cfg.restart, cfg.envs_per_actor)
        K = cfg.envs_per_actor
        self.net = build_network(self.spec, cfg.hidden, cfg.algo)
        self.env = make_vector_env(cfg.env, K, seed, num_threads=cfg.env_threads)
        self.obs, info = self.env.reset(seed=seed)
        self.lives = np.array(info["lives"]) if self.spec.atari else None
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.exploration = "policy" if cfg.algo == "a3c" else "annealed"
        self.final_eps = np.zeros(K) if cfg.algo == "a3c" else draw_final_epsilons(self.rng, K)
        self.frame_skip = 4 if self.spec.atari else 1  # emulator frames per agent step
        self.valid = np.ones(K, dtype=bool)
        self.next_actions: np.ndarray | None = None  # chosen at the segment's last observation
        self.tracker = EpisodeTracker(K, cfg.actor_index * K)
        self.episodes: list[dict[str, float]] = []
        self.weights_version = -1
        self.weights_incarnation = -1
        self.agent_steps = 0
        self.seq = 0
        self.entropy = 0.0  # a3c: mean policy entropy of the last segment
        self.loss = 0.0

    @property
    def steps(self) -> int:
        """Vector steps of all K envs so far."""
        return self.agent_steps // self.cfg.envs_per_actor

    def epsilons(self) -> np.ndarray:
        """Each env slot's epsilon now (the Q algorithms; a3c samples from its policy: 0)."""
        if self.cfg.algo == "a3c":
            return np.zeros(self.cfg.envs_per_actor)
        frames = self.steps * self.frame_skip
        return np.asarray(annealed_epsilon(self.final_eps, frames, self.cfg.eps_anneal_frames), dtype=np.float64)

    def set_weights(self, names: list[str], arrays: list[np.ndarray], version: int, incarnation: int) -> None:
        """Adopt the shared weights (between segments: a gradient is computed at the weights that acted)."""
        load_arrays(self.net, names, arrays)
        self.weights_version, self.weights_incarnation = version, incarnation

    def close(self) -> None:
        self.env.close()

    @torch.no_grad()
    def act(self, obs: np.ndarray) -> np.ndarray:
        """Actions for a batch of observations: sampled from the policy (a3c) or epsilon-greedy."""
        x = torch.as_tensor(obs)
        if self.cfg.algo == "a3c":
            logits, _ = self.net(x)
            return torch.multinomial(torch.softmax(logits, -1), 1, generator=self.gen).squeeze(1).numpy()
        return epsilon_greedy(self.net(x).numpy(), self.epsilons(), self.rng)

    def segment(self) -> Gradients:
        """Step the K envs t_max times, then return the gradient of the loss on those steps."""
        T, K = self.cfg.t_max, self.cfg.envs_per_actor
        obs = np.empty((T + 1, K, *self.spec.obs_shape), dtype=self.obs.dtype)
        actions = np.zeros((T + 1, K), dtype=np.int64)
        rewards = np.zeros((T, K), dtype=np.float32)
        term, trunc, valid = (np.zeros((T, K), dtype=bool) for _ in range(3))
        for t in range(T):
            obs[t] = self.obs
            actions[t] = self.next_actions if self.next_actions is not None else self.act(self.obs)
            self.next_actions = None
            self.obs, r, te, tr, info = self.env.step(actions[t])
            lost = np.zeros(K, dtype=bool)
            if self.lives is not None:  # a lost life ends the return, not the game (as the Ape-X actor)
                lives = np.asarray(info["lives"])
                lost = life_lost(self.lives, lives, self.valid) & ~te
                self.lives = lives
            clipped = np.clip(r, -1.0, 1.0) if self.spec.atari else r
            rewards[t], term[t], trunc[t], valid[t] = clipped, te | lost, tr, self.valid
            self.episodes += self.tracker.step(r, clipped, te | tr, self.valid, self.epsilons())
            self.valid = ~(te | tr)  # the next step of an ended episode is the env's reset step
            self.agent_steps += K
        obs[T] = self.obs
        if self.cfg.algo == "onestep_sarsa":  # Sarsa's last target needs the action taken next
            self.next_actions = actions[T] = self.act(self.obs)
        return self._gradients(obs, actions, rewards, term, trunc, valid)

    def _gradients(self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, term: np.ndarray,
                   trunc: np.ndarray, valid: np.ndarray) -> Gradients:
        cfg, net = self.cfg, self.net
        net.zero_grad(set_to_none=True)
        loss, entropy = segment_loss(cfg.algo, net, obs, actions, rewards, term, trunc, valid, cfg.gamma,
                                     cfg.entropy_beta, cfg.value_coef)
        loss.backward()
        self.loss = float(loss.detach())
        if cfg.algo == "a3c":
            self.entropy = float(entropy)
        names, arrays = gradient_arrays(net, cfg.gradient_dtype)
        self.seq += 1
        return Gradients(sender=self.name, seq=self.seq, version=self.weights_version, names=names, arrays=arrays,
                         dtype=cfg.gradient_dtype, incarnation=self.weights_incarnation, steps=int(valid.sum()),
                         loss=self.loss, entropy=self.entropy if cfg.algo == "a3c" else 0.0)


def segment_loss(algo: str, net: nn.Module, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray,
                 term: np.ndarray, trunc: np.ndarray, valid: np.ndarray, gamma: float, entropy_beta: float = 0.01,
                 value_coef: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mean policy entropy: a3c's, else 0) of ``algo`` on one recorded segment, to backpropagate.

    obs [T+1, K, ...] (s_0..s_T); actions [T+1, K] (the last row: the action chosen at s_T, which only
    onestep_sarsa reads); rewards, term, trunc, valid [T, K] (see ``apex_zmq.asyncrl``). ``net`` is the
    weights the segment was acted with: ``ActorCritic`` for a3c, ``QWithTarget`` for the Q algorithms.
    """
    T, K = rewards.shape
    x = torch.as_tensor(obs).reshape((T + 1) * K, *obs.shape[2:])
    r, te, tr = torch.as_tensor(rewards), torch.as_tensor(term), torch.as_tensor(trunc)
    a = torch.as_tensor(actions)
    mask = torch.as_tensor(valid).reshape(-1)
    if algo == "a3c":
        logits, values = net(x)  # one batch: s_0..s_T (the last row only bootstraps)
        boot = values[K:].detach().reshape(T, K)
        returns = segment_returns(r, te, nstep_cut(tr), boot, gamma)
        return a3c_loss(logits[:T * K], values[:T * K], a[:T].reshape(-1), returns.reshape(-1), mask,
                        entropy_beta, value_coef)
    q = net.online(x[:T * K])
    with torch.no_grad():
        next_q = net.target(x[K:]).reshape(T, K, -1)
    y = q_targets(algo, r, te, tr, next_q, a[1:], gamma)
    return q_loss(q, a[:T].reshape(-1), y.reshape(-1), mask), torch.zeros(())


async def main_async(cfg: C.ActorConfig) -> None:
    """Wire the actor-learner core to its sockets and run until stopped."""
    torch.set_num_threads(cfg.torch_threads)
    core = ActorLearnerCore(cfg)
    print(f"{core.name}: actor-learner, --algo {cfg.algo}, {cfg.envs_per_actor} envs, t_max {cfg.t_max}, "
          f"exploration {core.exploration}, gradients in {cfg.gradient_dtype}; restart {cfg.restart}, "
          f"seed {core.seed}", flush=True)
    socks = Sockets(cfg.insecure, cfg.keys)
    grads = socks.open(cfg, "actor_learner", "gradients", sync=True)  # owned by the stepping thread
    weights = socks.open(cfg, "actor_learner", "weights")
    tel = socks.open(cfg, "actor_learner", "telemetry")
    stop = asyncio.Event()
    install_stop(stop)
    pending: list = []  # newest decoded weights, handed to the stepping thread
    have_weights = threading.Event()
    counters = {"rejected": 0, "sent": 0}

    def stepping() -> None:
        # Acting, the loss and its gradient, all CPU-bound, off the event loop; the gradient goes
        # straight to the socket this thread owns (a send waits only on backpressure, the HWM).
        while not stop.is_set() and (cfg.max_actor_steps == 0 or core.steps < cfg.max_actor_steps):
            if pending:
                w = pending.pop()
                core.set_weights(w.names, w.arrays, w.version, w.incarnation)
            if core.weights_version < 0:  # gradients are for the shared weights: wait for the first
                have_weights.wait(0.25)
                continue
            if send_until(grads, encode(core.segment()), stop):
                counters["sent"] += 1

    async def report() -> None:
        last, last_steps, last_sent = time.monotonic(), 0, 0
        while True:
            await asyncio.sleep(cfg.telemetry_period)
            now = time.monotonic()
            sps = (core.agent_steps - last_steps) / (now - last)
            gps = (counters["sent"] - last_sent) / (now - last)
            last, last_steps, last_sent = now, core.agent_steps, counters["sent"]
            episodes = core.episodes[:MAX_EPISODES]
            del core.episodes[:len(episodes)]
            metrics = {"actor/steps_per_s": sps, "actor/frames_per_s": sps * core.frame_skip,
                       "actor/agent_steps": core.agent_steps, "actor/frames": core.agent_steps * core.frame_skip,
                       "actor/weights_version": core.weights_version,
                       "actor/exploration": EXPLORATION_CODES[core.exploration],
                       "actor/gradients_per_s": gps, "actor/gradients_sent": counters["sent"],
                       "actor/rejected": counters["rejected"]}
            if math.isfinite(core.loss):  # telemetry carries finite numbers only
                metrics["actor/loss"] = core.loss
            if cfg.algo == "a3c":
                metrics["actor/entropy"] = core.entropy
            else:
                metrics["actor/epsilon_mean"] = float(core.epsilons().mean())
            await tel.send_multipart(encode(Telemetry(sender=core.name, seq=core.seq, role="actor", time=time.time(),
                                                      episodes=episodes, metrics=metrics)))

    try:
        await run_role(stop, [take_weights(weights, core, pending, counters, have_weights.set), report()], [stepping],
                       torch_threads=cfg.torch_threads)
    finally:
        socks.close()
        core.close()
