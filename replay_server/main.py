"""The replay server program: ingest experience, stream prioritized batches, apply priority updates."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from apex_zmq import config as C
from apex_zmq import flow
from apex_zmq.envs import env_spec
from apex_zmq.transport import Sockets, install_stop, run_role
from apex_zmq.wire import (
    Telemetry,
    WireError,
    decode_experience,
    decode_priorities,
    encode,
    new_incarnation,
    stack_of,
)

from .ledger import SenderLedger
from .replay import PrioritizedReplay, SampleToInsertRatio, annealed_beta

# Yield to the other tasks after this many back-to-back messages on one socket, so a flood of
# experience cannot starve sampling (an awaited zmq future that is already done does not yield).
_FAIRNESS = 8
# Slots a snapshot copies between two turns of the event loop: ~50 bytes a slot, so about 3 MiB and a
# millisecond or two per slice, less than sampling a batch; 2M slots take 31 turns.
_SNAPSHOT_SLICE = 1 << 16


class ReplayService:
    """The replay server's logic without sockets: validate, store, sample, update, count."""

    def __init__(self, cfg: C.ReplayConfig) -> None:
        self.cfg = cfg
        spec = env_spec(cfg.env)
        self.spec = spec
        # Sharded (--replay-shards > 1): batches name this shard and carry its priority mass, which the
        # learner draws shards by; telemetry tags are replay/<shard>/*. One shard: as before shards.
        self.sharded = cfg.replay_shards > 1
        name = f"snapshot-{cfg.shard}.npz" if cfg.shard else "snapshot.npz"
        self.snapshot_path = Path(cfg.run_dir) / "replay" / name
        seed = cfg.seed + 7919 * cfg.shard  # shards sample independently
        if cfg.snapshot_period > 0 and self.snapshot_path.exists():
            try:
                self.replay = PrioritizedReplay.load_snapshot(self.snapshot_path, cfg.capacity, cfg.alpha,
                                                              seed=seed)
            except ValueError as e:
                raise SystemExit(f"replay_server: {e}") from None
            print(f"replay_server: restored {self.replay.size} transitions from {self.snapshot_path}",
                  flush=True)
        else:
            self.replay = PrioritizedReplay(cfg.capacity, cfg.alpha, seed=seed)
        self.limiter = SampleToInsertRatio(cfg.samples_per_insert, cfg.spi_tolerance or 4 * cfg.batch_size,
                                           cfg.min_size)
        self.limiter.on_insert(self.replay.size)  # a restored replay is already filled
        self.counts = {"inserted": 0, "sampled": 0, "updated": 0, "rejected_experience": 0,
                       "rejected_priorities": 0, "stale_incarnation": 0}
        self.batches = 0
        # Priority updates of this incarnation's batches applied (one per batch the learner trained on):
        # batches - answered is how far priorities lag (flow.priority_lag_bound). A learner that restarts
        # takes its unanswered batches with it, and they stay counted.
        self.answered = 0
        self.lag_max = 0
        self.chunks_stored = 0
        self.ledger = SenderLedger()  # per sender: which chunks were stored (a soak accounts for every lost one)
        # Ids restart (or, from a snapshot, rewind) when this process restarts: updates for the ids of
        # an earlier incarnation would land on other items, so they carry this id and are checked.
        self.incarnation = new_incarnation()

    def on_experience(self, frames: list) -> bool:
        """Store a chunk; a malformed one or one for another env is dropped and counted."""
        try:
            chunk = decode_experience(frames)
            if (tuple(chunk.obs_shape), chunk.obs_dtype) != (self.spec.obs_shape, self.spec.obs_dtype):
                raise WireError(f"observations {chunk.obs_dtype}{list(chunk.obs_shape)}, this replay "
                                f"holds {self.spec.obs_dtype}{list(self.spec.obs_shape)} ({self.spec.env_id})")
            if len(chunk.action) and int(chunk.action.max()) >= self.spec.num_actions:
                raise WireError(f"action outside [0, {self.spec.num_actions})")
            if self.replay.obs_shape is not None and stack_of(chunk.obs_idx) != self.replay.stack:
                # One layout per replay (the first chunk's): an actor with the other --frames-once.
                raise WireError(f"observations as stacks of {stack_of(chunk.obs_idx)} blobs, this replay "
                                f"holds stacks of {self.replay.stack}")
        except WireError:
            self.counts["rejected_experience"] += 1
            return False
        n = len(self.replay.add(chunk))
        self.counts["inserted"] += n
        self.chunks_stored += 1
        self.ledger.on_chunk(chunk.sender, chunk.seq, n, chunk.incarnation)
        self.limiter.on_insert(n)
        return True

    def on_priorities(self, frames: list) -> bool:
        """Apply a priority update; malformed ones are dropped and counted, stale and removed ids
        ignored (and counted by the replay)."""
        try:
            upd = decode_priorities(frames)
        except WireError:
            self.counts["rejected_priorities"] += 1
            return False
        if upd.incarnation != self.incarnation:  # sampled before this server (re)started
            self.counts["stale_incarnation"] += len(upd.ids) + len(upd.remove)
            self.replay.stale_updates += len(upd.ids) + len(upd.remove)
            return True
        self.counts["updated"] += self.replay.update(upd.ids, upd.priority)
        self.replay.remove(upd.remove)
        self.answered += 1
        return True

    @property
    def priority_lag(self) -> int:
        """Batches sampled whose priority update has not been applied."""
        return self.batches - self.answered

    @property
    def ready(self) -> bool:
        """Enough transitions stored to sample, and sampling a batch keeps to --samples-per-insert."""
        return (self.replay.size >= self.cfg.min_size and self.replay.sampleable
                and self.limiter.can_sample(self.cfg.batch_size))

    @property
    def takes_experience(self) -> bool:
        """False while inserts run ahead of --samples-per-insert and --spi-block-inserts holds them."""
        # (A replay with nothing to sample always takes experience: sampling could never catch up.)
        return not self.cfg.spi_block_inserts or self.limiter.can_insert() or not self.replay.sampleable

    def sample_frames(self) -> list:
        """Encode the next prioritized batch."""
        beta = annealed_beta(self.cfg.beta, self.batches, self.cfg.beta_anneal)
        self.batches += 1
        self.lag_max = max(self.lag_max, self.priority_lag)
        batch = self.replay.sample(self.cfg.batch_size, beta, seq=self.batches)
        batch.incarnation = self.incarnation
        if self.sharded:
            batch.shard, batch.mass = self.cfg.shard, float(self.replay.tree.total)
        self.counts["sampled"] += len(batch.ids)
        self.limiter.on_sample(len(batch.ids))
        return encode(batch)

    async def snapshot(self, slice_slots: int = _SNAPSHOT_SLICE) -> None:
        """Write the replay as it is now to ``snapshot_path`` without stalling the event loop.

        The copy is taken ``slice_slots`` slots per loop turn (copy-on-write keeps it the replay of
        the instant it began while inserts and updates go on in between, see ``ReplaySnapshot``);
        writing runs in a thread.
        """
        snap = self.replay.begin_snapshot()
        try:
            while not snap.copy(slice_slots):
                await asyncio.sleep(0)  # let sampling, inserts and updates run
        finally:
            snap.cancel()  # stopped mid-copy: the replay stops feeding it
        await asyncio.to_thread(lambda: self.replay.write_snapshot(snap.state(), self.snapshot_path))


