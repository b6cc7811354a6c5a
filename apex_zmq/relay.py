"""The weights relay: one per actor host, so that the learner sends each weights message once per
host instead of once per actor.

The relay connects an XSUB to the learner's weights PUB (``--weights``, like an actor) and binds an
XPUB on a local endpoint (``--relay-weights``) that the host's actors and evaluator give as their
``--weights``. Every message from the learner is validated (``wire.decode_weights``) before it is
cached and forwarded; a malformed one is dropped and counted. The newest valid message is kept, and
a subscriber that joins later gets it within milliseconds instead of waiting for the learner's next
republish (``--weights-period``).

Sockets come from the project's factory, so ``--keys`` makes both sides CURVE (the relay is a CURVE
client of the learner and a CURVE server to its actors, so its host needs the server key pair and
``authorized/`` too), and binding a non-loopback ``--relay-weights`` needs keys or ``--insecure``.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from dataclasses import dataclass, field

import zmq

from . import config as C
from .transport import Sockets, install_stop, run_role
from .wire import Telemetry, WireError, decode_weights, encode

# Subscriptions arriving within this window are answered with one resend of the cached weights: an
# XPUB cannot address one subscriber, so every resend reaches all local subscribers (who ignore a
# version they already have); coalescing keeps a burst of actor starts from multiplying that.
RESEND_COALESCE_S = 0.02
SUBSCRIBE = b"\x01"  # first byte of an XPUB subscription message (0 is an unsubscription)


@dataclass
class RelayState:
    """What the relay has forwarded and cached, and its counters (reported as ``relay/*``)."""

    latest: list[zmq.Frame] | None = None  # newest valid weights message, resent to new subscribers
    version: int = -1
    forwarded: int = 0
    forwarded_bytes: int = 0
    rejected: int = 0
    subscriptions: int = 0  # subscription messages from local subscribers (joins and reconnects)
    resent: int = 0
    unserved: bool = False  # a subscription arrived after the last send of the cached weights
    want_resend: asyncio.Event = field(default_factory=asyncio.Event)

    def accept(self, frames: list[zmq.Frame]) -> bool:
        """Validate an upstream message; cache it if valid, count it if not."""
        try:
            w = decode_weights(frames)
        except WireError:
            self.rejected += 1
            return False
        self.latest, self.version = frames, w.version
        self.forwarded += 1
        self.forwarded_bytes += sum(f.buffer.nbytes for f in frames)
        # Every subscription read so far was already in the XPUB's table, so this send reaches it.
        self.unserved = False
        return True

    def subscribed(self) -> None:
        """A local subscriber joined (or reconnected): it needs the cached weights."""
        self.subscriptions += 1
        self.unserved = True
        self.want_resend.set()

    def metrics(self) -> dict[str, float]:
        """Telemetry counters."""
        return {"relay/forwarded": self.forwarded, "relay/forwarded_bytes": self.forwarded_bytes,
                "relay/rejected": self.rejected, "relay/subscriptions": self.subscriptions,
                "relay/resent": self.resent, "relay/weights_version": self.version}


async def main_async(cfg: C.RelayConfig) -> None:
    """Relay weights from the learner to this host's subscribers until stopped."""
    socks = Sockets(cfg.insecure, cfg.keys)
    try:
        down = socks.open(cfg, "relay", "relay_weights")
        # Pass every subscription up, not only a topic's first, so that each joiner is seen. (Set
        # after bind: one missed before that finds nothing cached yet, since upstream is not open.)
        down.setsockopt(zmq.XPUB_VERBOSE, 1)
        up = socks.open(cfg, "relay", "weights")
        tel = socks.open(cfg, "relay", "telemetry")
        # One subscription to everything of the relay's own, not the local subscribers' forwarded:
        # the cache stays fresh while no actor is connected, and local peers cannot steer upstream.
        await up.send(SUBSCRIBE)
        stop = asyncio.Event()
        install_stop(stop)
        state = RelayState()
        name = f"relay-{socket.gethostname()}"[:64]

        async def forward() -> None:
            while True:
                frames = await up.recv_multipart(copy=False)
                if state.accept(frames):
                    # XPUB never blocks: a subscriber at its HWM misses this one and gets the next.
                    await down.send_multipart(frames, copy=False)

        async def subscriptions() -> None:
            while True:
                msg = await down.recv()
                if msg[:1] == SUBSCRIBE:
                    state.subscribed()

        async def resend() -> None:
            while True:
                await state.want_resend.wait()
                await asyncio.sleep(RESEND_COALESCE_S)
                state.want_resend.clear()
                if state.unserved and state.latest is not None:
                    state.unserved = False
                    state.resent += 1
                    await down.send_multipart(state.latest, copy=False)

        async def report() -> None:
            seq = 0
            while True:
                await asyncio.sleep(cfg.telemetry_period)
                seq += 1
                await tel.send_multipart(encode(Telemetry(sender=name, seq=seq, role="relay",
                                                          time=time.time(), metrics=state.metrics())))

        print(f"relay: {cfg.weights} -> {cfg.relay_weights}", flush=True)
        await run_role(stop, [forward(), subscriptions(), resend(), report()])
        print(f"relay: stopped after forwarding {state.forwarded} weights messages "
              f"({state.rejected} rejected, {state.resent} resent)", flush=True)
    finally:
        socks.close()


def main(argv: list[str] | None = None) -> None:
    """``apex-zmq relay``: run one host's weights relay."""
    cfg = C.parse(C.RelayConfig, argv, "relay")
    C.save(cfg, cfg.run_dir, "config_relay")
    asyncio.run(main_async(cfg))


if __name__ == "__main__":
    main(sys.argv[1:])
