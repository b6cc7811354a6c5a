"""Evaluation protocols: how evaluation episodes start, how long they may last and what is reported.

Atari (ALE ids), evaluated on ale-py's ``AtariVectorEnv`` with unclipped rewards and no episodic life:

* ``classic`` -- DQN / Ape-X (Mnih et al. 2015, Horgan et al. 2018): up to 30 no-op actions at the
  start of each episode, a 108,000-frame (30-minute) cap, the game's minimal action set,
  deterministic actions.
* ``sticky`` -- ALE v5 defaults (Machado et al. 2018): the previous action is repeated with
  probability 0.25 at every frame, no no-op starts (sticky actions are the source of randomness),
  the 108,000-frame cap, the minimal action set.
* ``saber`` -- SABER (Toromanoff et al. 2019): sticky actions (0.25), the full 18-action set, no
  no-op starts, an episode that ends after 5 minutes of play without any reward, a very long cap
  (100 hours of play), and the returns after 5 and 30 minutes reported beside the full one.

Any other env (CartPole-v1, ...) has the ``plain`` protocol: the env's own episode end.

Time is counted as the ALE counts it: 60 frames a second, 4 frames per agent step (frame-skip 4),
so 5 minutes = 18,000 frames = 4,500 agent steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from apex_zmq.envs import ale_game, is_atari, make_vector_env
from apex_zmq.exploration import epsilon_greedy
from apex_zmq.networks import q_values

from .atari_scores import has_hns, human_normalized

FPS = 60          # Atari 2600 frames per second
FRAME_SKIP = 4    # emulator frames per agent step in AtariVectorEnv


def minutes(m: float) -> int:
    """Emulator frames in ``m`` minutes of play."""
    return int(round(m * 60 * FPS))


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol. Frame counts are emulator frames; 0 means 'none'."""

    name: str
    noop_max: int = 0
    repeat_action_probability: float = 0.0
    full_action_space: bool = False
    max_frames: int = minutes(30)
    no_reward_timeout_frames: int = 0
    # (name, frames): also report the return collected within the first ``frames`` of an episode
    score_marks: tuple[tuple[str, int], ...] = ()
    frame_skip: int = FRAME_SKIP


PLAIN = Protocol("plain", max_frames=0, frame_skip=1)
PROTOCOLS: dict[str, Protocol] = {
    "classic": Protocol("classic", noop_max=30),
    "sticky": Protocol("sticky", repeat_action_probability=0.25),
    # SABER asks for no cap at all; 100 hours is a backstop, the no-reward timeout is what ends
    # episodes of an agent that stopped scoring.
    "saber": Protocol("saber", repeat_action_probability=0.25, full_action_space=True,
                      max_frames=minutes(100 * 60), no_reward_timeout_frames=minutes(5),
                      score_marks=(("return_5min", minutes(5)), ("return_30min", minutes(30)))),
}
PROTOCOL_NAMES = tuple(PROTOCOLS)


def protocol_for(env_id: str, name: str) -> Protocol:
    """The protocol ``name`` for an ALE id; ``plain`` for every other env (the name is then moot)."""
    if not is_atari(env_id):
        return PLAIN
    if name not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {name!r}; expected one of {list(PROTOCOLS)}")
    return PROTOCOLS[name]


def make_eval_env(env_id: str, num_envs: int, seed: int, protocol: Protocol, *, max_frames: int = 0,
                  render: bool = False):
    """``num_envs`` evaluation envs under ``protocol`` (env i seeded ``seed + i``).

    ``max_frames`` > 0 replaces the protocol's frame cap (Atari). ``render`` asks a gymnasium env for
    RGB frames (Atari frames come from the observations instead).
    """
    if protocol is PLAIN or not is_atari(env_id):
        return make_vector_env(env_id, num_envs, seed,
                               render_mode="rgb_array" if render else None)
    return make_vector_env(env_id, num_envs, seed,  # unclipped rewards, whole games
                           repeat_action_probability=protocol.repeat_action_probability,
                           full_action_space=protocol.full_action_space,
                           max_frames=max_frames or protocol.max_frames, noop_max=protocol.noop_max)


