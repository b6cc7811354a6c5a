"""What can be in flight between two roles, in messages and in bytes, and how far priorities can lag.

Pure: no sockets. ``SOCKETS`` is every socket of every role (pattern, bind or connect, high-water mark,
the config fields of its endpoint and of its kernel buffer); ``transport.Sockets.open`` creates the
roles' sockets from it, and the bounds here are computed from the same table, so they cannot drift.

ZeroMQ's high-water marks count messages, not bytes, and TCP's kernel buffers grow by themselves
(Linux autotunes them up to ``net.ipv4.tcp_wmem``/``tcp_rmem``'s maximum, 4 + 32 MiB by default): a
few MiB of small sample batches sat in those buffers between the replay server and the learner, so
hundreds of batches were in flight and their priorities came back that late. Every socket therefore
sets its kernel buffers (``ZMQ_SNDBUF``/``ZMQ_RCVBUF``: the ``--*-buffer`` settings), and between one
sending and one receiving socket (one TCP connection) bytes sit in, at most:

* the sender's pipe: SNDHWM messages;
* the sender's I/O thread: the message it is writing, and ``ZMQ_BATCH_BYTES`` of messages it
  encoded ahead (libzmq's out batch);
* the sender's kernel: 2 x SO_SNDBUF (Linux doubles the value given; others use it as is), plus
  ``KERNEL_SEGMENT_BYTES``: a write that starts below the limit may fill one segment past it;
* the receiver's kernel: 2 x SO_RCVBUF (the window it advertises never exceeds its buffer);
* the receiver's I/O thread: ``ZMQ_BATCH_BYTES`` read ahead and one decoded message that its full
  pipe has not taken yet;
* the receiver's pipe: RCVHWM messages.

So bytes <= (SNDHWM + RCVHWM + 2) x max message + kernel + 2 x ZMQ_BATCH_BYTES, and messages <=
SNDHWM + RCVHWM + 2 + (kernel + 2 x ZMQ_BATCH_BYTES) // min message (the messages wholly between the
two I/O threads' ends weigh at least the smallest message each). PROTOCOL.md 2.4 tabulates them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from .config import ASYNC_ALGOS
from .wire import MAX_HEADER_BYTES

ZMQ_BATCH_BYTES = 8192        # libzmq's ZMQ_IN_BATCH_SIZE and ZMQ_OUT_BATCH_SIZE (draft options: fixed here)
KERNEL_SEGMENT_BYTES = 65536  # one TCP segment at Linux's default GSO limit: what a write may add past SO_SNDBUF
FRAME_BYTES = 9               # ZMTP bytes before each frame (a flags byte and an 8-byte size; short frames take 2)
HEADER_BYTES = 512            # a bound on the msgpack header of experience, sample and priorities messages
                              # (tests/test_flow.py checks it with the largest values each field takes)
LOADER_QUEUE = 2              # decoded batches queued between the learner's loader threads and its trainer
PRIORITIES_HWM = 8            # priority updates queued on each side: each is a batch whose priorities wait


@dataclass(frozen=True)
class SocketSpec:
    """One socket of one role."""

    pattern: str     # ZeroMQ socket type: PUSH, PULL, PUB, SUB, XPUB, XSUB
    binds: bool      # binds its endpoint (else connects)
    hwm: int | str   # SNDHWM and RCVHWM in messages, or the config field holding it
    endpoint: str    # config field of its endpoint
    buffer: str      # config field of its kernel buffer (bytes given to SO_SNDBUF and SO_RCVBUF)

    def hwm_of(self, cfg: Any) -> int:
        """The high-water mark with ``cfg``'s value where it is a setting."""
        return int(getattr(cfg, self.hwm)) if isinstance(self.hwm, str) else self.hwm