async def main_async(cfg: C.ReplayConfig) -> None:
    """Bind the replay server's sockets and serve until stopped."""
    cfg = C.for_shard(cfg, cfg.shard)  # shard i binds its own endpoints (shard 0: the configured ones)
    svc = ReplayService(cfg)
    print(f"replay_server: {flow.settings(cfg, 'replay_server')}", flush=True)
    socks = Sockets(cfg.insecure, cfg.keys)
    exp, samples, prios, tel = (socks.open(cfg, "replay_server", n)
                                for n in ("experience", "samples", "priorities", "telemetry"))
    stop = asyncio.Event()
    install_stop(stop)
    inserted = asyncio.Event()  # set after each chunk: sampling may be able to go on
    sampled = asyncio.Event()   # set after each batch: held inserts may be able to go on

    async def ingest() -> None:
        while True:
            for _ in range(_FAIRNESS):
                while not svc.takes_experience:  # the rate limiter holds inserts
                    sampled.clear()
                    await sampled.wait()
                svc.on_experience(await exp.recv_multipart(copy=False))
                inserted.set()
            await asyncio.sleep(0)

    async def updates() -> None:
        while True:
            for _ in range(_FAIRNESS):
                svc.on_priorities(await prios.recv_multipart(copy=False))
            await asyncio.sleep(0)

    async def serve() -> None:
        while True:
            while not svc.ready:  # not enough yet, every item removed, or the rate limiter holds it
                inserted.clear()
                await inserted.wait()
            # send waits while `prefetch` batches are already queued: that is the prefetch bound.
            await samples.send_multipart(svc.sample_frames(), copy=False)
            sampled.set()
            await asyncio.sleep(0)

    sender = f"replay-{cfg.shard}" if svc.sharded else "replay"

    def tags(metrics: dict[str, float]) -> dict[str, float]:
        # Sharded: replay/<shard>/*, which the evaluator sums into the replay/* totals.
        if not svc.sharded:
            return metrics
        return {f"replay/{cfg.shard}/{k[len('replay/'):]}": v for k, v in metrics.items()}

    async def report() -> None:
        last, prev = time.monotonic(), dict(svc.counts)
        while True:
            await asyncio.sleep(cfg.telemetry_period)
            now = time.monotonic()
            rates = {f"replay/{k}_per_s": (svc.counts[k] - prev[k]) / (now - last)
                     for k in ("inserted", "sampled", "updated")}
            last, prev = now, dict(svc.counts)
            await tel.send_multipart(encode(Telemetry(
                sender=sender, seq=svc.batches, role="replay", time=time.time(),
                metrics=tags({**rates, "replay/size": svc.replay.size, "replay/capacity": cfg.capacity,
                         "replay/fill": svc.replay.size / cfg.capacity,
                         "replay/stored_mb": svc.replay.stored_bytes / 2**20,
                         "replay/rejected": svc.counts["rejected_experience"] + svc.counts["rejected_priorities"],
                         "replay/rejected_experience": svc.counts["rejected_experience"],
                         "replay/rejected_priorities": svc.counts["rejected_priorities"],
                         "replay/inserted": svc.counts["inserted"], "replay/updated": svc.counts["updated"],
                         "replay/sampled": svc.counts["sampled"],
                         "replay/stale_updates": svc.replay.stale_updates,
                         "replay/stale_incarnation": svc.counts["stale_incarnation"],
                         "replay/removed": svc.replay.removed,
                         "replay/removed_updates": svc.replay.removed_updates,
                         "replay/samples_per_insert": svc.limiter.ratio,
                         "replay/samples_per_insert_target": cfg.samples_per_insert,
                         "replay/batches": svc.batches, "replay/priority_lag": svc.priority_lag,
                         "replay/priority_lag_max": svc.lag_max,
                         # which process these counters are of (a 48-bit id: exact as a float)
                         "replay/incarnation": svc.incarnation, "replay/chunks_stored": svc.chunks_stored,
                         **svc.ledger.metrics()}))))

    async def snapshots() -> None:
        while True:
            await asyncio.sleep(cfg.snapshot_period)
            await svc.snapshot()

    tasks = [ingest(), updates(), serve(), report()] + ([snapshots()] if cfg.snapshot_period > 0 else [])
    try:
        await run_role(stop, tasks)
    finally:
        socks.close()


def main(argv: list[str] | None = None) -> None:
    """``apex-zmq replay_server``: run the replay server."""
    cfg = C.parse(C.ReplayConfig, argv, "replay_server")
    C.save(cfg, cfg.run_dir, f"config_replay_server-{cfg.shard}" if cfg.shard else "config_replay_server")
    asyncio.run(main_async(cfg))


if __name__ == "__main__":
    main(sys.argv[1:])
