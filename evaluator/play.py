"""``apex-zmq play CHECKPOINT``: evaluate a saved network over N seeded episodes, optionally on video.

Reads the learner's ``last.pt`` and the evaluator's ``best.pt`` (both hold ``net``, ``env`` and
``hidden``), or a run directory (its ``best.pt``, else its ``last.pt``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from apex_zmq import checkpoint
from apex_zmq import config as C
from apex_zmq.distributional import set_noise
from apex_zmq.envs import env_spec, is_atari
from apex_zmq.models import build_network

from .atari_scores import median_hns
from .protocols import FPS, FRAME_SKIP, PROTOCOL_NAMES, Evaluation, evaluate_policy, protocol_for


class PlayError(Exception):
    """A problem the user can fix (missing or foreign checkpoint, unsupported video format)."""


# --- checkpoints ---------------------------------------------------------------------------------

def best_checkpoint(net: torch.nn.Module, env_id: str, hidden: int, steps: int,
                    evaluation: Evaluation, algo: str = "dqn", env_module: str = "",
                    net_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The contents of ``best.pt``: what ``play`` reads from ``last.pt`` (net, env, hidden, algo, steps) and
    the score."""
    hns = evaluation.hns
    return {"net": {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()},
            "env": env_id, "hidden": int(hidden), "algo": algo, "env_module": env_module,
            "net_options": dict(net_options or {}), "steps": int(steps), "kind": "best",
            "score": evaluation.mean, "protocol": evaluation.protocol,
            "hns": math.nan if hns is None else float(hns), "episodes": len(evaluation.returns)}


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file: ``path`` itself, or for a run directory its best.pt, else its last.pt."""
    p = Path(path)
    if p.is_dir():
        for candidate in (checkpoint.best_path(p), checkpoint.last_path(p), p / "best.pt", p / "last.pt"):
            if candidate.is_file():
                return candidate
        raise PlayError(f"{path}: a directory without checkpoints/best.pt or checkpoints/last.pt")
    if not p.is_file():
        raise PlayError(f"{path}: no such checkpoint file")
    return p


def load_checkpoint(path: str | Path, env_module: str = "") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network of a best.pt / last.pt (in eval mode) and its metadata (env, hidden, steps, path)."""
    p = resolve_checkpoint(path)
    try:
        state = checkpoint.load(p)
    except Exception as e:  # torch raises several types for foreign or damaged files
        raise PlayError(f"{p}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from e
    if not (isinstance(state, dict) and isinstance(state.get("net"), dict)
            and isinstance(state.get("env"), str) and isinstance(state.get("hidden"), int)):
        keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise PlayError(f"{p}: not an apex-zmq checkpoint (expected the keys 'net', 'env' and 'hidden' "
                        f"of a learner last.pt or evaluator best.pt; found {keys})")
    env_id, hidden, weights = state["env"], state["hidden"], state["net"]
    try:  # a custom env must be registered before it is made: the run's --env-module, unless given here
        C.import_env_modules(env_module or state.get("env_module", ""))
    except C.ConfigError as e:
        raise PlayError(f"{p}: {e}") from None
    algo = state.get("algo", "dqn")  # checkpoints from before --algo are double DQN's
    if algo not in C.ALGOS:
        raise PlayError(f"{p}: a checkpoint of --algo {algo!r}, which this version does not know "
                        f"(it knows {list(C.ALGOS)})")
    try:
        spec = env_spec(env_id)
    except Exception as e:
        raise PlayError(f"{p}: its env {env_id!r} cannot be made here ({type(e).__name__}: {e})") from e
    adv = weights.get("advantage.2.weight")
    if algo == "dqn" and isinstance(adv, torch.Tensor) and adv.ndim == 2:  # trained on another action set
        spec = dataclasses.replace(spec, num_actions=int(adv.shape[0]))
    try:
        net = build_network(spec, hidden, algo, **state.get("net_options", {}))
        net.load_state_dict(weights)
        set_noise(net, False)  # evaluation acts with the mean weights of noisy layers
    except (RuntimeError, TypeError, ValueError) as e:
        raise PlayError(f"{p}: its weights do not fit the {env_id} network with hidden={hidden}: "
                        f"{str(e).splitlines()[0]}") from e
    meta = {"path": str(p), "env": env_id, "hidden": hidden, "algo": algo, "steps": state.get("steps"),
            "kind": state.get("kind", "last")}
    return net.eval(), meta


# --- video ---------------------------------------------------------------------------------------

VIDEO_FORMATS = (".mp4", ".gif")


def _gif_backend() -> Optional[str]:
    try:
        import PIL.Image  # noqa: F401
        return "pillow"
    except ImportError:
        pass
    import cv2
    return "opencv" if hasattr(cv2, "imwriteanimation") else None  # OpenCV >= 4.11 writes GIFs


def to_bgr(frame: np.ndarray, min_side: int = 240) -> np.ndarray:
    """A BGR uint8 picture of a grey (H, W) or RGB (H, W, 3) frame, enlarged to be watchable."""
    import cv2
    frame = np.ascontiguousarray(frame, dtype=np.uint8)
    scale = max(1, -(-min_side // min(frame.shape[:2])))  # 84x84 Atari frames become 252x252
    if scale > 1:
        frame = cv2.resize(frame, (frame.shape[1] * scale, frame.shape[0] * scale),
                           interpolation=cv2.INTER_NEAREST)
    code = cv2.COLOR_GRAY2BGR if frame.ndim == 2 else cv2.COLOR_RGB2BGR
    out = cv2.cvtColor(frame, code)
    if out.shape[0] % 2 or out.shape[1] % 2:  # most MP4 encoders want even sizes
        out = np.ascontiguousarray(out[: out.shape[0] // 2 * 2, : out.shape[1] // 2 * 2])
    return out


class Video:
    """Frames to an MP4 (streamed through cv2.VideoWriter) or a GIF (Pillow, else OpenCV >= 4.11)."""

    def __init__(self, path: str | Path, fps: float) -> None:
        self.path = Path(path)
        self.fps = fps
        self.kind = self.path.suffix.lower()
        if self.kind not in VIDEO_FORMATS:
            raise PlayError(f"--video {path}: unsupported format; supported: {', '.join(VIDEO_FORMATS)}")
        self.gif_backend = _gif_backend() if self.kind == ".gif" else None
        if self.kind == ".gif" and self.gif_backend is None:
            raise PlayError(f"--video {path}: writing a GIF needs Pillow (pip install pillow) or "
                            f"OpenCV >= 4.11; this install can write .mp4")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer: Any = None
        self._frames: list[np.ndarray] = []  # GIFs are written at the end
        # GIF delays are in 1/100 s: round to what the file can hold (15 fps plays as 70 ms frames)
        self.gif_ms = max(10, int(round(1000 / fps, -1)))
        self.count = 0

    def add(self, frame: np.ndarray) -> None:
        """Append one frame (grey or RGB)."""
        import cv2
        bgr = to_bgr(frame)
        if self.kind == ".mp4":
            if self._writer is None:
                h, w = bgr.shape[:2]
                self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
                if not self._writer.isOpened():
                    raise PlayError(f"--video {self.path}: OpenCV cannot write MP4 here (no mp4v encoder)")
            self._writer.write(bgr)
        else:
            self._frames.append(bgr)
        self.count += 1

    def close(self) -> int:
        """Finish the file; the number of frames written."""
        import cv2
        if self._writer is not None:
            self._writer.release()
        elif self.kind == ".gif" and self._frames:
            ms = self.gif_ms
            if self.gif_backend == "pillow":
                from PIL import Image
                images = [Image.fromarray(cv2.cvtColor(f, cv2.COLOR_BGR2RGB)) for f in self._frames]
                images[0].save(self.path, save_all=True, append_images=images[1:], duration=ms, loop=0)
            else:
                anim = cv2.Animation()
                anim.frames = self._frames
                anim.durations = [ms] * len(self._frames)
                if not cv2.imwriteanimation(str(self.path), anim):
                    raise PlayError(f"--video {self.path}: OpenCV failed to write the GIF")
        return self.count


# --- the command ---------------------------------------------------------------------------------

def format_stats(ev: Evaluation) -> str:
    """One line: mean/std/min/max of the returns (+ HNS, SABER marks, stalled episodes)."""
    s = ev.summary()
    parts = [f"return mean {s['mean']:.2f} std {s['std']:.2f} min {s['min']:.2f} max {s['max']:.2f}"]
    if "hns" in s:
        parts.append(f"HNS {s['hns']:.3f}" if not math.isnan(s["hns"]) else "HNS n/a (not one of the 57 games)")
    for name in ev.episodes.marks:
        parts.append(f"{name} mean {s[name]:.2f}")
    if ev.episodes.stalled.any():
        parts.append(f"{int(ev.episodes.stalled.sum())}/{len(ev.returns)} ended after 5 min without reward")
    parts.append(f"mean length {float(ev.lengths.mean()):.0f} steps")
    return " | ".join(parts)


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Per-episode rows to ``path`` (columns: the union over rows, in first-seen order)."""
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="apex-zmq play", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Evaluate saved networks (a learner last.pt, an evaluator best.pt, or a run directory) "
                    "over N episodes with different seeds; several Atari checkpoints also give the median "
                    "human-normalized score over their games.")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoint file or run directory")
    p.add_argument("--episodes", type=int, default=10, help="episodes, played side by side")
    p.add_argument("--seed", type=int, default=0, help="episode i is seeded SEED + i")
    p.add_argument("--protocol", choices=PROTOCOL_NAMES, default="classic",
                   help="Atari evaluation protocol (other envs: their own episode end)")
    p.add_argument("--epsilon", type=float, default=None,
                   help="chance of a random action (None: 0.001 for Atari, 0 for other envs)")
    p.add_argument("--max-frames", type=int, default=0,
                   help="cap on an Atari episode in emulator frames (0: the protocol's cap)")
    p.add_argument("--video", default=None, help="record episode 0 to this .mp4 or .gif")
    p.add_argument("--csv", default=None, help="write one row per episode to this CSV file")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--env-module", default="",
                   help="module(s) registering the checkpoint's env, comma-separated (default: the one the "
                        "checkpoint names, as the run's --env-module)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``apex-zmq play``: stats per checkpoint, optional CSV and video; 2 on a user error."""
    args = parser().parse_args(argv)
    try:
        return _play(args)
    except PlayError as e:
        print(f"apex-zmq play: {e}", file=sys.stderr)
        return 2


def _play(args: argparse.Namespace) -> int:
    if args.episodes < 1:
        raise PlayError(f"--episodes must be >= 1, got {args.episodes}")
    if args.max_frames < 0:
        raise PlayError(f"--max-frames must be >= 0, got {args.max_frames}")
    if args.video and len(args.checkpoints) > 1:
        raise PlayError("--video records one checkpoint's episode: give a single CHECKPOINT")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    loaded = [load_checkpoint(c, args.env_module) for c in args.checkpoints]  # every error before any episode
    video = Video(args.video, FPS / FRAME_SKIP if is_atari(loaded[0][1]["env"]) else 30.0) if args.video else None
    rows: list[dict[str, Any]] = []
    means: dict[str, list[float]] = {}  # per game: the mean return of each of its checkpoints
    for net, meta in loaded:
        env_id = meta["env"]
        protocol = protocol_for(env_id, args.protocol)
        eps = args.epsilon if args.epsilon is not None else (0.001 if is_atari(env_id) else 0.0)
        step = "" if meta["steps"] is None else f", learner step {meta['steps']}"
        print(f"play: {meta['path']}: {env_id}{step}, protocol {protocol.name}, epsilon {eps:g}, "
              f"{args.episodes} episodes (seeds {args.seed}..{args.seed + args.episodes - 1})", flush=True)
        try:
            ev = evaluate_policy(net, env_id, args.episodes, eps, args.seed, protocol,
                                 max_frames=args.max_frames, record=video.add if video else None)
        except RuntimeError as e:  # no RGB render for the video
            raise PlayError(str(e)) from e
        print(f"play: {format_stats(ev)}", flush=True)
        means.setdefault(env_id, []).append(ev.mean)
        rows += [{"checkpoint": meta["path"], "env": env_id, "protocol": ev.protocol, **r} for r in ev.rows()]
    atari = [e for e in means if is_atari(e)]
    if len(atari) > 1:
        per_game = {e: float(np.mean(means[e])) for e in atari}
        print(f"play: median HNS over {len(atari)} games: {median_hns(per_game):.3f}")
    if args.csv:
        write_csv(args.csv, rows)
        print(f"play: {len(rows)} episode rows in {args.csv}")
    if video is not None:
        n = video.close()
        print(f"play: episode 0 on video in {args.video} ({n} frames)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
