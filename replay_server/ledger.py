"""Which chunks of each sender process the replay server stored: the receiving half of a transition ledger.

An actor process numbers its chunks 1, 2, 3, ... (``seq``), marks them with its random ``incarnation``
and reports how many it has sent (``actor/<name>/sent_chunks``, ``actor/<name>/incarnation``). The replay
server keeps, per sender process, the first and last ``seq`` it stored and how many chunks and transitions
that was. From both sides a reader (bench/soak.py) can tell every lost chunk: a gap inside
``[first_seq, last_seq]`` (``skipped``: lost on the way while both ends lived, e.g. a connection dropped
by a network cut), chunks before ``first_seq`` (lost before this server saw the process: at a restart of
the server) and chunks after ``last_seq`` (in flight when the sender died, or still in flight).

Processes are told apart by the incarnation, not by ``seq`` starting over: after a restart, the chunks a
killed actor left in the kernel's buffers keep arriving, interleaved with its new process's. A sender
that gives no incarnation (0: a foreign actor) is one process until its ``seq`` goes back.
"""

from __future__ import annotations

from dataclasses import dataclass

# Sender names with their own counters; chunks of later new names are counted in ``untracked_chunks``
# only, so invented sender names cannot grow the server's memory or its telemetry without bound.
MAX_SENDERS = 256
# Processes kept per sender name: the current one and the one before it (still draining after a restart).
PROCESSES_PER_SENDER = 2


@dataclass
class ProcessCount:
    """What this server stored from one process of a sender."""

    first_seq: int
    last_seq: int
    chunks: int = 0
    transitions: int = 0

    @property
    def skipped(self) -> int:
        """Chunks between ``first_seq`` and ``last_seq`` that never arrived."""
        return self.last_seq - self.first_seq + 1 - self.chunks


class SenderLedger:
    """Per sender process: stored chunks and transitions, first and last seq; totals of the gaps and new
    processes seen."""

    def __init__(self, max_senders: int = MAX_SENDERS) -> None:
        self.max_senders = max_senders
        self.senders: dict[str, dict[int, ProcessCount]] = {}  # name -> incarnation -> counts (oldest first)
        self.skipped = 0            # chunks missing inside some process's sequence (gaps), all senders
        self.sender_restarts = 0    # new processes of a sender already seen
        self.untracked_chunks = 0   # chunks of senders beyond ``max_senders``

    def on_chunk(self, sender: str, seq: int, transitions: int, incarnation: int = 0) -> None:
        """Count one stored chunk numbered ``seq`` of ``sender``'s process ``incarnation``."""
        procs = self.senders.get(sender)
        if procs is None:
            if len(self.senders) >= self.max_senders:
                self.untracked_chunks += 1
                return
            procs = self.senders[sender] = {}
        c = procs.get(incarnation)
        if c is not None and incarnation == 0 and seq <= c.last_seq:  # no incarnation: a seq going back
            c = None                                                   # is a new process
            del procs[0]
            self.sender_restarts += 1
        elif c is None and procs:
            self.sender_restarts += 1
        if c is None:
            while len(procs) >= PROCESSES_PER_SENDER:
                del procs[next(iter(procs))]
            c = procs[incarnation] = ProcessCount(first_seq=seq, last_seq=seq - 1)
        if seq > c.last_seq:
            self.skipped += seq - c.last_seq - 1
            c.last_seq = seq
        c.chunks += 1
        c.transitions += transitions

    def metrics(self) -> dict[str, float]:
        """Telemetry: the totals and, per sender process,
        ``replay/from/<sender>/<incarnation>/{chunks,transitions,first_seq,last_seq}``."""
        out: dict[str, float] = {"replay/seq_skipped": self.skipped, "replay/sender_restarts": self.sender_restarts,
                                 "replay/untracked_chunks": self.untracked_chunks}
        for name, procs in self.senders.items():
            for inc, c in procs.items():
                p = f"replay/from/{name}/{inc}/"
                out.update({p + "chunks": c.chunks, p + "transitions": c.transitions, p + "first_seq": c.first_seq,
                            p + "last_seq": c.last_seq})
        return out
