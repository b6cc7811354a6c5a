"""What the evaluator knows about the run, as pure state: no sockets, no files, no clock of its own.

``RunMonitor`` takes the roles' telemetry and the evaluation rows and answers three questions:
what to log (``Ingested``, written to the logger it was given, if any), what the dashboard shows
(``state``) and what the terminal shows (``progress_line``). Methods take ``now`` (unix seconds) from
the caller, so tests drive time; ``on_telemetry`` defaults it to the wall clock.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from apex_zmq.logger import TAG_PREFIXES, Logger
from apex_zmq.wire import Telemetry, WireError, decode_telemetry

MAX_SENDERS = 4096           # distinct senders tracked; later new names are dropped (bounds memory)
MAX_SLOTS = 1 << 16          # a report naming a wilder env slot is dropped (bounds memory)
SERIES_POINTS = 600          # points kept per chart series; older ones are thinned, never unbounded
EVAL_POINTS = 500            # evaluation points sent to the page (the learning-curve files keep all)


def finite(x: Any) -> float | None:
    """``x`` as a float, or None when it is not a finite number (JSON has no NaN or inf)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _round(x: float, digits: int = 6) -> float:
    # Fewer digits make the page's JSON smaller; 6 significant digits are more than a chart shows.
    return float(f"{x:.{digits}g}")


class Series:
    """A time series with bounded memory: at most ``max_points`` points, coalesced to ``resolution``.

    A point closer than ``resolution`` seconds to the previous one replaces it (N actors reporting
    once a second make one point a second, not N). When full, every other point is dropped and the
    resolution doubles, so a long run keeps its whole history at a coarser grain.
    """

    def __init__(self, fields: Sequence[str], max_points: int = SERIES_POINTS,
                 resolution: float = 1.0) -> None:
        self.fields = tuple(fields)
        self.max_points = max_points
        self.resolution = resolution
        self.t: list[float] = []
        self.values: dict[str, list[float | None]] = {f: [] for f in self.fields}

    def add(self, t: float, values: dict[str, Any]) -> None:
        """Append (or coalesce) one point; missing or non-finite values become gaps."""
        row = {f: finite(values.get(f)) for f in self.fields}
        if self.t and t - self.t[-1] < self.resolution:
            self.t[-1] = round(t, 3)
            for f in self.fields:
                self.values[f][-1] = None if row[f] is None else _round(row[f])
            return
        self.t.append(round(t, 3))
        for f in self.fields:
            self.values[f].append(None if row[f] is None else _round(row[f]))
        if len(self.t) > self.max_points:
            keep = slice(len(self.t) % 2, None, 2)  # keep the newest point
            self.t = self.t[keep]
            self.values = {f: v[keep] for f, v in self.values.items()}
            self.resolution *= 2

    def to_json(self) -> dict[str, list]:
        """``{"t": [...], field: [...], ...}`` (column arrays, as the chart library takes them)."""
        return {"t": list(self.t), **{f: list(v) for f, v in self.values.items()}}


def thin(rows: Sequence[Any], max_n: int) -> list[Any]:
    """At most ``max_n`` rows evenly spread over ``rows``, always with the first and the last."""
    n = len(rows)
    if n <= max_n:
        return list(rows)
    if max_n < 2:
        return list(rows[-max_n:]) if max_n else []
    idx = sorted({round(i * (n - 1) / (max_n - 1)) for i in range(max_n)})
    return [rows[i] for i in idx]


@dataclass
class SlotStats:
    """One env slot of the epsilon ladder: its epsilon and its recent episode returns."""

    epsilon: float | None = None
    recent: deque = field(default_factory=deque)
    episodes: int = 0


@dataclass
class Heartbeat:
    """When a sender was last heard from (evaluator clock: hosts' clocks may disagree)."""

    role: str
    last: float
    seq: int


@dataclass
class Ingested:
    """What one telemetry message adds to the run's logs."""

    metrics: dict[str, float]
    step: int
    episodes: list[dict[str, Any]]
    sender: str
    time: float

    def write_to(self, logger: Logger) -> None:
        """Scalars to metrics.csv/TensorBoard, training episodes to actor_episodes.csv."""
        if self.metrics:
            logger.write(self.metrics, self.step)
        if self.episodes:
            logger.rows("actor_episodes", [{"time": self.time, "actor": self.sender, **e}
                                           for e in self.episodes])
            returns = [e["return"] for e in self.episodes]
            logger.write({"actor/episode_return": sum(returns) / len(returns)}, self.step)


def _valid_episode(e: dict[str, Any]) -> bool:
    slot, eps, ret = e.get("slot"), e.get("epsilon"), finite(e.get("return"))
    return (isinstance(slot, (int, float)) and float(slot).is_integer() and 0 <= slot < MAX_SLOTS
            and isinstance(eps, (int, float)) and 0.0 <= eps <= 1.0 and ret is not None)