# (program, socket) -> spec. Programs: the Ape-X roles, the asynchronous family's actor-learner and
# parameter server (the learner program with --algo a3c and the like), and the weights relay.
SOCKETS: dict[tuple[str, str], SocketSpec] = {
    ("actor", "experience"): SocketSpec("PUSH", False, 8, "experience", "experience_buffer"),
    ("actor", "weights"): SocketSpec("SUB", False, 2, "weights", "weights_buffer"),
    ("actor", "telemetry"): SocketSpec("PUB", False, 100, "telemetry", "telemetry_buffer"),
    ("replay_server", "experience"): SocketSpec("PULL", True, 64, "experience", "experience_buffer"),
    # The prefetch depth: batches the replay server queues towards each of the learner's sockets.
    ("replay_server", "samples"): SocketSpec("PUSH", True, "prefetch", "samples", "samples_buffer"),
    ("replay_server", "priorities"): SocketSpec("PULL", True, PRIORITIES_HWM, "priorities", "priorities_buffer"),
    ("replay_server", "telemetry"): SocketSpec("PUB", False, 100, "telemetry", "telemetry_buffer"),
    # One per loader thread (at least one); 1: a batch waits in the replay server's queue, not here.
    ("learner", "samples"): SocketSpec("PULL", False, 1, "samples", "samples_buffer"),
    ("learner", "priorities"): SocketSpec("PUSH", False, PRIORITIES_HWM, "priorities", "priorities_buffer"),
    ("learner", "weights"): SocketSpec("PUB", True, 4, "weights", "weights_buffer"),
    ("learner", "telemetry"): SocketSpec("PUB", False, 100, "telemetry", "telemetry_buffer"),
    # Per publisher: 100 reports are 100 s of a role's heartbeats at the default period.
    ("evaluator", "telemetry"): SocketSpec("SUB", True, 100, "telemetry", "telemetry_buffer"),
    ("evaluator", "weights"): SocketSpec("SUB", False, 2, "weights", "weights_buffer"),
    ("actor_learner", "gradients"): SocketSpec("PUSH", False, 2, "gradients", "gradients_buffer"),
    ("actor_learner", "weights"): SocketSpec("SUB", False, 2, "weights", "weights_buffer"),
    ("actor_learner", "telemetry"): SocketSpec("PUB", False, 100, "telemetry", "telemetry_buffer"),
    ("param_server", "gradients"): SocketSpec("PULL", True, 16, "gradients", "gradients_buffer"),
    ("param_server", "weights"): SocketSpec("PUB", True, 4, "weights", "weights_buffer"),
    ("param_server", "telemetry"): SocketSpec("PUB", False, 100, "telemetry", "telemetry_buffer"),
    # Weights messages are large (13.2 MB for the dueling Nature CNN): a few per queue is enough, as only
    # the newest matters and actors drain to the newest anyway. Same as the learner's weights PUB.
    ("relay", "weights"): SocketSpec("XSUB", False, 4, "weights", "weights_buffer"),
    ("relay", "relay_weights"): SocketSpec("XPUB", True, 4, "relay_weights", "weights_buffer"),
    ("relay", "telemetry"): SocketSpec("PUB", False, 100, "telemetry", "telemetry_buffer"),
}


def settings(cfg: Any, role: str) -> str:
    """Program ``role``'s sockets as ``cfg`` sets them, for its log: what the bounds are computed from."""
    parts = [f"{name} {spec.pattern} hwm {spec.hwm_of(cfg)} buffer {getattr(cfg, spec.buffer) or 'OS'}"
             for (r, name), spec in SOCKETS.items() if r == role]
    return "sockets (hwm in messages, kernel buffer in bytes): " + ", ".join(parts)


def lz4_bound(n: int) -> int:
    """The most bytes lz4 makes of ``n`` bytes (LZ4_compressBound)."""
    return n + n // 255 + 16


