"""Prioritized replay keyed by ever-increasing item ids, with compressed observations stored once."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from apex_zmq.wire import ExperienceChunk, SampleBatch, stack_of

from .sumtree import SumTree


def _layout(idx: np.ndarray, b: int, stack: int) -> np.ndarray:
    """A sample's index array: [b] for whole observations, [b, S] for stacks of frames."""
    idx = idx.astype(np.int32)
    return idx if stack == 1 else idx.reshape(b, stack)


def importance_weights(priorities: np.ndarray, total: float, size: int, beta: float) -> np.ndarray:
    """IS weights (size * P(i)) ** -beta with P(i) = p_i / total, normalised by the batch maximum."""
    probs = priorities / total
    w = (size * probs) ** (-beta)
    return (w / w.max()).astype(np.float32)


def annealed_beta(beta0: float, step: int, anneal_steps: int) -> float:
    """beta rising linearly from beta0 to 1 over ``anneal_steps`` sampled batches (0: constant)."""
    if anneal_steps <= 0:
        return beta0
    return beta0 + (1.0 - beta0) * min(1.0, step / anneal_steps)


class PrioritizedReplay:
    """Proportional prioritized replay (Schaul et al. 2016) for Ape-X.

    Item ``id`` lives in slot ``id % capacity``; ids only grow, so inserting evicts the oldest item
    (FIFO) and an update for an id whose slot now holds a newer item is recognised and ignored.
    A removed item stays removed: its slot is flagged until a new item overwrites it, and priority
    updates naming it meanwhile are ignored (and counted) rather than bringing it back.
    Observations are kept as the actor's lz4 blobs, once per chunk: a transition refers to its
    observation and bootstrap observation by index into its chunk's frame table. A chunk's bytes
    are freed when its last transition is evicted. With the wire's stack layout (Atari) a blob is
    one frame and an observation S frame references: each frame of a chunk is stored once, however
    many stacks hold it, and the replay never decompresses anything.
    """

    def __init__(self, capacity: int, alpha: float = 0.6, priority_eps: float = 1e-6,
                 seed: int = 0) -> None:
        self.capacity = capacity
        self.alpha = alpha
        self.priority_eps = priority_eps
        self.tree = SumTree(capacity)
        self.rng = np.random.default_rng(seed)
        self.ids = np.full(capacity, -1, dtype=np.int64)
        self.chunk = np.full(capacity, -1, dtype=np.int64)
        # Byte range of each item's observation and bootstrap observation inside its chunk's blob
        # (sampling slices blobs with these, no per-frame Python objects or offset tables kept);
        # [capacity, S] with the stack layout: the range of each frame of the stack.
        self._snapshot: ReplaySnapshot | None = None  # the snapshot being copied, if any
        self.stack = 1
        self._set_stack(1)
        self.action = np.zeros(capacity, dtype=np.int32)
        self.ret = np.zeros(capacity, dtype=np.float32)
        self.disc = np.zeros(capacity, dtype=np.float32)
        # True while the slot's item is removed; cleared when a new item takes the slot. A flag per
        # slot, not a set of removed ids: memory stays one byte per slot however much is removed.
        self.gone = np.zeros(capacity, dtype=bool)
        # chunk id -> its lz4 blobs end to end, as a memoryview: slicing one for a batch then costs
        # no allocation or copy (half the time of slicing bytes), b"".join copies once.
        self._chunks: dict[int, memoryview] = {}
        self._live: dict[int, int] = {}
        self._next_chunk = 0
        self.next_id = 0
        self.obs_shape: tuple[int, ...] | None = None
        self.obs_dtype: str | None = None
        self.stale_updates = 0    # updates and removals naming ids no longer stored (evicted)
        self.removed = 0          # items taken out of sampling
        self.removed_updates = 0  # priority updates naming a removed item: ignored
        self.stored_bytes = 0

    def _set_stack(self, stack: int) -> None:
        """Frames per stored observation (1: whole observations); only while the replay is empty."""
        shape = (self.capacity,) if stack == 1 else (self.capacity, stack)
        self.stack = stack
        for k in ("obs_lo", "obs_hi", "next_lo", "next_hi"):
            setattr(self, k, np.zeros(shape, dtype=np.int32))
            if self._snapshot is not None:  # of the empty replay: its ranges are zeros in either shape
                self._snapshot.slots[k] = np.zeros(shape, dtype=np.int32)

    @property
    def size(self) -> int:
        """Number of items stored."""
        return min(self.next_id, self.capacity)

    def _priority(self, p: np.ndarray) -> np.ndarray:
        return (np.asarray(p, dtype=np.float64) + self.priority_eps) ** self.alpha

    def add(self, chunk: ExperienceChunk) -> np.ndarray:
        """Store a chunk's transitions; returns their ids. Evicts the oldest items at capacity."""
        stack = stack_of(chunk.obs_idx)
        if self.obs_shape is None:
            self.obs_shape, self.obs_dtype = tuple(chunk.obs_shape), chunk.obs_dtype
            if stack != self.stack:
                self._set_stack(stack)
        elif (tuple(chunk.obs_shape), chunk.obs_dtype) != (self.obs_shape, self.obs_dtype):
            raise ValueError(f"chunk observations are {chunk.obs_dtype}{list(chunk.obs_shape)}, "
                             f"replay holds {self.obs_dtype}{list(self.obs_shape)}")
        if stack != self.stack:  # one layout per replay: a sample's indices have one shape
            raise ValueError(f"chunk observations are stacks of {stack} blobs, replay holds {self.stack}")
        if len(chunk.frame_data) >= 1 << 31:  # checked before anything changes
            raise ValueError(f"a chunk of {len(chunk.frame_data)} bytes: chunks must stay under 2 GiB")
        n = len(chunk.action)
        keep = slice(max(0, n - self.capacity), n)  # a chunk larger than the replay keeps its tail
        n_keep = keep.stop - keep.start
        if n_keep == 0:
            return np.zeros(0, dtype=np.int64)
        ids = np.arange(self.next_id + keep.start, self.next_id + n, dtype=np.int64)
        self.next_id += n
        slots = ids % self.capacity
        if self._snapshot is not None:  # before anything changes: the snapshot keeps these slots' old values
            self._snapshot.preserve(slots)
        self._release(self.chunk[slots][self.ids[slots] >= 0])
        cid = self._next_chunk
        self._next_chunk += 1
        data = bytes(chunk.frame_data)
        off = np.asarray(chunk.frame_offsets, dtype=np.int64)
        self._chunks[cid] = memoryview(data)
        self._live[cid] = n_keep
        self.stored_bytes += len(data)
        self.ids[slots] = ids
        self.chunk[slots] = cid
        oi, ni = chunk.obs_idx[keep], chunk.next_idx[keep]
        self.obs_lo[slots], self.obs_hi[slots] = off[oi], off[oi + 1]
        self.next_lo[slots], self.next_hi[slots] = off[ni], off[ni + 1]
        self.action[slots] = chunk.action[keep]
        self.ret[slots] = chunk.ret[keep]
        self.disc[slots] = chunk.disc[keep]
        self.gone[slots] = False
        self.tree.set(slots, self._priority(chunk.priority[keep]))
        return ids

    def _release(self, chunk_ids: np.ndarray) -> None:
        if chunk_ids.size == 0:
            return
        cids, counts = np.unique(chunk_ids, return_counts=True)
        for cid, c in zip(cids.tolist(), counts.tolist()):
            left = self._live[cid] - c
            if left == 0:
                del self._live[cid]
                self.stored_bytes -= len(self._chunks.pop(cid))
            else:
                self._live[cid] = left

    @property
    def sampleable(self) -> bool:
        """Some stored item has a priority above 0 (removed items have 0)."""
        return self.size > 0 and self.tree.total > 0

    def sample(self, batch_size: int, beta: float, seq: int = 0) -> SampleBatch:
        """A stratified proportional sample of ``batch_size`` items with IS weights."""
        if not self.sampleable:
            raise ValueError("cannot sample: the replay holds no item with a priority above 0")
        total = self.tree.total
        bounds = (np.arange(batch_size) + self.rng.random(batch_size)) * (total / batch_size)
        slots = self.tree.find(np.minimum(bounds, np.nextafter(total, 0)))
        for _ in range(4):
            # Float rounding at a segment edge can land on a zero leaf (an empty or removed slot):
            # draw those again anywhere.
            bad = (self.tree.get(slots) <= 0) | (slots >= self.size)
            if not bad.any():
                break
            slots[bad] = self.tree.find(self.rng.random(int(bad.sum())) * np.nextafter(total, 0))
        else:
            slots = slots[~bad]  # vanishingly rare: a slightly smaller batch
        prios = self.tree.get(slots)
        return self._gather(slots, importance_weights(prios, total, self.size, beta), seq)

    def _gather(self, slots: np.ndarray, weights: np.ndarray, seq: int) -> SampleBatch:
        # One frame table for the batch, each distinct observation once. A frame is identified by
        # its chunk and byte offset; the slicing loop below is the only per-frame Python work.
        # With the stack layout the blobs are single frames: each is sent once however many of the
        # batch's stacks hold it, and the indices come out [b, S].
        b, S = len(slots), self.stack
        cids = np.repeat(self.chunk[slots], S)
        lo = np.concatenate([self.obs_lo[slots].ravel(), self.next_lo[slots].ravel()]).astype(np.int64)
        hi = np.concatenate([self.obs_hi[slots].ravel(), self.next_hi[slots].ravel()])
        uniq, first, inverse = np.unique(np.concatenate([cids, cids]) << 32 | lo, return_index=True,
                                         return_inverse=True)
        inverse = inverse.reshape(-1)  # numpy 2.0 and 2.1 give it the input's shape, others flat
        chunks = self._chunks
        blobs = [chunks[c][s:e] for c, s, e in zip((uniq >> 32).tolist(), (uniq & 0xFFFFFFFF).tolist(),
                                                   hi[first].tolist())]
        offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
        np.cumsum(hi[first] - lo[first], out=offsets[1:])
        return SampleBatch(
            seq=seq, obs_shape=self.obs_shape, obs_dtype=self.obs_dtype,
            frame_data=b"".join(blobs), frame_offsets=offsets,
            obs_idx=_layout(inverse[:b * S], b, S), next_idx=_layout(inverse[b * S:], b, S),
            action=self.action[slots], ret=self.ret[slots], disc=self.disc[slots],
            ids=self.ids[slots], weight=weights)

    def update(self, ids: np.ndarray, priorities: np.ndarray) -> int:
        """Set new priorities by id. Ids no longer stored are ignored (``stale_updates``), and so are
        removed items (``removed_updates``): a removal is for good. Returns how many applied."""
        ids = np.asarray(ids, dtype=np.int64)
        slots = ids % self.capacity
        stored = (ids >= 0) & (self.ids[slots] == ids)
        removed = stored & self.gone[slots]
        live = stored & ~removed
        self.stale_updates += int((~stored).sum())
        self.removed_updates += int(removed.sum())
        if self._snapshot is not None:
            self._snapshot.preserve(slots[live])
        self.tree.set(slots[live], self._priority(np.asarray(priorities)[live]))
        return int(live.sum())

    def remove(self, ids: np.ndarray) -> int:
        """Never sample these items again: priority 0 and no later update applies, until a new item
        reuses the slot. Ids no longer stored are ignored and counted in ``stale_updates``; an item
        removed already is not counted again. Returns how many were removed."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        slots = ids % self.capacity
        stored = (ids >= 0) & (self.ids[slots] == ids)
        # Not removed yet: batches sampled before the first removal report the item again.
        fresh = stored & ~self.gone[slots]
        self.stale_updates += int((~stored).sum())
        if self._snapshot is not None:
            self._snapshot.preserve(slots[fresh])
        self.gone[slots[fresh]] = True
        self.tree.set(slots[fresh], np.zeros(int(fresh.sum())))
        self.removed += int(fresh.sum())
        return int(fresh.sum())

    def priorities(self, ids: np.ndarray) -> np.ndarray:
        """Current sampling priority p^alpha of live ids (for tests and inspection)."""
        return self.tree.get(np.asarray(ids, dtype=np.int64) % self.capacity)

    # ----------------------------------------------------------------------- snapshots

    _SLOT_ARRAYS = ("ids", "chunk", "obs_lo", "obs_hi", "next_lo", "next_hi", "action", "ret", "disc", "gone")

    def begin_snapshot(self) -> "ReplaySnapshot":
        """Start a snapshot of the replay as it is now, to be copied a slice at a time
        (``ReplaySnapshot.copy``) while the replay goes on changing."""
        if self._snapshot is not None:
            raise RuntimeError("a snapshot is already being taken")
        self._snapshot = ReplaySnapshot(self)
        return self._snapshot

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy of the replay's state taken in one go (``begin_snapshot`` and copy it all).

        Chunk blobs are immutable ``bytes`` and only referenced, so the (slow) writing can happen in
        another thread while the replay goes on changing.
        """
        snap = self.begin_snapshot()
        snap.copy(self.capacity)
        return snap.state()

    @staticmethod
    def write_snapshot(state: dict[str, Any], path: str | Path) -> None:
        """Write a ``snapshot()`` atomically (temporary file, fsync, rename): never a torn file.

        The file is an ``.npz`` (what ``np.savez`` writes, entries uncompressed: the frames are lz4
        already) streamed in pieces of at most ``_WRITE_PIECE`` bytes straight from the arrays and
        blobs: ``np.savez`` copies each array into a new ``bytes`` with the GIL held (16 MiB at a time),
        which stalls the event loop of a server writing from a thread; crc32 and the file writes
        release the GIL.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {k: v for k, v in state.items() if k != "chunks"}
        for i, data in enumerate(state["chunks"]):
            arrays[f"c{i}"] = np.frombuffer(data, dtype=np.uint8)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                for name, a in arrays.items():
                    a = np.ascontiguousarray(a)
                    with z.open(f"{name}.npy", "w", force_zip64=True) as out:
                        np.lib.format.write_array_header_1_0(out, np.lib.format.header_data_from_array_1_0(a))
                        raw = memoryview(a.reshape(-1).view(np.uint8)) if a.size else memoryview(b"")
                        for lo in range(0, len(raw), _WRITE_PIECE):
                            out.write(raw[lo:lo + _WRITE_PIECE])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load_snapshot(cls, path: str | Path, capacity: int, alpha: float, seed: int = 0) -> "PrioritizedReplay":
        """A replay restored from ``write_snapshot``; ValueError if it was made with other settings."""
        with np.load(path, allow_pickle=False) as z:  # plain arrays only: never unpickle a file
            cap, next_id, next_chunk, stale = (int(x) for x in z["meta"])
            if cap != capacity or float(z["alpha"][0]) != alpha:
                raise ValueError(f"snapshot {path} holds a replay of capacity {cap}, alpha {z['alpha'][0]}; "
                                 f"this run has --capacity {capacity}, --alpha {alpha}")
            r = cls(capacity, alpha, float(z["alpha"][1]), seed)
            r.next_id, r._next_chunk, r.stale_updates = next_id, next_chunk, stale
            shape, dtype = (str(x) for x in z["obs_spec"])
            r.obs_shape = None if shape == "None" else tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
            r.obs_dtype = None if dtype == "None" else dtype
            if z["slot_obs_lo"].ndim == 2:  # a replay of the stack layout
                r._set_stack(int(z["slot_obs_lo"].shape[1]))
            for k in cls._SLOT_ARRAYS:
                if k == "gone" and "slot_gone" not in z.files:
                    # A snapshot from before the flag: its removed items are the stored ones at
                    # priority 0 (a stored item's priority is at least priority_eps ** alpha > 0).
                    r.gone[:] = (z["slot_ids"] >= 0) & (z["leaves"] == 0)
                    continue
                getattr(r, k)[:] = z[f"slot_{k}"]
            r.tree.set(np.arange(capacity), z["leaves"])
            for i, (cid, live) in enumerate(zip(z["chunk_ids"].tolist(), z["chunk_live"].tolist())):
                data = z[f"c{i}"].tobytes()
                r._chunks[cid] = memoryview(data)
                r._live[cid] = live
                r.stored_bytes += len(data)
        return r


# Largest piece of an array or blob ``write_snapshot`` hands to zipfile at once.
_WRITE_PIECE = 1 << 20


class ReplaySnapshot:
    """The replay's state at the instant ``PrioritizedReplay.begin_snapshot`` was called, copied a
    slice of slots at a time (``copy``) so that a server can sample and insert between slices.

    Consistency is copy-on-write. Slots below ``cursor`` are copied already; slots at or above it
    are still read from the replay. Before the replay changes a slot at or above the cursor (an
    insert overwriting it, a priority update, a removal) it calls ``preserve``, which saves that
    slot's values and leaf here and marks it so the copy skips it when the cursor gets there. A slot
    changed before the cursor reached it therefore keeps its value from the begin instant, one that
    did not change is copied as it still is then: every slot, priority and chunk reference is the
    begin instant's, so a restored replay is that replay (no torn items, no priority of another
    item), and the FIFO position, chunk counter and counters are taken at that instant. Each slot
    is copied once, so the work is a one-shot copy's, spread over slices, plus a small gather per
    insert or update that lands ahead of the cursor.

    Chunk blobs are immutable ``bytes``: the snapshot keeps a reference to every chunk its slots use,
    taken when a slot is copied or preserved (its chunk is still stored then), so chunks evicted
    later are still written. Per-chunk live counts are recounted from the copied slots by ``state``.
    """

    def __init__(self, replay: PrioritizedReplay) -> None:
        self._replay = replay
        cap = replay.capacity
        self.meta = np.array([cap, replay.next_id, replay._next_chunk, replay.stale_updates], dtype=np.int64)
        self.alpha = np.array([replay.alpha, replay.priority_eps])
        self.obs_spec = np.array([repr(replay.obs_shape), str(replay.obs_dtype)])
        self.slots = {k: np.empty_like(getattr(replay, k)) for k in PrioritizedReplay._SLOT_ARRAYS}
        self.leaves = np.empty(cap, dtype=np.float64)
        self.saved = np.zeros(cap, dtype=bool)  # preserved ahead of the cursor: the copy skips these
        self.chunks: dict[int, memoryview] = {}
        self.cursor = 0

    @property
    def done(self) -> bool:
        """Every slot is copied: the snapshot no longer depends on the replay."""
        return self.cursor >= len(self.saved)

    def copy(self, n: int) -> bool:
        """Copy the next ``n`` slots (at least one); returns ``done``. Once done, the replay stops
        calling ``preserve``."""
        r, a = self._replay, self.cursor
        b = min(a + max(1, n), len(self.saved))
        keep = ~self.saved[a:b]
        whole = bool(keep.all())  # the usual case: a plain slice copy
        for k, dst in self.slots.items():
            if whole:
                dst[a:b] = getattr(r, k)[a:b]
            else:
                np.copyto(dst[a:b], getattr(r, k)[a:b], where=keep.reshape(-1, *[1] * (dst.ndim - 1)))
        np.copyto(self.leaves[a:b], r.tree.leaves(a, b), where=keep)
        # Copied slots hold chunks still stored now; preserved ones had theirs kept by ``preserve``.
        self._keep_chunks(self.slots["chunk"][a:b][self.slots["ids"][a:b] >= 0])
        self.cursor = b
        if self.done:
            self.cancel()
        return self.done

    def preserve(self, slots: np.ndarray) -> None:
        """Save these slots' values as they are now, before the replay changes them (slots already
        copied or saved are left alone: theirs are the begin instant's)."""
        s = np.asarray(slots, dtype=np.int64)
        s = s[s >= self.cursor]
        s = s[~self.saved[s]]
        if s.size == 0:
            return
        r = self._replay
        for k, dst in self.slots.items():
            dst[s] = getattr(r, k)[s]
        self.leaves[s] = r.tree.get(s)
        self.saved[s] = True
        self._keep_chunks(self.slots["chunk"][s][self.slots["ids"][s] >= 0])

    def _keep_chunks(self, cids: np.ndarray) -> None:
        if cids.size == 0:
            return
        # A FIFO's slots come in runs of one chunk: dedup the runs before going to Python.
        runs = cids[np.concatenate(([True], cids[1:] != cids[:-1]))]
        stored = self._replay._chunks
        for cid in set(runs.tolist()) - self.chunks.keys():
            self.chunks[cid] = stored[cid]

    def cancel(self) -> None:
        """Stop following the replay's changes (when done, or when the snapshot is abandoned)."""
        if self._replay._snapshot is self:
            self._replay._snapshot = None

    def state(self) -> dict[str, Any]:
        """The finished snapshot in ``write_snapshot``'s form. Touches nothing of the replay, so it
        can run in the writing thread."""
        if not self.done:
            raise RuntimeError(f"snapshot copied up to slot {self.cursor} of {len(self.saved)}")
        ids, chunk = self.slots["ids"], self.slots["chunk"]
        cids, live = np.unique(chunk[ids >= 0], return_counts=True)
        return {
            "meta": self.meta, "alpha": self.alpha, "obs_spec": self.obs_spec,
            **{f"slot_{k}": v for k, v in self.slots.items()},
            "leaves": self.leaves,
            "chunk_ids": cids.astype(np.int64),
            "chunk_live": live.astype(np.int64),
            "chunks": [self.chunks[c] for c in cids.tolist()],
        }


