"""MinAtar (Young & Tian 2019) as a gymnasium env family: ``MinAtar/<Game>-v0`` (all 6 actions, as both
the MinAtar and the "Revisiting Rainbow" papers played) and ``-v1`` (the game's minimal action set).

gymnasium 1.x no longer runs the ``minatar`` package's own registration hook, so ``register`` (called
when ``apex_zmq.envs`` is imported) registers the ten ids here; the game code is only loaded when an
env is made. The ``minatar`` package (GPL-3.0, an optional dependency: ``pip install --no-deps
minatar==1.0.15``) declares matplotlib, pandas, scipy and seaborn for its plots; playing needs none of
them, and importing ``minatar`` itself imports matplotlib's pyplot (and warns without seaborn). So the
game files, which need only numpy, are loaded from the installed package without running its
``__init__``; the sticky-action wrapper (``minatar.Environment.act``) is written out here the same way.

Frames are MinAtar's bool [10, 10, C] object channels, given channel-first as uint8 0/1 with an
observation space whose ``high`` is 1: ``envs.env_spec`` reads the pixel scale from it, so the
networks feed these frames as they are instead of dividing them by 255 like Atari's.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

import gymnasium as gym
import numpy as np

# Game id -> the module name of the game in minatar/environments/.
GAMES = {"Asterix": "asterix", "Breakout": "breakout", "Freeway": "freeway", "Seaquest": "seaquest",
         "SpaceInvaders": "space_invaders"}
PREFIX = "MinAtar/"
INSTALL_HINT = ("MinAtar envs need the minatar package (GPL-3.0), installed without its plotting "
                "dependencies: .venv/bin/pip install --no-deps minatar==1.0.15")
# A truncation far past any published score's episode length: an evaluation of an agent that never
# loses (Breakout refills its bricks) still ends.
MAX_EPISODE_STEPS = 100_000


def is_minatar(env_id: str) -> bool:
    """True for ``MinAtar/<Game>-v0`` / ``-v1`` ids."""
    return env_id.startswith(PREFIX)


def game_module(game: str) -> ModuleType:
    """The ``minatar.environments.<game>`` module, loaded from the installed package without running
    ``minatar/__init__.py`` (which imports matplotlib's pyplot and seaborn)."""
    name = f"apex_zmq._minatar_games.{game}"
    if name in sys.modules:
        return sys.modules[name]
    # The package's folder on sys.path, looked up by its files rather than by find_spec("minatar"), which a
    # script named minatar.py (bench/minatar.py) would answer.
    path = next((p for p in (os.path.join(d or ".", "minatar", "environments", f"{game}.py") for d in sys.path)
                 if os.path.isfile(p)), None)
    if path is None:
        raise ModuleNotFoundError(f"no MinAtar game {game!r} found; {INSTALL_HINT}")
    file_spec = importlib.util.spec_from_file_location(name, path)
    if file_spec is None or file_spec.loader is None:
        raise ModuleNotFoundError(f"cannot load the MinAtar game at {path}; {INSTALL_HINT}")
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


class MinAtarEnv(gym.Env):
    """One MinAtar game: sticky actions (``sticky_action_prob``, 0.1 by default, as the paper) and
    difficulty ramping (on by default) as ``minatar.Environment`` plays them; frames uint8 0/1 [C, 10, 10]."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, game: str, minimal_actions: bool = False, sticky_action_prob: float = 0.1,
                 difficulty_ramping: bool = True, render_mode: str | None = None) -> None:
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"MinAtar render modes: None or 'rgb_array', got {render_mode!r}")
        self.render_mode = render_mode
        self.random = np.random.RandomState()
        self.game = game_module(game).Env(ramping=difficulty_ramping)
        self.game.random = self.random  # one stream for the game and the sticky actions, as minatar's
        self.sticky_action_prob = float(sticky_action_prob)
        self.last_action = 0
        self.action_set = list(self.game.minimal_action_set()) if minimal_actions else list(range(6))
        h, w, c = self.game.state_shape()
        self.action_space = gym.spaces.Discrete(len(self.action_set))
        self.observation_space = gym.spaces.Box(0, 1, (c, h, w), dtype=np.uint8)

    def _obs(self) -> np.ndarray:
        return np.ascontiguousarray(self.game.state().transpose(2, 0, 1), dtype=np.uint8)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self.random.seed(seed)
        self.game.reset()
        return self._obs(), {}

    def step(self, action):
        a = self.action_set[int(action)]
        if self.random.rand() < self.sticky_action_prob:  # minatar.Environment.act, written out
            a = self.last_action
        self.last_action = a
        reward, done = self.game.act(a)
        return self._obs(), float(reward), bool(done), False, {}

    def render(self) -> np.ndarray | None:
        """An RGB picture of the frame (one colour per object channel), for videos."""
        if self.render_mode != "rgb_array":
            return None
        state = self.game.state()
        c = state.shape[2]
        palette = np.concatenate([[[0, 0, 0]], (np.linspace(60, 255, c)[:, None]
                                                * np.array([[1.0, 0.6, 0.3]])).astype(int)])
        return palette[np.amax(state * np.arange(1, c + 1), axis=2)].astype(np.uint8)


def register() -> None:
    """Register ``MinAtar/<Game>-v0`` (all 6 actions) and ``-v1`` (minimal set) with gymnasium, once."""
    for game, module in GAMES.items():
        for version, minimal in (("v0", False), ("v1", True)):
            env_id = f"{PREFIX}{game}-{version}"
            if env_id not in gym.registry:
                gym.register(env_id, entry_point="apex_zmq.minatar_envs:MinAtarEnv",
                             max_episode_steps=MAX_EPISODE_STEPS,
                             kwargs=dict(game=module, minimal_actions=minimal))