def _blobs_bound(m: int, obs_bytes: int, stack: int) -> int:
    """Most bytes of the blobs and offsets of ``m`` observations: one blob each, or with the wire's stack
    layout ``stack`` frames each (every one distinct, as at an episode's start)."""
    return m * stack * (lz4_bound(-(-obs_bytes // stack)) + 8) + 8


def wire_stack(cfg: Any, spec: Any) -> int:
    """Blobs per observation on the wire: an Atari stack's frames with ``--frames-once``, else 1."""
    return spec.obs_shape[0] if spec.atari and getattr(cfg, "frames_once", True) else 1


def sample_bytes(batch: int, obs_bytes: int, stack: int = 1) -> tuple[int, int]:
    """(smallest, largest) bytes of a ``sample`` message of ``batch`` items: at most 2 x batch distinct
    observations, each one lz4 block; at least the per-item arrays (every item may be one observation)."""
    per_item = 4 * 5 + 8 + 4  # obs_idx, next_idx, action, ret, disc (4 bytes each), ids (8), weight (4)
    m = 2 * batch
    stacks = 8 * (stack - 1) * batch  # obs_idx and next_idx of S entries each with the stack layout
    largest = HEADER_BYTES + _blobs_bound(m, obs_bytes, stack) + per_item * batch + stacks + 10 * FRAME_BYTES
    return per_item * batch + 8 * 2 + 1, largest


def priorities_bytes(batch: int) -> tuple[int, int]:
    """(smallest, largest) bytes of a ``priorities`` message answering a batch of ``batch`` items
    (ids 8 + priority 4 bytes each; up to every id again in ``remove``)."""
    return 12 * batch, HEADER_BYTES + 20 * batch + 4 * FRAME_BYTES


def experience_bytes(cfg: Any, obs_bytes: int, stack: int = 1) -> int:
    """Largest ``experience`` message: ``chunk_steps`` x K transitions with their (chunk_steps + n)
    x K observations, K the most envs one group steps (at most --envs-per-actor)."""
    n, m = cfg.chunk_steps * cfg.envs_per_actor, (cfg.chunk_steps + cfg.n_step) * cfg.envs_per_actor
    return HEADER_BYTES + _blobs_bound(m, obs_bytes, stack) + (24 + 8 * (stack - 1)) * n + 9 * FRAME_BYTES


@dataclass(frozen=True)
class Link:
    """One socket pair, sender to receiver, over ``pipes`` connections (the learner's loader sockets)."""

    name: str
    sender: tuple[str, str]    # SOCKETS key
    receiver: tuple[str, str]  # SOCKETS key
    snd_hwm: int               # messages
    rcv_hwm: int               # messages
    snd_buf: int               # bytes given to the sender's SO_SNDBUF (0: the OS's autotuning)
    rcv_buf: int               # bytes given to the receiver's SO_RCVBUF (0: the OS's autotuning)
    max_message: int           # bytes on the wire
    min_message: int = 0       # bytes (0: not stated; no bound in messages)
    pipes: int = 1

    @property
    def kernel_bytes(self) -> int | None:
        """Bytes both kernels hold on one connection; None when the OS autotunes a buffer."""
        if not (self.snd_buf and self.rcv_buf):
            return None
        return 2 * self.snd_buf + KERNEL_SEGMENT_BYTES + 2 * self.rcv_buf

    @property
    def bytes_bound(self) -> int | None:
        """Bytes in flight on one connection."""
        k = self.kernel_bytes
        return None if k is None else (self.snd_hwm + self.rcv_hwm + 2) * self.max_message + k + 2 * ZMQ_BATCH_BYTES

    @property
    def messages_bound(self) -> int | None:
        """Messages in flight on one connection."""
        k = self.kernel_bytes
        if k is None or not self.min_message:
            return None
        return self.snd_hwm + self.rcv_hwm + 2 + (k + 2 * ZMQ_BATCH_BYTES) // self.min_message


def _link(cfg: Any, name: str, sender: tuple[str, str], receiver: tuple[str, str], largest: int,
          smallest: int = 0, pipes: int = 1) -> Link:
    s, r = SOCKETS[sender], SOCKETS[receiver]
    return Link(name, sender, receiver, s.hwm_of(cfg), r.hwm_of(cfg), int(getattr(cfg, s.buffer)),
                int(getattr(cfg, r.buffer)), largest, smallest, pipes)


def weights_link(cfg: Any, weights_bytes: int) -> Link:
    """The learner's (or parameter server's) weights PUB to one actor's or evaluator's SUB, for a weights
    message of ``weights_bytes`` on the wire (a relay's XSUB queues 4, not 2). Weights are republished
    every --weights-period; a subscriber takes only the newest it has."""
    if cfg.algo in ASYNC_ALGOS:
        return _link(cfg, "weights", ("param_server", "weights"), ("actor_learner", "weights"), weights_bytes)
    return _link(cfg, "weights", ("learner", "weights"), ("actor", "weights"), weights_bytes)


def model_links(cfg: Any, weights_bytes: int) -> list[Link]:
    """The pairs that carry model-sized messages: weights, and the asynchronous family's gradients."""
    out = [weights_link(cfg, weights_bytes)]
    if cfg.algo in ASYNC_ALGOS:
        out.append(_link(cfg, "gradients", ("actor_learner", "gradients"), ("param_server", "gradients"),
                         weights_bytes + HEADER_BYTES))
    return out


def wire_bytes(frames: list[Any]) -> int:
    """Wire bytes of an encoded message."""
    return sum(len(memoryview(f).cast("B")) + FRAME_BYTES for f in frames)


def links(cfg: Any, obs_bytes: int, weights_bytes: int | None = None, stack: int = 1) -> dict[str, Link]:
    """Every socket pair of a run (``cfg`` has every role's settings, as ./run.sh's), given the raw bytes
    of one observation and the wire bytes of the learner's weights message (None: leave out the pairs
    that carry model-sized messages, which the learner logs once it has its network); ``stack``: blobs
    per observation on the wire (``wire_stack``)."""
    telemetry = MAX_HEADER_BYTES + FRAME_BYTES
    out: dict[str, Link] = {}
    if cfg.algo in ASYNC_ALGOS:  # no replay: gradients in (model-sized, with the weights below)
        sender = ("actor_learner", "telemetry")
    else:
        small_s, large_s = sample_bytes(cfg.batch_size, obs_bytes, stack)
        small_p, large_p = priorities_bytes(cfg.batch_size)
        out["experience"] = _link(cfg, "experience", ("actor", "experience"), ("replay_server", "experience"),
                                  experience_bytes(cfg, obs_bytes, stack))
        out["samples"] = _link(cfg, "samples", ("replay_server", "samples"), ("learner", "samples"), large_s,
                               small_s, pipes=max(1, cfg.loader_threads))
        out["priorities"] = _link(cfg, "priorities", ("learner", "priorities"), ("replay_server", "priorities"),
                                  large_p, small_p)
        sender = ("actor", "telemetry")
    if weights_bytes is not None:
        # A gradient has a few header bytes more than the weights at most (the online arrays of them).
        out.update((ln.name, ln) for ln in model_links(cfg, weights_bytes))
    out["telemetry"] = _link(cfg, "telemetry", sender, ("evaluator", "telemetry"), telemetry)
    return out


def learner_holds(cfg: Any) -> int:
    """Batches the learner holds between receiving one and sending its priorities: the one it trains on
    (or waits to send the priorities of), and with loader threads one decoding in each and the queue."""
    return 1 + (cfg.loader_threads + LOADER_QUEUE if cfg.loader_threads else 0)


def priority_lag_bound(cfg: Any, plan: dict[str, Link]) -> int | None:
    """Most batches the replay server has sampled whose priorities it has not applied yet: the one it
    waits to send, those in flight on every samples connection, those the learner holds and the
    updates in flight back (one per batch). None when a kernel buffer is left to the OS."""
    if "samples" not in plan:  # the asynchronous family has no replay
        return None
    s, p = plan["samples"].messages_bound, plan["priorities"].messages_bound
    if s is None or p is None:
        return None
    return 1 + plan["samples"].pipes * s + learner_holds(cfg) + p


def _size(n: int | None) -> str:
    if n is None:
        return "OS"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def describe_link(ln: Link) -> str:
    """One socket pair's settings and bounds, in one line."""
    msgs = ln.messages_bound
    per = f" per connection (x{ln.pipes})" if ln.pipes > 1 else ""
    bound = _size(ln.bytes_bound) if ln.bytes_bound is not None else "unbounded (the OS's buffers)"
    return (f"{ln.name}: hwm {ln.snd_hwm}+{ln.rcv_hwm} messages, kernel buffers {_size(ln.snd_buf or None)}/"
            f"{_size(ln.rcv_buf or None)} given, messages up to {_size(ln.max_message)}: in flight <= {bound}"
            + (f", <= {msgs} messages" if msgs is not None else "") + per)


def describe(cfg: Any, plan: dict[str, Link]) -> list[str]:
    """One line per socket pair and one for the priorities' lag, for the start of a run's log."""
    out = [describe_link(ln) for ln in plan.values()]
    if "samples" in plan:
        lag = priority_lag_bound(cfg, plan)
        out.append("priorities lag <= " + (f"{lag} batches (sampled by the replay server, not yet updated)"
                                            if lag is not None else "unbounded (the OS's buffers)"))
    return out


def table(cfg: Any, plan: dict[str, Link]) -> str:
    """The bounds as a Markdown table (PROTOCOL.md 2.4)."""
    rows = ["| socket pair | SNDHWM + RCVHWM (messages) | SO_SNDBUF / SO_RCVBUF given (bytes) | kernel holds "
            "(bytes) | largest message (bytes) | in flight (bytes) | in flight (messages) |",
            "|---|---|---|---|---|---|---|"]
    for ln in plan.values():
        mult = f" x{ln.pipes} connections" if ln.pipes > 1 else ""
        rows.append(f"| `{ln.name}` {ln.sender[0]} → {ln.receiver[0]} | {ln.snd_hwm} + {ln.rcv_hwm} | "
                    f"{ln.snd_buf} / {ln.rcv_buf} | {ln.kernel_bytes} | {ln.max_message} | "
                    f"{ln.bytes_bound}{mult} | {ln.messages_bound if ln.messages_bound is not None else '–'}{mult} |")
    lag = priority_lag_bound(cfg, plan)
    return "\n".join(rows) + (f"\n\nPriorities lag: at most **{lag} batches**." if lag is not None else "")


def for_run(cfg: Any) -> dict[str, Link]:
    """``links`` for a run's config: the env's observation size and the weights message of its network
    (builds the network once: imports torch)."""
    from . import config as C
    from .envs import env_spec
    from .models import build_network
    from .networks import state_arrays
    from .wire import Weights, encode

    spec = env_spec(cfg.env)
    net = build_network(spec, cfg.hidden, cfg.algo, **C.net_options(cfg))
    names, arrays = state_arrays(net)
    weights = wire_bytes(encode(Weights(sender="learner", seq=2**62, version=2**62, names=names,
                                                   arrays=arrays, incarnation=2**52)))
    return links(cfg, obs_bytes(spec), weights, wire_stack(cfg, spec))


def obs_bytes(spec: Any) -> int:
    """Raw bytes of one observation of an ``envs.EnvSpec``."""
    n = 1
    for d in spec.obs_shape:
        n *= int(d)
    return n * (1 if spec.obs_dtype == "uint8" else 4)


def main(argv: list[str] | None = None) -> int:
    """``apex-zmq bounds [run flags]``: print what may be in flight between the roles of that run."""
    from . import config as C
    cfg = C.parse(C.LaunchConfig, argv, "run", prog="apex-zmq bounds")
    plan = for_run(cfg)
    print("\n".join(describe(cfg, plan)))
    print()
    print(table(cfg, plan))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
