"""Atomic checkpoints: write to a temporary file in the same directory, then rename."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` that never leaves a half-written file at ``path`` (a crash keeps the old one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A failed write (disk full, a stop signal mid-save) keeps the old checkpoint; the half-written
        # temporary would only fill the disk, as every pid leaves its own name.
        tmp.unlink(missing_ok=True)
        raise


def load(path: str | Path) -> dict:
    """Load a checkpoint (tensors and plain containers only: never unpickle arbitrary objects)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def tensor_mismatch(saved: Mapping[str, Any], live: Mapping[str, Any]) -> str | None:
    """What keeps the state dict ``saved`` (from a checkpoint) from loading into a module whose own state
    dict is ``live``: keys missing or unexpected, or a tensor of another shape or dtype (``load_state_dict``
    would convert the dtype without a word); None when it fits."""
    missing, unexpected = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    if missing or unexpected:
        return f"tensors missing: {missing[:4]}, unexpected: {unexpected[:4]}"
    for k, own in live.items():
        got = saved[k]
        if not isinstance(got, torch.Tensor) or not isinstance(own, torch.Tensor):
            continue
        if got.shape != own.shape:
            return f"size mismatch for {k}: {list(got.shape)} in the checkpoint, {list(own.shape)} in this network"
        if got.dtype != own.dtype:
            return f"dtype mismatch for {k}: {got.dtype} in the checkpoint, {own.dtype} in this network"
    return None


def last_path(run_dir: str | Path) -> Path:
    """Where the learner keeps its latest checkpoint."""
    return Path(run_dir) / "checkpoints" / "last.pt"


def best_path(run_dir: str | Path) -> Path:
    """Where the evaluator keeps the best network of a run (beside the learner's ``last.pt``)."""
    return last_path(run_dir).with_name("best.pt")


def best_score(path: str | Path, protocol: str) -> float:
    """The score of an existing ``best.pt`` under ``protocol``; -inf if there is none to beat.

    A best from another protocol is not comparable, so it does not count (it will be replaced).
    """
    path = Path(path)
    if not path.exists():
        return -math.inf
    try:
        state = load(path)
    except Exception:  # a damaged file is replaced by the next evaluation, not a crash
        return -math.inf
    if not isinstance(state, dict) or state.get("protocol") != protocol:
        return -math.inf
    return float(state.get("score", -math.inf))