# Replay counters that add up over shards (the run's totals of a sharded replay).
SUMMED_REPLAY = ("size", "capacity", "stored_mb", "inserted_per_s", "sampled_per_s", "updated_per_s", "inserted",
                 "sampled", "updated", "batches", "rejected", "stale_updates", "stale_incarnation", "removed",
                 "priority_lag", "chunks_stored")


class RunMonitor:
    """Latest metrics, chart series, the epsilon ladder, evaluations and heartbeats of every role."""

    LEARNER_FIELDS = ("steps", "steps_per_s", "loss", "staleness", "entropy")  # the last two: asynchronous
    REPLAY_FIELDS = ("size", "inserted_per_s", "sampled_per_s", "updated_per_s")
    ACTOR_FIELDS = ("steps_per_s",)

    def __init__(self, logger: Logger | None = None, num_slots: int = 0, heartbeat_timeout: float = 10.0,
                 ladder_window: int = 10, started: float = 0.0, info: dict[str, Any] | None = None) -> None:
        self.logger = logger
        self.heartbeat_timeout = heartbeat_timeout
        self.ladder_window = ladder_window
        self.started = started
        self.info = dict(info or {})   # static facts shown on the page (env, run dir)
        self.metrics: dict[str, float] = {}
        self.actor_rates: dict[str, float] = {}
        self.actor_acting: dict[str, tuple[float, float]] = {}  # sender -> (agreement, bits)
        self.heartbeats: dict[str, Heartbeat] = {}
        self.slots: dict[int, SlotStats] = {i: self._slot() for i in range(num_slots)}
        self.series = {"learner": Series(self.LEARNER_FIELDS), "replay": Series(self.REPLAY_FIELDS),
                       "actor": Series(self.ACTOR_FIELDS)}
        self.evals: list[dict[str, Any]] = []
        self.rejected = 0
        self.rejected_episodes = 0
        self.replay_shards: dict[str, dict[str, float]] = {}  # sharded replay: sender -> its last report
        self.last_eval: dict[str, float] = {}  # set by the evaluation thread (see progress_line)

    def _slot(self) -> SlotStats:
        return SlotStats(recent=deque(maxlen=self.ladder_window))

    # ------------------------------------------------------------------ input

    def on_telemetry(self, frames: Sequence[Any], now: float | None = None) -> Ingested | None:
        """Decode, take and log one telemetry message; a malformed one is dropped and counted."""
        try:
            t = decode_telemetry(frames)
        except WireError:
            self.rejected += 1
            return None
        got = self.take(t, time.time() if now is None else now)
        if self.logger is not None:
            got.write_to(self.logger)
        return got

    def take(self, t: Telemetry, now: float) -> Ingested:
        """Take one role's report: heartbeat, metrics of its own tag family, finished episodes."""
        if t.sender not in self.heartbeats and len(self.heartbeats) >= MAX_SENDERS:
            self.rejected += 1  # bounded memory: a flood of invented sender names is dropped
            return Ingested(metrics={}, step=int(self.metrics.get("learner/steps", 0)), episodes=[],
                            sender=t.sender, time=t.time)
        self.heartbeats[t.sender] = Heartbeat(role=t.role, last=now, seq=t.seq)
        # A NaN loss is logged as such (it means something); the page's JSON gets None for it.
        # Only the sender's own family, and only families of the fixed tag scheme: a relay's
        # relay/* counters (or a hostile peer's tags) must never reach the logger, which refuses them.
        metrics = {k: float(v) for k, v in t.metrics.items()
                   if k.startswith((f"{t.role}/", "perf/")) and k.startswith(TAG_PREFIXES)}
        if t.role == "actor":  # one actor's rate among many: the run's rate is the sum over live actors
            self.actor_rates[t.sender] = metrics.get("actor/steps_per_s", 0.0)
            metrics["actor/steps_per_s"] = self.actor_steps_per_s(now)
            if "actor/acting_agreement" in metrics:
                self.actor_acting[t.sender] = (metrics["actor/acting_agreement"], metrics.get("actor/acting_bits", 32.0))
        if t.role == "replay":
            metrics.update(self._shard_totals(t.sender, metrics, now))
        self.metrics.update(metrics)
        if t.role in self.series:
            prefix = f"{t.role}/"
            self.series[t.role].add(now, {k[len(prefix):]: v for k, v in self.metrics.items()
                                          if k.startswith(prefix)})
        episodes = [e for e in t.episodes if _valid_episode(e)] if t.role == "actor" else []
        if t.role == "actor":
            self.rejected_episodes += len(t.episodes) - len(episodes)
        for e in episodes:
            slot = self.slots.setdefault(int(e["slot"]), self._slot())
            slot.epsilon = float(e["epsilon"])
            slot.recent.append(float(e["return"]))
            slot.episodes += 1
        return Ingested(metrics=metrics, step=int(self.metrics.get("learner/steps", 0)),
                        episodes=episodes, sender=t.sender, time=t.time)

    def _shard_totals(self, sender: str, metrics: dict[str, float], now: float) -> dict[str, float]:
        """Sharded replay (tags ``replay/<shard>/*``): keep this shard's report and return the run's
        totals as the plain ``replay/*`` tags, summed over the shards that are up (a dead shard's last
        size no longer counts, as with actors' rates); fill is the total size over the total capacity.
        A lone replay server's report (plain tags) gives nothing here."""
        own = {}
        for k, v in metrics.items():
            parts = k.split("/", 2)
            if len(parts) == 3 and parts[1].isdigit() and not parts[2].startswith("from/"):
                own[parts[2]] = v
        if not own:
            return {}
        self.replay_shards[sender] = own
        live = [m for s, m in self.replay_shards.items() if self.is_up(s, now) or s == sender]
        totals = {f"replay/{k}": float(sum(m.get(k, 0.0) for m in live)) for k in SUMMED_REPLAY}
        if totals["replay/capacity"] > 0:
            totals["replay/fill"] = totals["replay/size"] / totals["replay/capacity"]
        totals["replay/shards_up"] = float(len(live))
        return totals

    def shard_sizes(self, now: float) -> list[tuple[str, float | None]]:
        """(sender, size; None when down) of each replay shard heard from, in shard order."""
        def key(s: str) -> int:
            return int(s.rsplit("-", 1)[-1]) if s.rsplit("-", 1)[-1].isdigit() else 0
        return [(s, m.get("size") if self.is_up(s, now) else None)
                for s, m in sorted(self.replay_shards.items(), key=lambda kv: key(kv[0]))]

    def on_eval_rows(self, rows: Iterable[dict[str, Any]]) -> None:
        """Take evaluation rows (as written to eval.csv: time, learner_steps, mean, min, max, ...)."""
        for r in rows:
            if finite(r.get("mean")) is None or finite(r.get("time")) is None:
                continue
            self.evals.append({k: (finite(v) if isinstance(v, (int, float)) else v) for k, v in r.items()})

    # ------------------------------------------------------------------ derived

    def is_up(self, sender: str, now: float) -> bool:
        """Heard from within ``heartbeat_timeout`` seconds."""
        hb = self.heartbeats.get(sender)
        return hb is not None and now - hb.last <= self.heartbeat_timeout

    def actor_steps_per_s(self, now: float) -> float:
        """Env steps per second of all actors still up (a dead actor's last rate no longer counts)."""
        return float(sum(r for s, r in self.actor_rates.items() if self.is_up(s, now)))

    def worst_acting(self, now: float) -> tuple[float, float] | None:
        """(agreement, bits) of the live actor whose acting copy agrees least with float32: one
        bad copy must show on the dashboard, not be averaged away."""
        live = [v for s, v in self.actor_acting.items() if self.is_up(s, now)]
        return min(live) if live else None

    def latest_eval(self) -> dict[str, Any] | None:
        """The newest evaluation: the last eval row, else what the evaluation thread last set."""
        if self.evals:
            e = self.evals[-1]
            return {"mean": e["mean"], "learner_steps": e.get("learner_steps"), "time": e["time"],
                    "hns": finite(e.get("hns")), "protocol": e.get("protocol")}
        if self.last_eval:
            return {"mean": finite(self.last_eval.get("mean")), "learner_steps": self.last_eval.get("version"),
                    "time": None, "hns": finite(self.last_eval.get("hns")), "protocol": None}
        return None

    def ladder(self) -> list[dict[str, Any]]:
        """One point per env slot: its epsilon, the mean of its last ``ladder_window`` returns, episodes."""
        return [{"slot": i, "epsilon": s.epsilon,
                 "recent_mean_return": _round(sum(s.recent) / len(s.recent)) if s.recent else None,
                 "episodes": s.episodes}
                for i, s in sorted(self.slots.items())]

    def heartbeat_rows(self, now: float) -> list[dict[str, Any]]:
        """Per sender: role, last heard (unix s), age in seconds, up or down."""
        return [{"sender": s, "role": hb.role, "last": round(hb.last, 3), "age_s": round(now - hb.last, 3),
                 "up": self.is_up(s, now)}
                for s, hb in sorted(self.heartbeats.items())]

    def state(self, now: float) -> dict[str, Any]:
        """Everything the dashboard shows, JSON-ready (no NaN or inf)."""
        latest = {k: finite(v) for k, v in self.metrics.items()}
        if self.actor_rates:
            latest["actor/steps_per_s"] = self.actor_steps_per_s(now)
        worst = self.worst_acting(now)
        if worst is not None:
            latest["actor/acting_agreement"], latest["actor/acting_bits"] = worst
        return {
            "now": round(now, 3), "started": self.started, **self.info,
            "heartbeat_timeout_s": self.heartbeat_timeout, "ladder_window": self.ladder_window,
            "latest": latest,
            "ladder": self.ladder(),
            "eval": {"count": len(self.evals), "latest": self.latest_eval(),
                     "points": [{k: e.get(k) for k in ("time", "learner_steps", "mean", "min", "max")}
                                for e in thin(self.evals, EVAL_POINTS)]},
            "series": {role: s.to_json() for role, s in self.series.items()},
            "heartbeats": self.heartbeat_rows(now),
            "rejected": {"telemetry": self.rejected, "episodes": self.rejected_episodes},
            # sharded replay: each shard's size (None: down); empty with one replay server
            "replay_shards": [{"sender": sender, "size": finite(size) if size is not None else None}
                              for sender, size in self.shard_sizes(now)],
        }

    def _shards_part(self, now: float) -> str:
        return _shards_part_of(self.shard_sizes(now))

    def progress_line(self, now: float) -> str:
        """One compact line: time, evaluation, learner, replay, actors, and any role that is down."""
        m = self.metrics
        ev = self.latest_eval()
        eval_part = "eval -"
        if ev and ev["mean"] is not None:
            eval_part = f"eval {ev['mean']:.1f}" + (f" ({ev['hns']:.0%} HNS)" if ev["hns"] is not None else "")
            eval_part += f" @{_count(ev['learner_steps'])}"
        loss = m.get("learner/loss")
        down = [s for s in sorted(self.heartbeats) if not self.is_up(s, now)]
        if "learner/updates_per_s" in m:  # the asynchronous family: gradients, no replay
            middle = (f"learner {_count(m.get('learner/steps', 0))} updates {m['learner/updates_per_s']:.0f}/s "
                      f"loss {'-' if loss is None else f'{loss:.3g}'} staleness {m.get('learner/staleness', 0):.1f} "
                      f"({_count(m.get('learner/stale_dropped', 0))} dropped) | ")
        else:
            middle = (f"learner {_count(m.get('learner/steps', 0))} steps {m.get('learner/steps_per_s', 0):.0f}/s "
                      f"loss {'-' if loss is None else f'{loss:.3g}'} | "
                      f"replay {_count(m.get('replay/size', 0))} ({m.get('replay/fill', 0):.0%}) "
                      f"+{m.get('replay/inserted_per_s', 0):.0f}/s{self._shards_part(now)} | ")
        return (f"[{_duration(now - self.started)}] {eval_part} | " + middle +
                f"actors {_count(self.actor_steps_per_s(now))} steps/s"
                + (f" | DOWN: {', '.join(down)}" if down else ""))


