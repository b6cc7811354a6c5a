"""Environments: gymnasium vector-observation envs and Atari through ale-py's native vector env."""

from __future__ import annotations

import re
from dataclasses import dataclass

import gymnasium as gym
import numpy as np


@dataclass(frozen=True)
class EnvSpec:
    """What the network and the wire need to know about an environment."""

    env_id: str
    obs_shape: tuple[int, ...]
    obs_dtype: str
    num_actions: int
    atari: bool


def is_atari(env_id: str) -> bool:
    """True for ALE ids such as ``ALE/Pong-v5``."""
    return env_id.startswith("ALE/")


def ale_game(env_id: str) -> str:
    """ROM name of an ALE id: ``ALE/MsPacman-v5`` -> ``ms_pacman``."""
    m = re.fullmatch(r"ALE/([A-Za-z0-9]+)-v\d+", env_id)
    if not m:
        raise ValueError(f"expected an ALE id like 'ALE/Pong-v5', got {env_id!r}")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", m.group(1)).lower()


def make_vector_env(env_id: str, num_envs: int, seed: int, *, num_threads: int = 0, repeat_action_probability: float = 0.0,
                    full_action_space: bool = False, max_frames: int = 108_000,
                    noop_max: int = 30, render_mode: str | None = None) -> gym.vector.VectorEnv:
    """``num_envs`` copies of ``env_id`` as one vector env with next-step autoreset.

    Atari uses ale-py's C++ ``AtariVectorEnv`` (84x84 grey, frame-skip 4 with max-pool, 4-frame
    stack, no-op and fire resets) playing whole games with unclipped rewards, for training as for
    evaluation: the actor clips rewards itself and ends the n-step return at a lost life (seen in
    ``info["lives"]``) while the game goes on. (ale-py's ``episodic_life`` would reset the game at
    every lost life, so training would only ever see first lives.)
    ``max_frames`` caps an episode in emulator frames (agent steps x 4). ``render_mode`` applies to
    gymnasium envs only (the Atari vector env renders nothing; its observations are the frames).
    """
    if is_atari(env_id):
        import ale_py
        from ale_py.vector_env import AtariVectorEnv

        gym.register_envs(ale_py)
        env = AtariVectorEnv(
            ale_game(env_id), num_envs, num_threads=num_threads, episodic_life=False,
            reward_clipping=False, repeat_action_probability=repeat_action_probability,
            full_action_space=full_action_space, max_num_frames_per_episode=max_frames,
            noop_max=noop_max)
    else:
        env = gym.vector.SyncVectorEnv([lambda: gym.make(env_id, render_mode=render_mode)
                                        for _ in range(num_envs)],
                                       autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    env.reset(seed=seed)
    return env


def env_spec(env_id: str) -> EnvSpec:
    """Observation shape/dtype and action count of ``env_id``."""
    env = make_vector_env(env_id, 1, seed=0)
    try:
        space = env.single_observation_space
        return EnvSpec(env_id, tuple(int(d) for d in space.shape), str(np.dtype(space.dtype)),
                       int(env.single_action_space.n), is_atari(env_id))
    finally:
        env.close()
