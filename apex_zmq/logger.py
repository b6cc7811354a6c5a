"""One logger: ``write(dict)`` to TensorBoard (tensorboardX) and CSV under a fixed tag scheme."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

TAG_PREFIXES = ("actor/", "learner/", "replay/", "eval/", "perf/")


class Logger:
    """Scalars to TensorBoard and a long-format ``metrics.csv`` (time, step, tag, value)."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(self.dir / "tb"), flush_secs=5)
        new = not (self.dir / "metrics.csv").exists()
        self._file = open(self.dir / "metrics.csv", "a", newline="")
        self._csv = csv.writer(self._file)
        if new:
            self._csv.writerow(["time", "step", "tag", "value"])
        self._csvs: dict[str, tuple[Any, csv.DictWriter]] = {}

    def write(self, scalars: dict[str, float], step: int) -> None:
        """Log scalars whose tags follow the scheme ``actor/``, ``learner/``, ``replay/``, ``eval/``, ``perf/``."""
        now = time.time()
        for tag, value in scalars.items():
            if not tag.startswith(TAG_PREFIXES):
                raise ValueError(f"tag {tag!r} must start with one of {TAG_PREFIXES}")
            if self._tb is not None:
                self._tb.add_scalar(tag, value, step, walltime=now)
            self._csv.writerow([f"{now:.3f}", step, tag, value])
        self._file.flush()

    def rows(self, name: str, rows: list[dict[str, Any]]) -> None:
        """Append rows to ``<name>.csv`` (per-episode tables); the first row fixes the columns."""
        if not rows:
            return
        if name not in self._csvs:
            path = self.dir / f"{name}.csv"
            new = not path.exists() or path.stat().st_size == 0
            fields = list(rows[0])
            if not new:  # a resumed run appends under the header already on disk, whatever comes now
                with open(path, newline="") as f:
                    fields = next(csv.reader(f), fields)
            f = open(path, "a", newline="")
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            self._csvs[name] = (f, w)
        f, w = self._csvs[name]
        w.writerows(rows)
        f.flush()

    def close(self) -> None:
        """Flush and close every file."""
        if self._tb is not None:
            self._tb.close()
        self._file.close()
        for f, _ in self._csvs.values():
            f.close()
