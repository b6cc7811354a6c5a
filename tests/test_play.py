"""``apex-zmq play``: checkpoints of both formats, per-episode CSV and stats, videos, clear errors."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from apex_zmq import checkpoint
from apex_zmq.checkpoint import best_path, best_score
from apex_zmq.envs import EnvSpec
from apex_zmq.models import build_network
from evaluator.play import best_checkpoint, load_checkpoint, main
from evaluator.protocols import PLAIN, evaluate_policy
from learner.dqn import DQNLearner

CARTPOLE = EnvSpec("CartPole-v1", (4,), "float32", 2, False)
PONG = EnvSpec("ALE/Pong-v5", (4, 84, 84), "uint8", 6, True)


def _save_last(path: Path, spec: EnvSpec, hidden: int, steps: int = 123) -> torch.nn.Module:
    """A freshly built network saved exactly as the learner writes last.pt."""
    torch.manual_seed(0)
    net = build_network(spec, hidden)
    learner = DQNLearner(net, "adam", 1e-3, 100, 40.0)
    learner.steps = steps
    state = learner.state_dict()
    state["env"] = spec.env_id
    state["hidden"] = hidden
    checkpoint.save_atomic(state, path)
    return net


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _stats(out: str) -> dict[str, float]:
    m = re.search(r"return mean (\S+) std (\S+) min (\S+) max (\S+)", out)
    assert m, out
    return dict(zip(("mean", "std", "min", "max"), map(float, m.groups())))


@pytest.fixture
def cartpole_last(tmp_path: Path) -> Path:
    path = checkpoint.last_path(tmp_path / "run")
    _save_last(path, CARTPOLE, 16)
    return path


def test_play_cartpole_csv_and_stats(cartpole_last: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_csv = tmp_path / "episodes.csv"
    assert main([str(cartpole_last), "--episodes", "5", "--seed", "3", "--csv", str(out_csv), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "CartPole-v1, learner step 123, protocol plain, epsilon 0," in out
    rows = _rows(out_csv)
    assert [int(r["episode"]) for r in rows] == list(range(5))
    assert [int(r["seed"]) for r in rows] == [3, 4, 5, 6, 7]
    returns = np.array([float(r["return"]) for r in rows])
    # CartPole pays 1 per step: a row whose return is not its length was mis-accounted
    assert all(float(r["return"]) == int(r["length"]) > 0 for r in rows)
    assert {r["env"] for r in rows} == {"CartPole-v1"} and {r["protocol"] for r in rows} == {"plain"}
    s = _stats(out)
    assert s["mean"] == pytest.approx(returns.mean(), abs=0.005)
    assert s["std"] == pytest.approx(returns.std(), abs=0.005)
    assert (s["min"], s["max"]) == (returns.min(), returns.max())
    assert "HNS" not in out  # not an Atari game
    # the same seeds replay the same episodes
    again = tmp_path / "again.csv"
    assert main([str(cartpole_last), "--episodes", "5", "--seed", "3", "--csv", str(again), "--threads", "1"]) == 0
    assert [r["return"] for r in _rows(again)] == [r["return"] for r in rows]


def test_best_checkpoint_is_playable_and_preferred(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    net = _save_last(checkpoint.last_path(run), CARTPOLE, 16).eval()
    ev = evaluate_policy(net, "CartPole-v1", 2, 0.0, 0, PLAIN)
    checkpoint.save_atomic(best_checkpoint(net, "CartPole-v1", 16, 77, ev), best_path(run))
    assert best_score(best_path(run), "plain") == ev.mean
    assert best_score(best_path(run), "classic") == -math.inf  # another protocol's best is no rival
    assert best_score(tmp_path / "absent.pt", "plain") == -math.inf
    loaded, meta = load_checkpoint(run)  # a run directory: its best.pt
    assert meta["path"] == str(best_path(run)) and meta["steps"] == 77 and meta["kind"] == "best"
    for a, b in zip(loaded.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)
    assert main([str(run), "--episodes", "2", "--threads", "1"]) == 0
    s = _stats(capsys.readouterr().out)
    assert s["mean"] == pytest.approx(ev.mean, abs=0.005)  # same weights, same seeds, same episodes


def test_play_errors_are_clear(tmp_path: Path, cartpole_last: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path / "nope.pt")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "without checkpoints/best.pt or checkpoints/last.pt" in capsys.readouterr().err
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 3}, foreign)
    assert main([str(foreign)]) == 2
    err = capsys.readouterr().err
    assert "not an apex-zmq checkpoint" in err and "'epoch'" in err
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    assert main([str(garbage)]) == 2
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err
    wrong = tmp_path / "wrong.pt"
    state = checkpoint.load(cartpole_last)
    state["hidden"] = 32  # the weights were built with 16
    torch.save(state, wrong)
    assert main([str(wrong)]) == 2
    assert "do not fit the CartPole-v1 network with hidden=32" in capsys.readouterr().err
    state["hidden"], state["algo"] = 16, "a-future-algo"
    torch.save(state, wrong)
    assert main([str(wrong)]) == 2
    assert "a checkpoint of --algo 'a-future-algo', which this version does not know" in capsys.readouterr().err
    assert main([str(cartpole_last), "--video", str(tmp_path / "x.avi")]) == 2
    assert "supported: .mp4, .gif" in capsys.readouterr().err


def _frames(path: Path) -> tuple[int, tuple[int, int]]:
    import cv2
    cap = cv2.VideoCapture(str(path))
    n, size = 0, (0, 0)
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        n, size = n + 1, frame.shape[:2]
    cap.release()
    return n, size


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_play_atari_records_a_decodable_video(tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture) -> None:
    from evaluator.play import _gif_backend
    if suffix == ".gif" and _gif_backend() is None:
        pytest.skip("neither Pillow nor OpenCV >= 4.11 here to write GIFs")
    ckpt = tmp_path / "last.pt"
    _save_last(ckpt, PONG, 32)
    video, out_csv = tmp_path / f"pong{suffix}", tmp_path / "pong.csv"
    # a 400-frame cap: episodes of 100 agent steps
    assert main([str(ckpt), "--episodes", "2", "--max-frames", "400", "--video", str(video),
                 "--csv", str(out_csv), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"HNS -?\d+\.\d{3}", out), out
    rows = _rows(out_csv)
    assert [int(r["length"]) for r in rows] == [100, 100] and all(r["hns"] for r in rows)
    assert video.stat().st_size > 0
    expected = int(rows[0]["length"]) + 1  # the first observation, then one frame per step
    if suffix == ".mp4":
        n, size = _frames(video)
        assert n == expected
        assert size == (252, 252)  # 84x84 frames enlarged 3x
    else:  # GIF writers merge identical frames into one longer frame: count play time instead
        n, shown = _gif_frames(video)
        assert 0 < n <= expected and abs(shown / 70 - expected) <= 1


def _gif_frames(path: Path) -> tuple[int, int]:
    """Frames stored in a GIF and its total play time in ms."""
    try:
        from PIL import Image, ImageSequence
        with Image.open(path) as im:
            durations = [f.info.get("duration", 0) for f in ImageSequence.Iterator(im)]
    except ImportError:
        import cv2
        ok, anim = cv2.imreadanimation(str(path))
        assert ok
        durations = list(anim.durations)
    return len(durations), sum(durations)


def test_play_cartpole_video_needs_an_rgb_render(cartpole_last: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    video = tmp_path / "cartpole.mp4"
    code = main([str(cartpole_last), "--episodes", "1", "--video", str(video), "--threads", "1"])
    try:
        import pygame  # noqa: F401  (CartPole renders through pygame)
    except ImportError:
        assert code == 2 and "cannot render RGB frames" in capsys.readouterr().err
        return
    assert code == 0 and _frames(video)[0] > 1


def test_evaluator_keeps_a_playable_best_checkpoint(tmp_path: Path, port_base: int) -> None:
    """The evaluator program under SABER: eval.csv columns, eval/ tags, and best.pt for ``play``."""
    import time

    import zmq
    from conftest import endpoint_flags, start_role, stop_all

    from apex_zmq.config import loopback_endpoints
    from apex_zmq.networks import state_arrays
    from apex_zmq.wire import Weights, encode

    run = tmp_path / "run"
    proc = start_role("evaluator", ["--env", "ALE/Pong-v5", "--run-dir", str(run), "--hidden", "32",
                                    "--eval-protocol", "saber", "--eval-max-frames", "200",
                                    "--eval-episodes", "2", "--eval-period", "0.2", *endpoint_flags(port_base)],
                      tmp_path / "evaluator.log")
    torch.manual_seed(1)
    net = build_network(PONG, 32)
    names, arrays = state_arrays(net)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    try:
        pub.bind(loopback_endpoints(port_base)["weights"])  # the learner's side of the weights socket
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (run / "eval.csv").exists() and proc.poll() is None:
            pub.send_multipart(encode(Weights("learner", 0, 7, names, arrays)))
            time.sleep(0.3)
        time.sleep(0.5)  # let the evaluator finish writing what follows the eval row
    finally:
        pub.close()
        ctx.term()
        stop_all([proc])
    log = (tmp_path / "evaluator.log").read_text()[-3000:]
    row = _rows(run / "eval.csv")[0]
    assert row["protocol"] == "saber" and int(row["learner_steps"]) == 7, log
    assert {"hns", "return_5min", "return_30min", "mean", "std", "min", "max"} <= set(row)
    episodes = _rows(run / "eval_episodes.csv")
    assert [int(r["seed"]) for r in episodes[:2]] == [0, 1] and [int(r["length"]) for r in episodes[:2]] == [50, 50]
    tags = {r["tag"] for r in _rows(run / "metrics.csv")}
    assert {"eval/return_mean", "eval/hns", "eval/return_5min", "eval/return_30min"} <= tags, tags
    loaded, meta = load_checkpoint(run)
    assert meta["kind"] == "best" and meta["steps"] == 7 and meta["env"] == "ALE/Pong-v5"
    for a, b in zip(loaded.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)
    assert best_score(best_path(run), "saber") == pytest.approx(float(row["mean"]))