def minimal_action_ids(env_id: str) -> list[int]:
    """ALE action ids of the game's minimal action set (what a network trained by default outputs)."""
    import ale_py
    from ale_py import roms

    ale = ale_py.ALEInterface()
    ale.setLoggerMode(ale_py.LoggerMode.Error)
    ale.loadROM(roms.get_rom_path(ale_game(env_id)))
    return [a.value for a in ale.getMinimalActionSet()]


def action_index_map(num_outputs: int, env_actions: Sequence[int], minimal_actions: Sequence[int]) -> np.ndarray:
    """For each network output, the env action index that plays it.

    A network whose outputs match the env's action set plays it directly. A network trained on the
    game's minimal set (the default) plays a full-action-set env through the ALE ids of its minimal
    actions: it keeps its own choices, it never picks the actions the game ignores.
    """
    if num_outputs == len(env_actions):
        return np.arange(num_outputs)
    if num_outputs == len(minimal_actions):
        where = {a: i for i, a in enumerate(env_actions)}
        missing = [a for a in minimal_actions if a not in where]
        if missing:
            raise ValueError(f"the env has no action with ALE id(s) {missing}")
        return np.array([where[a] for a in minimal_actions], dtype=np.int64)
    raise ValueError(f"the network has {num_outputs} outputs but the env has {len(env_actions)} actions "
                     f"(the game's minimal set has {len(minimal_actions)}): was it trained on another game?")


def env_action_map(env: Any, env_id: str, num_outputs: int) -> np.ndarray:
    """``action_index_map`` for an env made by ``make_eval_env``."""
    if not is_atari(env_id):
        return action_index_map(num_outputs, list(range(int(env.single_action_space.n))), [])
    env_actions = [a.value for a in env.ale.get_action_set()]
    return action_index_map(num_outputs, env_actions, minimal_action_ids(env_id))


@dataclass
class Episodes:
    """What ``run_episodes`` measured, one entry per env (= episode)."""

    returns: np.ndarray                 # float, the full undiscounted return
    lengths: np.ndarray                 # int, agent steps
    stalled: np.ndarray                 # bool, ended by the no-reward timeout
    marks: dict[str, np.ndarray] = field(default_factory=dict)  # return within the first N frames


def run_episodes(step: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], num_envs: int, *,
                 frame_skip: int = 1, no_reward_timeout_frames: int = 0,
                 score_marks: Sequence[tuple[str, int]] = ()) -> Episodes:
    """Run one episode per env until all have ended.

    ``step(running)`` advances every env one agent step and returns (rewards, done); ``running``
    says which envs are still in their first episode (later steps of an env that ended are ignored).
    An episode also ends when ``no_reward_timeout_frames`` frames pass without a non-zero reward.
    For each (name, frames) of ``score_marks`` the return collected within the first ``frames``
    frames is kept (the full return if the episode was shorter).
    """
    returns = np.zeros(num_envs)
    lengths = np.zeros(num_envs, dtype=np.int64)
    since_reward = np.zeros(num_envs, dtype=np.int64)  # agent steps since the last non-zero reward
    stalled = np.zeros(num_envs, dtype=bool)
    marks = {name: np.zeros(num_envs) for name, _ in score_marks}
    running = np.ones(num_envs, dtype=bool)
    while running.any():
        rewards, done = step(running.copy())
        rewards = np.where(running, np.asarray(rewards, dtype=np.float64), 0.0)
        returns += rewards
        lengths += running
        since_reward = np.where(rewards != 0, 0, since_reward + running)
        frames = lengths * frame_skip
        for name, limit in score_marks:
            marks[name] = np.where(running & (frames <= limit), returns, marks[name])
        ended = np.asarray(done, dtype=bool)
        if no_reward_timeout_frames:
            stall = running & ~ended & (since_reward * frame_skip >= no_reward_timeout_frames)
            stalled |= stall
            ended = ended | stall
        running &= ~ended
    return Episodes(returns, lengths, stalled, marks)