def _shards_part_of(sizes: list[tuple[str, float | None]]) -> str:
    """`` shards [6.1k 6.2k down]``: each replay shard's size (empty with one replay server)."""
    if not sizes:
        return ""
    return " shards [" + " ".join("down" if v is None else _count(v) for _, v in sizes) + "]"


def _count(x: float | None) -> str:
    """1234 -> 1.2k, 2_000_000 -> 2.0M (terminal width matters more than digits)."""
    if x is None:
        return "-"
    x = float(x)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def _duration(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class CsvTail:
    """Parses a CSV file that grows by appended rows, fed the new bytes as they come.

    Only complete lines are parsed (a row being written is kept for the next feed); numbers become
    floats. The evaluator follows eval.csv with it, so the dashboard shows exactly the rows on disk,
    including those of earlier sessions of a resumed run.
    """

    def __init__(self) -> None:
        self.header: list[str] | None = None
        self._rest = b""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Rows completed by ``data``."""
        buf = self._rest + data
        end = buf.rfind(b"\n") + 1
        self._rest = buf[end:]
        rows: list[dict[str, Any]] = []
        for rec in csv.reader(io.StringIO(buf[:end].decode("utf-8", "replace"))):
            if not rec:
                continue
            if self.header is None:
                self.header = rec
                continue
            rows.append({k: _number(v) for k, v in zip(self.header, rec)})
        return rows


def _number(v: str) -> Any:
    try:
        return float(v)
    except ValueError:
        return v


class CsvFollower:
    """The I/O half of ``CsvTail``: reads what was appended to a CSV file since the last poll."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.offset = 0
        self.tail = CsvTail()

    def poll(self) -> list[dict[str, Any]]:
        """New complete rows (none while the file does not exist; starts over if it was replaced)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.offset:
            self.offset, self.tail = 0, CsvTail()
        if size == self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(size - self.offset)
        self.offset += len(data)
        return self.tail.feed(data)
