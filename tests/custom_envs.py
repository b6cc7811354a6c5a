"""A "bring your own environment" module for the tests: ``--env-module tests.custom_envs`` registers
these gymnasium envs (as RL Zoo's gym packages do). Importable from the repository root, where the
tests start ./run.sh and the roles.

* ``CustomCorridor-v0``: a 1-D ``Box`` observation and ``Discrete(2)`` actions, learnt in seconds.
* ``CustomImageCorridor-v0`` / ``CustomImageCorridorCHW-v0``: the same corridor seen as a small uint8
  image, [H, W, C] and [C, H, W].
* ``CustomOffsetCorridor-v0``: the corridor with float64 observations and actions numbered from 1.
* ``CustomBoxAction-v0``, ``CustomDictObs-v0``, ``CustomFloatGrid-v0``, ``CustomMultiDiscrete-v0``,
  ``CustomFloatImage-v0``, ``CustomTinyImage-v0``: spaces the networks cannot take (refused).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

LENGTH = 11          # cells 0..10; the walk starts in the middle, both ends end the episode
MAX_STEPS = 50
SOLVED_RETURN = 1.0  # every episode at the flagged end


class Corridor(gym.Env):
    """Walk to the end of a corridor that the observation's flag points at.

    Observation: the one-hot cell (``LENGTH``) and the flag (+1: the right end, -1: the left end).
    Actions: 0 left, 1 right on even cells, mirrored on odd ones (so that no untrained network that
    merely follows the flag solves it). Reward +1 at the flagged end, -1 at the other (both end the
    episode), 0 otherwise; at most ``MAX_STEPS`` steps. A random or constant policy scores about 0,
    the learnt one ``SOLVED_RETURN``: five steps towards the flag, whichever it is.
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, render_mode: str | None = None) -> None:
        self.render_mode = render_mode
        self.observation_space = spaces.Box(-1.0, 1.0, (LENGTH + 1,), np.float32)
        self.action_space = spaces.Discrete(2)
        self.pos = LENGTH // 2
        self.goal_right = True

    def _obs(self) -> np.ndarray:
        obs = np.zeros(LENGTH + 1, np.float32)
        obs[self.pos] = 1.0
        obs[LENGTH] = 1.0 if self.goal_right else -1.0
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        self.pos = LENGTH // 2
        self.goal_right = bool(self.np_random.integers(2))
        return self._obs(), {}

    def _move(self, action: Any) -> tuple[float, bool]:
        right = (int(action) == 1) != (self.pos % 2 == 1)  # the controls are mirrored on odd cells
        self.pos += 1 if right else -1
        if self.pos in (0, LENGTH - 1):
            return (1.0 if (self.pos == LENGTH - 1) == self.goal_right else -1.0), True
        return 0.0, False

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        reward, done = self._move(action)
        return self._obs(), reward, done, False, {}

    def render(self) -> np.ndarray:
        return np.repeat(_picture(self.pos, self.goal_right)[:, :, :1], 3, axis=2)


def _picture(pos: int, goal_right: bool, height: int = 6) -> np.ndarray:
    """The corridor as a uint8 [height, LENGTH, 2] image: the walker's column, the flagged end's."""
    img = np.zeros((height, LENGTH, 2), np.uint8)
    img[:, pos, 0] = 255
    img[:, LENGTH - 1 if goal_right else 0, 1] = 255
    return img


class ImageCorridor(Corridor):
    """The corridor as a uint8 image, channels last ([6, 11, 2]) or first ([2, 6, 11])."""

    def __init__(self, render_mode: str | None = None, channels_first: bool = False) -> None:
        super().__init__(render_mode)
        self.channels_first = channels_first
        shape = (2, 6, LENGTH) if channels_first else (6, LENGTH, 2)
        self.observation_space = spaces.Box(0, 255, shape, np.uint8)

    def _obs(self) -> np.ndarray:
        img = _picture(self.pos, self.goal_right)
        return np.ascontiguousarray(img.transpose(2, 0, 1)) if self.channels_first else img


class OffsetCorridor(Corridor):
    """The corridor with float64 observations and actions 1 (left) and 2 (right)."""

    def __init__(self, render_mode: str | None = None) -> None:
        super().__init__(render_mode)
        self.observation_space = spaces.Box(-1.0, 1.0, (LENGTH + 1,), np.float64)
        self.action_space = spaces.Discrete(2, start=1)

    def _obs(self) -> np.ndarray:
        return super()._obs().astype(np.float64)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        if not self.action_space.contains(int(action)):
            raise ValueError(f"action {action} is not in {self.action_space}")
        return super().step(int(action) - 1)


class SpacesOnly(gym.Env):
    """An env with the given spaces that plays nothing much (for the refusal tests)."""

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space,
                 render_mode: str | None = None) -> None:
        self.observation_space = observation_space
        self.action_space = action_space

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        return self.observation_space.sample(), 0.0, True, False, {}


UNSUPPORTED: dict[str, tuple[spaces.Space, spaces.Space, str]] = {
    # id: (observation space, action space, what the refusal names)
    "CustomBoxAction-v0": (spaces.Box(-1, 1, (4,), np.float32), spaces.Box(-1, 1, (2,), np.float32),
                           "its action space is Box, not Discrete"),
    "CustomDictObs-v0": (spaces.Dict({"x": spaces.Box(-1, 1, (4,), np.float32)}), spaces.Discrete(3),
                         "its observation space is Dict, not Box"),
    "CustomFloatGrid-v0": (spaces.Box(-1, 1, (3, 4), np.float32), spaces.Discrete(3),
                           "its observation is 2-D float32 [3, 4]"),
    "CustomMultiDiscrete-v0": (spaces.Box(-1, 1, (4,), np.float32), spaces.MultiDiscrete([2, 3]),
                               "its action space is MultiDiscrete, not Discrete"),
    "CustomFloatImage-v0": (spaces.Box(0, 1, (3, 16, 16), np.float32), spaces.Discrete(3),
                            "a 3-D observation must be a uint8 image"),
    "CustomTinyImage-v0": (spaces.Box(0, 255, (4, 4, 3), np.uint8), spaces.Discrete(3), "under 5x5"),
}


def _register() -> None:
    gym.register("CustomCorridor-v0", entry_point=Corridor, max_episode_steps=MAX_STEPS)
    gym.register("CustomImageCorridor-v0", entry_point=ImageCorridor, max_episode_steps=MAX_STEPS)
    gym.register("CustomImageCorridorCHW-v0", entry_point=ImageCorridor, max_episode_steps=MAX_STEPS,
                 kwargs={"channels_first": True})
    gym.register("CustomOffsetCorridor-v0", entry_point=OffsetCorridor, max_episode_steps=MAX_STEPS)
    for env_id, (obs, act, _) in UNSUPPORTED.items():
        gym.register(env_id, entry_point=SpacesOnly, kwargs={"observation_space": obs, "action_space": act})


if "CustomCorridor-v0" not in gym.registry:  # imported twice (under another name): registered once
    _register()