@dataclass
class Evaluation:
    """The episodes of one evaluation with the env, protocol and seeds they were played under."""

    env_id: str
    protocol: str
    seeds: np.ndarray
    episodes: Episodes

    @property
    def returns(self) -> np.ndarray:
        return self.episodes.returns

    @property
    def lengths(self) -> np.ndarray:
        return self.episodes.lengths

    @property
    def mean(self) -> float:
        return float(self.returns.mean())

    @property
    def hns(self) -> Optional[float]:
        """Human-normalized mean score for an Atari game of the 57 (None for other envs)."""
        if not is_atari(self.env_id):
            return None
        return human_normalized(self.env_id, self.mean) if has_hns(self.env_id) else math.nan

    def summary(self) -> dict[str, Any]:
        """mean, std, min, max over the episodes (+ hns for Atari, + the mark returns' means)."""
        r = self.returns
        out: dict[str, Any] = {"protocol": self.protocol, "episodes": len(r), "mean": self.mean,
                               "std": float(r.std()), "min": float(r.min()), "max": float(r.max())}
        if self.hns is not None:
            out["hns"] = self.hns
        for name, values in self.episodes.marks.items():
            out[name] = float(values.mean())
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One dict per episode: episode, seed, return, length, stalled (+ mark returns, hns)."""
        out = []
        for i in range(len(self.returns)):
            row: dict[str, Any] = {"episode": i, "seed": int(self.seeds[i]), "return": float(self.returns[i]),
                                   "length": int(self.lengths[i]), "stalled": bool(self.episodes.stalled[i])}
            for name, values in self.episodes.marks.items():
                row[name] = float(values[i])
            if self.hns is not None:
                row["hns"] = human_normalized(self.env_id, float(self.returns[i]))
            out.append(row)
        return out


def frame_of(env: Any, env_id: str, obs: np.ndarray) -> np.ndarray:
    """A picture of env 0: the newest grey frame of its Atari stack, else the env's RGB render."""
    if is_atari(env_id):
        return np.asarray(obs[0, -1])
    import gymnasium as gym
    try:
        frames = env.render()
    except gym.error.DependencyNotInstalled as e:
        raise RuntimeError(f"{env_id} cannot render RGB frames here: {e}") from e
    if frames is None or len(frames) == 0 or frames[0] is None:
        raise RuntimeError(f"{env_id} renders no RGB frames; video needs an Atari env or an rgb_array render")
    return np.asarray(frames[0])


@torch.no_grad()
def evaluate_policy(net: torch.nn.Module, env_id: str, episodes: int, epsilon: float, seed: int,
                    protocol: Protocol, *, max_frames: int = 0,
                    record: Optional[Callable[[np.ndarray], None]] = None) -> Evaluation:
    """Play ``episodes`` episodes side by side (env i seeded ``seed + i``) epsilon-greedily.

    ``record`` receives every frame of episode 0, from its first observation to its last.
    """
    env = make_eval_env(env_id, episodes, seed, protocol, max_frames=max_frames, render=record is not None)
    try:
        obs, _ = env.reset(seed=seed)
        num_outputs = int(q_values(net, torch.as_tensor(obs[:1])).shape[1])
        to_env = env_action_map(env, env_id, num_outputs)
        rng = np.random.default_rng(seed)
        eps = np.full(episodes, epsilon)
        current = [obs]
        if record is not None:
            record(frame_of(env, env_id, obs))

        def step(running: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            q = q_values(net, torch.as_tensor(current[0])).numpy()
            nxt, r, term, trunc, _ = env.step(to_env[epsilon_greedy(q, eps, rng)])
            current[0] = nxt
            if record is not None and running[0]:
                record(frame_of(env, env_id, nxt))
            return r, term | trunc

        ep = run_episodes(step, episodes, frame_skip=protocol.frame_skip,
                          no_reward_timeout_frames=protocol.no_reward_timeout_frames,
                          score_marks=protocol.score_marks)
        return Evaluation(env_id, protocol.name, seed + np.arange(episodes), ep)
    finally:
        env.close()
