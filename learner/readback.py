"""Priority updates from the training device to the host without a sync per step (a pure core).

Reading a step's priorities or loss on the host (``.cpu()``, ``float(loss)``) waits for the GPU to finish
everything queued so far: the host then cannot queue the next step while the GPU runs this one, and the
GPU idles while the host receives, decodes and launches. Instead each step's priorities (and, every
``loss_every`` steps, its loss) are copied into pinned host buffers behind the step on the CUDA stream,
an event is recorded after the copies, and the update is sent once its event has happened.

``PendingUpdates`` keeps those updates in a bounded FIFO: they leave in the order their batches were
trained on (the replay applies updates in arrival order, so a later update for an item must land
last), at most ``max_pending`` wait at a time (the host runs at most that many steps ahead of the
GPU), and every pushed batch leaves exactly once. The copy itself is a ``Copier``: ``CudaCopier`` on
CUDA, ``CpuCopier`` on the CPU, where a step's results are host memory already and the update leaves
at once (the CPU learner behaves as before: one update sent right after each step). Tests use a fake.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .dqn import Batch


class Event(Protocol):
    """What ``torch.cuda.Event`` offers that we use."""

    def query(self) -> bool:
        """True once the work recorded before the event has finished (never blocks)."""

    def synchronize(self) -> None:
        """Block until it has."""


class Done:
    """An event that has already happened: the CPU's (a step's tensors are ready when it returns)."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


DONE = Done()


class Copier(Protocol):
    """Copies a step's results to the host without waiting for them."""

    def copy(self, priorities: torch.Tensor, loss: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray | None, Event]:
        """(host priorities [B], host loss [1] or None, event): the arrays hold the values once the event
        has happened, and may be reused by the copy ``max_pending + 1`` calls later."""


class CpuCopier:
    """CPU training: the tensors are host memory already (no pinned buffers, nothing to wait for)."""

    def copy(self, priorities: torch.Tensor, loss: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray | None, Event]:
        return (priorities.detach().numpy(), None if loss is None else loss.detach().reshape(1).numpy(), DONE)


class CudaCopier:
    """CUDA training: non-blocking copies into ``slots`` rotating pinned buffers, then an event on the stream.

    A slot is written again ``slots`` copies later: ``PendingUpdates`` has taken the values out by then
    (it holds at most ``slots - 1`` updates when it copies).
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._prio: list[torch.Tensor | None] = [None] * slots
        self._loss = [torch.empty(1, dtype=torch.float32, pin_memory=True) for _ in range(slots)]
        self._events = [torch.cuda.Event() for _ in range(slots)]
        self._next = 0

    def copy(self, priorities: torch.Tensor, loss: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray | None, Event]:
        i = self._next
        self._next = (i + 1) % self.slots
        n = priorities.numel()
        buf = self._prio[i]
        if buf is None or buf.numel() < n:  # sized by the first batch (a later smaller one uses a prefix)
            buf = self._prio[i] = torch.empty(n, dtype=torch.float32, pin_memory=True)
        buf[:n].copy_(priorities.detach().reshape(-1), non_blocking=True)
        host_loss = None
        if loss is not None:
            self._loss[i].copy_(loss.detach().reshape(1), non_blocking=True)
            host_loss = self._loss[i].numpy()
        self._events[i].record()  # after both copies, on the current stream
        return buf[:n].numpy(), host_loss, self._events[i]


def copier_for(device: torch.device, slots: int) -> Copier:
    """The copier of ``device``'s type."""
    return CudaCopier(slots) if device.type == "cuda" else CpuCopier()


@dataclass
class Update:
    """A priority update ready to send, and its step's loss where it was read."""

    seq: int               # learner steps after the batch's step (the message's seq)
    ids: np.ndarray
    priority: np.ndarray   # owned (copied out of any reused host buffer)
    incarnation: int
    remove: np.ndarray     # the batch's items whose observations did not decompress
    loss: float | None
    shard: int = 0         # the replay shard the batch came from, where the update goes


@dataclass
class _Pending:
    seq: int
    ids: np.ndarray
    incarnation: int
    remove: np.ndarray
    priority: np.ndarray
    loss: np.ndarray | None
    event: Event
    shard: int = 0

    def take(self) -> Update:
        return Update(seq=self.seq, ids=self.ids, priority=np.array(self.priority, dtype=np.float32),
                      incarnation=self.incarnation, remove=self.remove,
                      loss=None if self.loss is None else float(self.loss[0]), shard=self.shard)


class PendingUpdates:
    """A bounded FIFO of priority updates whose values are still on their way off the device.

    ``push`` after each batch (trained or not) returns the updates to send now, oldest first: those at
    the head whose copies have finished, and the oldest one, waited for, when ``max_pending`` would be
    exceeded. ``drain`` waits for and returns the rest. Updates never overtake each other.
    """

    def __init__(self, copier: Copier, max_pending: int, loss_every: int) -> None:
        if max_pending < 1 or loss_every < 1:
            raise ValueError(f"max_pending and loss_every must be >= 1, got {max_pending} and {loss_every}")
        self.copier = copier
        self.max_pending = max_pending
        self.loss_every = loss_every
        self._queue: collections.deque[_Pending] = collections.deque()
        self.waited = 0  # times the oldest update was waited for (the host ran max_pending steps ahead)

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, b: Batch, seq: int, result: tuple[torch.Tensor, torch.Tensor] | None) -> list[Update]:
        """Queue the update of batch ``b``: ``result`` = (priorities, loss) on the device from the step that
        made the learner's step count ``seq``, or None when nothing was trained (no good item: the update
        only removes ``b.bad_ids``). The loss is copied when ``seq`` is a multiple of ``loss_every``."""
        if result is None:
            pending = _Pending(seq, b.ids, b.incarnation, b.bad_ids, np.zeros(0, np.float32), None, DONE, b.shard)
        else:
            priorities, loss = result
            host, host_loss, event = self.copier.copy(priorities, loss if seq % self.loss_every == 0 else None)
            pending = _Pending(seq, b.ids, b.incarnation, b.bad_ids, host, host_loss, event, b.shard)
        self._queue.append(pending)
        out = []
        while len(self._queue) > self.max_pending:
            self._queue[0].event.synchronize()
            self.waited += 1
            out.append(self._queue.popleft().take())
        return out + self.ready()

    def ready(self) -> list[Update]:
        """The updates at the head whose copies have finished (never blocks)."""
        out = []
        while self._queue and self._queue[0].event.query():
            out.append(self._queue.popleft().take())
        return out

    def drain(self) -> list[Update]:
        """Every pending update, in order, each waited for."""
        out = []
        while self._queue:
            self._queue[0].event.synchronize()
            out.append(self._queue.popleft().take())
        return out
