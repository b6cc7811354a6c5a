"""Evaluation protocols: env settings, sticky actions, SABER's timeout and marks, human-normalized scores."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import numpy as np
import pytest
import torch

from apex_zmq.envs import EnvSpec
from apex_zmq.models import build_network
from evaluator import protocols as P
from evaluator.atari_scores import RANDOM_HUMAN, has_hns, human_normalized, median_hns, table_key

PONG = "ALE/Pong-v5"
PONG_MINIMAL = [0, 1, 3, 4, 11, 12]  # NOOP FIRE RIGHT LEFT RIGHTFIRE LEFTFIRE as ALE action ids


def test_protocol_definitions() -> None:
    classic, sticky, saber = (P.PROTOCOLS[n] for n in ("classic", "sticky", "saber"))
    assert (classic.noop_max, classic.repeat_action_probability, classic.full_action_space,
            classic.max_frames) == (30, 0.0, False, 108_000)
    assert (sticky.noop_max, sticky.repeat_action_probability, sticky.full_action_space,
            sticky.max_frames) == (0, 0.25, False, 108_000)
    assert (saber.repeat_action_probability, saber.full_action_space) == (0.25, True)
    # 5 minutes at 60 fps = 18,000 frames = 4,500 agent steps of 4 frames
    assert saber.no_reward_timeout_frames == 18_000 and saber.frame_skip == 4
    assert dict(saber.score_marks) == {"return_5min": 18_000, "return_30min": 108_000}
    assert saber.max_frames >= 100 * 108_000
    assert P.protocol_for("CartPole-v1", "saber") is P.PLAIN
    with pytest.raises(ValueError, match="unknown evaluation protocol"):
        P.protocol_for(PONG, "nope")


@pytest.mark.parametrize("name,expected", [
    ("classic", dict(noop_max=30, repeat_action_probability=0.0, full_action_space=False, max_frames=108_000)),
    ("sticky", dict(noop_max=0, repeat_action_probability=0.25, full_action_space=False, max_frames=108_000)),
    ("saber", dict(noop_max=0, repeat_action_probability=0.25, full_action_space=True, max_frames=21_600_000)),
])
def test_eval_env_settings_reach_the_vector_env(monkeypatch: pytest.MonkeyPatch, name: str, expected: dict) -> None:
    seen: dict = {}
    monkeypatch.setattr(P, "make_vector_env", lambda *a, **kw: seen.update(kw) or "env")
    P.make_eval_env(PONG, 2, 0, P.PROTOCOLS[name])
    assert seen == expected
    P.make_eval_env(PONG, 2, 0, P.PROTOCOLS[name], max_frames=400)
    assert seen["max_frames"] == 400


def _divergence(protocol: P.Protocol, steps: int = 40) -> tuple[int, int, bool]:
    """Play one fixed action sequence in 4 differently seeded Pong envs.

    Returns the action count, the first step at which their screens differ (-1: never) and
    whether an episode was cut at the 100-step cap.
    """
    env = P.make_eval_env(PONG, 4, 0, protocol, max_frames=400)
    try:
        n = int(env.single_action_space.n)
        to_env = P.env_action_map(env, PONG, 6)
        obs, _ = env.reset(seed=0)
        first = -1
        for t in range(100):
            a = np.full(4, 2 if (t // 3) % 2 == 0 else 3)  # RIGHT x3, LEFT x3, ... (minimal indices)
            obs, _, term, trunc, _ = env.step(to_env[a])
            if first < 0 and t < steps and any((obs[i] != obs[0]).any() for i in range(1, 4)):
                first = t
            if t < 99:
                assert not (term | trunc).any(), f"episode ended early at step {t}"
        return n, first, bool(trunc.all())
    finally:
        env.close()


def test_sticky_actions_are_observable_and_the_cap_holds() -> None:
    no_sticky = dataclasses.replace(P.PROTOCOLS["sticky"], repeat_action_probability=0.0)
    n, first, capped = _divergence(no_sticky)
    assert (n, first, capped) == (6, -1, True)   # deterministic: same actions, same screens
    n, first, capped = _divergence(P.PROTOCOLS["sticky"])
    assert n == 6 and first >= 0 and capped      # the seeds' sticky repeats make them differ
    n, first, capped = _divergence(P.PROTOCOLS["saber"])
    assert n == 18 and first >= 0 and capped     # full action set, sticky too


def test_action_index_map() -> None:
    full = list(range(18))
    assert P.action_index_map(18, full, PONG_MINIMAL).tolist() == full
    assert P.action_index_map(6, full, PONG_MINIMAL).tolist() == PONG_MINIMAL
    assert P.action_index_map(6, PONG_MINIMAL, PONG_MINIMAL).tolist() == list(range(6))
    with pytest.raises(ValueError, match="trained on another game"):
        P.action_index_map(4, full, PONG_MINIMAL)
    assert P.minimal_action_ids(PONG) == PONG_MINIMAL


def _synthetic(schedule: dict[str, tuple[Callable[[int], float], Optional[int]]]):
    """A step callable over envs whose reward at step t is ``f(t)`` and which end at step ``end``."""
    t = [0]
    masks: list[np.ndarray] = []

    def step(running: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t[0] += 1
        masks.append(running)
        r = np.array([f(t[0]) for f, _ in schedule.values()], dtype=float)
        done = np.array([end is not None and t[0] >= end for _, end in schedule.values()])
        return r, done
    return step, masks


def test_saber_timeout_and_marks() -> None:
    saber = P.PROTOCOLS["saber"]
    step, masks = _synthetic({
        "scores once, then nothing": (lambda t: 1.0 if t == 10 else 0.0, None),
        "scores every step for 30,000 steps": (lambda t: 1.0, 30_000),
        "loses a point every 4,000 steps": (lambda t: -1.0 if t % 4000 == 0 else 0.0, 30_000),
        "short episode": (lambda t: 2.0, 50),
    })
    ep = P.run_episodes(step, 4, frame_skip=saber.frame_skip,
                        no_reward_timeout_frames=saber.no_reward_timeout_frames,
                        score_marks=saber.score_marks)
    # 4,500 agent steps (5 minutes) after its last reward the first episode is over
    assert ep.lengths.tolist() == [10 + 4500, 30_000, 30_000, 50]
    assert ep.stalled.tolist() == [True, False, False, False]  # a negative reward is a reward too
    assert ep.returns.tolist() == [1.0, 30_000.0, -7.0, 100.0]
    assert ep.marks["return_5min"].tolist() == [1.0, 4500.0, -1.0, 100.0]
    assert ep.marks["return_30min"].tolist() == [1.0, 27_000.0, -6.0, 100.0]
    # the callable hears which episodes still run: the short one stops at step 50
    assert masks[49][3] and not masks[50][3]


def test_plain_loop_has_no_timeout() -> None:
    step, _ = _synthetic({"silent": (lambda t: 0.0, 6000), "one": (lambda t: 1.0, 3)})
    ep = P.run_episodes(step, 2)
    assert ep.lengths.tolist() == [6000, 3] and not ep.stalled.any() and ep.marks == {}


def test_evaluate_policy_saber_plays_a_minimal_set_network() -> None:
    torch.manual_seed(0)
    net = build_network(EnvSpec(PONG, (4, 84, 84), "uint8", 6, True), 32).eval()
    ev = P.evaluate_policy(net, PONG, 2, 0.1, 5, P.PROTOCOLS["saber"], max_frames=200)
    assert ev.lengths.tolist() == [50, 50]  # the 200-frame cap = 50 agent steps
    assert ev.seeds.tolist() == [5, 6]
    s = ev.summary()
    assert s["protocol"] == "saber" and {"return_5min", "return_30min", "hns"} <= set(s)
    assert s["hns"] == pytest.approx(human_normalized(PONG, s["mean"]))
    rows = ev.rows()
    assert [r["seed"] for r in rows] == [5, 6] and all("return_30min" in r for r in rows)


def test_human_normalized_scores() -> None:
    assert len(RANDOM_HUMAN) == 57
    assert human_normalized(PONG, 14.6) == pytest.approx(1.0)
    assert human_normalized(PONG, -20.7) == pytest.approx(0.0)
    assert human_normalized("ALE/Breakout-v5", 1.7 + (30.5 - 1.7) / 2) == pytest.approx(0.5)
    assert human_normalized("ALE/MsPacman-v5", 6951.6) == pytest.approx(1.0)
    assert table_key("ALE/MontezumaRevenge-v5") == "montezuma_revenge"
    assert table_key("ALE/UpNDown-v5") == "up_n_down"
    assert not has_hns("CartPole-v1") and math.isnan(human_normalized("CartPole-v1", 500.0))
    assert not has_hns("ALE/Adventure-v5")  # an ALE game outside the 57
    scores = {PONG: 14.6, "ALE/Breakout-v5": 1.7, "ALE/Boxing-v5": 0.1 + 2 * 12.0, "ALE/Adventure-v5": 1.0}
    assert median_hns(scores) == pytest.approx(1.0)  # median of 1, 0, 2 (Adventure left out)
    assert math.isnan(median_hns({"CartPole-v1": 500.0}))


def test_every_table_game_is_an_ale_rom() -> None:
    from ale_py import roms
    assert [g for g in RANDOM_HUMAN if roms.get_rom_path(g) is None] == []
