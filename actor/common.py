"""What the Ape-X actor (``actor.main``) and the asynchronous family's actor-learner (``actor.actor_learner``)
share: episode bookkeeping, lost lives, the exploration codes telemetry carries, taking weights. Both import
it; the actor program only dispatches to one of them."""

from __future__ import annotations

from typing import Callable

import numpy as np

from apex_zmq.networks import weights_mismatch
from apex_zmq.transport import recv_latest
from apex_zmq.wire import WireError, decode_weights


class EpisodeTracker:
    """Running returns and lengths of K env slots; ``step`` returns the episodes that just finished, as
    telemetry carries them (``wire.EPISODE_KEYS``)."""

    def __init__(self, k: int, first_slot: int) -> None:
        self.first_slot = first_slot  # the run-wide slot number of env 0
        self.ret = np.zeros(k)          # whole game, unclipped: the score users compare
        self.clipped_ret = np.zeros(k)  # what the learner is trained on
        self.length = np.zeros(k, dtype=np.int64)

    def step(self, rewards: np.ndarray, clipped: np.ndarray, done: np.ndarray, live: np.ndarray,
             eps: np.ndarray) -> list[dict[str, float]]:
        """Count one vector step (``live``: not an autoreset step) and take the episodes ``done`` ends."""
        self.ret += np.where(live, rewards, 0.0)
        self.clipped_ret += np.where(live, clipped, 0.0)
        self.length += live
        out = []
        for k in np.nonzero(done & live)[0]:
            out.append({"slot": self.first_slot + int(k), "epsilon": float(eps[k]), "return": float(self.ret[k]),
                        "clipped_return": float(self.clipped_ret[k]), "length": int(self.length[k])})
            self.ret[k] = self.clipped_ret[k] = 0.0
            self.length[k] = 0
        return out


# Telemetry carries numbers: the dashboard's ladder names the exploration from this code.
# 3 and 4: the asynchronous family's actor-learners (a3c samples its policy; the Q algorithms anneal
# each slot's epsilon from 1 to one drawn from {0.1, 0.01, 0.5}).
EXPLORATION_CODES = {"ladder": 0, "noisy": 1, "both": 2, "policy": 3, "annealed": 4}


def life_lost(prev_lives: np.ndarray | None, lives: np.ndarray | None, valid: np.ndarray) -> np.ndarray:
    """Envs whose step (a valid one: not an autoreset step, where lives jump back up) lost a life."""
    if prev_lives is None or lives is None:
        return np.zeros(len(valid), dtype=bool)
    return valid & (np.asarray(lives) < prev_lives)


def newer_weights(have_incarnation: int, have_version: int, incarnation: int, version: int) -> bool:
    """Take weights from another learner incarnation at once (a restarted learner counts its steps
    from its checkpoint, or from 0), and from the same one only when they are newer."""
    return incarnation != have_incarnation or version > have_version


async def take_weights(sock, core, pending: list, counters: dict[str, int],
                       on_new: Callable[[], None] = lambda: None) -> None:
    """Receive weights for ``core`` (its ``net``, ``weights_version``, ``weights_incarnation``) forever: a
    malformed message, or weights of another network, is dropped and counted in ``counters["rejected"]``;
    the newest newer ones wait in ``pending`` for the stepping thread, which adopts them between steps."""
    while True:
        frames = await recv_latest(sock)
        try:
            w = decode_weights(frames)
            why = weights_mismatch(core.net, w.names, w.arrays)
            if why is not None:  # well-formed, but for another network: dropped, not a crash
                raise WireError(why)
        except WireError:
            counters["rejected"] += 1
            continue
        if newer_weights(core.weights_incarnation, core.weights_version, w.incarnation, w.version):
            pending[:] = [w]
            on_new()
