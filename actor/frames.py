"""Stacked observations as references to single compressed frames (the wire's stack layout).

An Atari observation is the last S frames [S, H, W]. From one step to the next, frames 1..S-1 of the
old stack are frames 0..S-2 of the new one, so only the newest frame is new: it is compressed once
and every stack holding it refers to the same blob object. Whatever else happens (an episode's
start, whose stack holds the reset frame S times or the frames of its no-op steps), the new stack's
frames are compressed afresh, each distinct frame once: the references always rebuild the env's
observation exactly, whatever its reset stacking does.
"""

from __future__ import annotations

import lz4.block
import numpy as np

Stack = tuple[bytes, ...]  # one observation: S blob references, oldest frame first


class FrameStacker:
    """Turns each step's stacked observations [K, S, ...] into K stacks of S compressed frames."""

    def __init__(self, hc_level: int = 0) -> None:
        """``hc_level``: lz4 high-compression level 1-12 (0: the fast mode). The receiver cannot tell
        the difference: any level decompresses alike, as fast."""
        if not 0 <= hc_level <= 12:
            raise ValueError(f"lz4 high-compression level {hc_level}, expected 0..12")
        self.prev: np.ndarray | None = None  # last observations [K, S, ...]
        self.refs: list[Stack] = []
        self.opts = dict(mode="high_compression", compression=hc_level) if hc_level else {}

    def add(self, obs: np.ndarray) -> list[Stack]:
        """The stacks of this step's observations [K, S, ...] (a copy is kept to compare the next with)."""
        obs = np.asarray(obs, dtype=np.asarray(obs).dtype.newbyteorder("<"))  # the wire is little-endian
        K = len(obs)
        if self.prev is not None and self.prev.shape == obs.shape:
            shifted = np.all((obs[:, :-1] == self.prev[:, 1:]).reshape(K, -1), axis=1)
        else:
            shifted = np.zeros(K, dtype=bool)
        refs = []
        for k in range(K):
            if shifted[k]:
                refs.append(self.refs[k][1:] + (self._compress(obs[k, -1].tobytes()),))
            else:
                refs.append(self._fresh(obs[k]))
        self.prev, self.refs = obs.copy(), refs
        return refs

    def _compress(self, raw: bytes) -> bytes:
        return lz4.block.compress(raw, store_size=False, **self.opts)

    def _fresh(self, stack: np.ndarray) -> Stack:
        """Each distinct frame of a stack compressed once (a reset stack repeats its first frame)."""
        seen: dict[bytes, bytes] = {}
        out = []
        for f in stack:
            raw = f.tobytes()
            if raw not in seen:
                seen[raw] = self._compress(raw)
            out.append(seen[raw])
        return tuple(out)


def stack_table(stacks: list[Stack]) -> tuple[list[bytes], np.ndarray]:
    """Unique blobs of some stacks (by identity: a shared frame is the same object) and each stack's
    indices into them [len(stacks), S] int32."""
    where: dict[int, int] = {}
    blobs: list[bytes] = []
    idx = np.empty((len(stacks), len(stacks[0]) if stacks else 0), dtype=np.int32)
    for i, st in enumerate(stacks):
        for j, b in enumerate(st):
            w = where.get(id(b))
            if w is None:
                w = where[id(b)] = len(blobs)
                blobs.append(b)
            idx[i, j] = w
    return blobs, idx
