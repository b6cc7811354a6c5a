"""Environments: gymnasium envs (vector or image observations) and Atari through ale-py's native vector env.

Any gymnasium env with a ``Discrete`` action space and a ``Box`` observation that is one-dimensional
(the MLP) or a uint8 image ``[H, W, C]`` / ``[C, H, W]`` (the CNN) trains; ``check_spaces`` refuses
the rest, naming what is supported and what the env has. ``adapt_env`` puts a supported env into
the one form every role sees: float32 vectors, channel-first images, actions 0..n-1.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from . import minatar_envs

minatar_envs.register()  # cheap: ids only; the games load when an env is made


@dataclass(frozen=True)
class EnvSpec:
    """What the network and the wire need to know about an environment."""

    env_id: str
    obs_shape: tuple[int, ...]
    obs_dtype: str
    num_actions: int
    atari: bool
    # The largest pixel value of an image observation (the space's ``high``): the networks scale images
    # by 1 / pixel_max, so Atari's 0..255 frames and MinAtar's 0/1 object channels both enter as [0, 1].
    pixel_max: int = 255


# The smallest image side the CNN takes (networks.py: two 3x3 convolutions, the second of stride 2).
MIN_IMAGE_SIDE = 5

SUPPORTED_SPACES = (f"a Discrete action space and a Box observation space that is one-dimensional (any "
                    f"length and number type: the MLP, fed float32) or a uint8 image [H, W, C] or [C, H, W] "
                    f"of at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} (the CNN)")


class UnsupportedEnv(ValueError):
    """An env whose observation or action space the networks cannot take."""


def image_layout(shape: tuple[int, ...]) -> str:
    """``"CHW"`` or ``"HWC"`` for a 3-D image shape: the channel axis is the shorter of the two ends,
    as in (4, 84, 84) and (96, 96, 3); a tie counts as channel-first."""
    return "HWC" if shape[2] < shape[0] else "CHW"


def space_problem(obs_space: gym.Space, action_space: gym.Space) -> str | None:
    """Why the networks cannot take an env with these spaces, or None when they can."""
    if not isinstance(action_space, gym.spaces.Discrete):
        return f"its action space is {type(action_space).__name__}, not Discrete"
    if not isinstance(obs_space, gym.spaces.Box):
        return f"its observation space is {type(obs_space).__name__}, not Box"
    shape, dtype = tuple(obs_space.shape), np.dtype(obs_space.dtype)
    if len(shape) == 1:
        return None if shape[0] >= 1 else "its observation is empty"
    if len(shape) == 3:
        if dtype != np.uint8:
            return f"its observation is 3-D {dtype} {list(shape)}, and a 3-D observation must be a uint8 image"
        h, w = shape[1:] if image_layout(shape) == "CHW" else shape[:2]
        if min(h, w) < MIN_IMAGE_SIDE:
            return (f"its image {list(shape)} is {h}x{w} ({image_layout(shape)}), under "
                    f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}")
        return None
    return f"its observation is {len(shape)}-D {dtype} {list(shape)}, neither 1-D nor a 3-D uint8 image"


def check_spaces(env_id: str, obs_space: gym.Space, action_space: gym.Space) -> None:
    """``UnsupportedEnv`` naming what is supported and what ``env_id`` has, unless the spaces fit."""
    problem = space_problem(obs_space, action_space)
    if problem is not None:
        raise UnsupportedEnv(f"--env {env_id} is not supported: {problem}. Supported: {SUPPORTED_SPACES}. "
                             f"{env_id} has observation space {obs_space} and action space {action_space}")


def adapt_env(env: gym.Env, env_id: str) -> gym.Env:
    """``env`` as every role takes it: 1-D observations as float32, images channel-first ([C, H, W],
    fed to the CNN at their own size), actions 0..n-1. ``UnsupportedEnv`` (``env`` closed) when its
    spaces do not fit."""
    obs, act = env.observation_space, env.action_space
    try:
        check_spaces(env_id, obs, act)
    except UnsupportedEnv:
        env.close()
        raise
    if int(act.start) != 0:  # the networks pick 0..n-1
        env = gym.wrappers.TransformAction(env, lambda a, start=int(act.start): a + start,
                                           gym.spaces.Discrete(int(act.n)))
    if len(obs.shape) == 1 and np.dtype(obs.dtype) != np.float32:
        vec = gym.spaces.Box(obs.low.astype(np.float32), obs.high.astype(np.float32), dtype=np.float32)
        env = gym.wrappers.TransformObservation(env, lambda o: np.asarray(o, dtype=np.float32), vec)
    elif len(obs.shape) == 3 and image_layout(obs.shape) == "HWC":
        chw = gym.spaces.Box(np.transpose(obs.low, (2, 0, 1)), np.transpose(obs.high, (2, 0, 1)),
                             dtype=np.uint8)
        env = gym.wrappers.TransformObservation(env, lambda o: np.transpose(o, (2, 0, 1)), chw)
    return env


def make_env(env_id: str, **kwargs) -> gym.Env:
    """``gym.make(env_id)``, without gymnasium's "out of date" warning for ``MinAtar/<Game>-v0`` (its
    all-actions version, the published one, is kept on purpose beside the minimal-action ``-v1``)."""
    if not minatar_envs.is_minatar(env_id):
        return gym.make(env_id, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is out of date.*")
        return gym.make(env_id, **kwargs)


def check_env(env_id: str) -> None:
    """Make one ``env_id`` and check its spaces (``UnsupportedEnv``); ALE ids always fit. Unknown ids
    raise gymnasium's own errors (``gym.error.Error``)."""
    if is_atari(env_id):
        return
    env = make_env(env_id)
    try:
        check_spaces(env_id, env.observation_space, env.action_space)
    finally:
        env.close()


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
    Other envs go through ``adapt_env`` (``UnsupportedEnv`` for spaces the networks cannot take).
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
        env = gym.vector.SyncVectorEnv([lambda: adapt_env(make_env(env_id, render_mode=render_mode), env_id)
                                        for _ in range(num_envs)],
                                       autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    env.reset(seed=seed)
    return env


def env_spec(env_id: str) -> EnvSpec:
    """Observation shape/dtype and action count of ``env_id`` as the roles see it (``adapt_env``)."""
    env = make_vector_env(env_id, 1, seed=0)
    try:
        space = env.single_observation_space
        pixel_max = 255
        if len(space.shape) == 3 and isinstance(space, gym.spaces.Box) and np.all(np.isfinite(space.high)):
            pixel_max = max(1, int(np.max(space.high)))
        return EnvSpec(env_id, tuple(int(d) for d in space.shape), str(np.dtype(space.dtype)),
                       int(env.single_action_space.n), is_atari(env_id), pixel_max)
    finally:
        env.close()