class SampleToInsertRatio:
    """Holds sampling (and optionally insertion) to ``samples_per_insert`` sampled transitions per
    inserted one, within ``tolerance`` sampled transitions, as Reverb's ``SampleToInsertRatio`` does.

    Decoupled actors and learner otherwise replay each transition as often as the hardware makes
    them: a faster learner (a GPU) replays each one more, faster actors less, and results stop
    reproducing across machines. Counting starts once ``min_size`` transitions are in (filling the
    replay is not limited). With ``samples_per_insert`` 0 nothing is limited (Ape-X's way).
    """

    def __init__(self, samples_per_insert: float, tolerance: float, min_size: int) -> None:
        if samples_per_insert < 0 or tolerance < 0:
            raise ValueError("samples_per_insert and tolerance must be >= 0")
        self.spi = samples_per_insert
        self.tolerance = tolerance
        self.min_size = min_size
        self.inserted = 0  # transitions
        self.sampled = 0   # transitions (a batch of 512 counts 512)

    def _diff(self) -> float:
        """Sampled transitions owed (positive) or taken ahead (negative) at the target ratio."""
        return self.spi * (self.inserted - self.min_size) - self.sampled

    def can_sample(self, n: int) -> bool:
        """True if sampling ``n`` more transitions keeps sampling within the tolerance."""
        return self.spi == 0 or (self.inserted >= self.min_size and self._diff() - n >= -self.tolerance)

    def can_insert(self) -> bool:
        """True if inserting is within the tolerance (checked before a chunk: it may overshoot by one)."""
        return self.spi == 0 or self.inserted < self.min_size or self._diff() <= self.tolerance

    def on_insert(self, n: int) -> None:
        self.inserted += n

    def on_sample(self, n: int) -> None:
        self.sampled += n

    @property
    def ratio(self) -> float:
        """Achieved sampled / inserted transitions since ``min_size`` (0 before any)."""
        counted = self.inserted - self.min_size
        return self.sampled / counted if counted > 0 else 0.0
