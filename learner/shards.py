"""Sharded replay on the learner's side (``--replay-shards N``): which shard the next batch comes from,
and where each priority update goes. Pure: no sockets (learner/main.py wires them).

The draw rule. Each shard's batch is a stratified proportional sample of that shard alone, and
reports the shard's total priority mass M_i (sum of p^alpha) with it. Taking a whole batch from
shard i with probability M_i / sum_j M_j makes each item's chance p_j / sum of all masses: exactly
the prioritized distribution of one replay holding every shard's items. Its importance weights
come out right too: a shard computes (N_i P_i(j))^-beta normalised by the batch's largest, and since
P_i(j) = p_j / M_i, the shard's factor (N_i / M_i)^-beta is the same for every item of a batch and
cancels in that normalisation. Drawing shards uniformly (RLlib) would instead over-sample the items
of a shard whose mass is small (a young shard, or one whose priorities were mostly lowered) by the
ratio of the mean mass to its own. Splitting every batch across shards in proportion would be exact
as well, but the replay pushes whole batches ahead of demand (--prefetch); the learner would have
to ask for sizes, a round trip per batch.

Only shards that have a batch waiting are drawn (a dead or restarting shard has none, and the
learner must not wait on it while the others serve); when none has, the first to arrive is taken.
With the learner the slower stage, every shard has its --prefetch batches waiting and the draw is
the proportional one; when the shards are the slower stage, batches are taken as they come, which
is each shard's sampling rate (the throughput a learner that waits for nothing gets).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def draw_shard(masses: Sequence[float | None], ready: Sequence[bool], rng: np.random.Generator) -> int | None:
    """The shard to take the next batch from: among the ``ready`` ones, shard i with probability
    proportional to ``masses[i]`` (its total priority when it last reported; None: not heard of yet,
    counted as the mean of those known, or 1 if none is; all-zero: uniform). None if none is ready."""
    idx = [i for i, r in enumerate(ready) if r]
    if not idx:
        return None
    if len(idx) == 1:
        return idx[0]
    known = [m for m in masses if m is not None]
    fill = float(np.mean(known)) if known else 1.0
    w = np.array([masses[i] if masses[i] is not None else fill for i in idx], dtype=np.float64)
    w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
    total = w.sum()
    if total <= 0:
        return idx[int(rng.integers(len(idx)))]
    return idx[int(np.searchsorted(np.cumsum(w), rng.random() * total, side="right").clip(0, len(idx) - 1))]


def route(shard: int, num_shards: int) -> int:
    """The priorities socket of an update for items sampled by ``shard``: that shard's own (ids and
    incarnations are per shard; another shard would apply them to other items or count them stale).
    A shard index outside the run's is a ``ValueError`` (the decoder takes up to wire.MAX_SHARDS)."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} outside [0, {num_shards})")
    return shard
