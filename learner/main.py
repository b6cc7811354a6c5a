"""The learner program: prefetching loader threads, training steps of the ``--algo`` rule, priorities and
weights out."""

from __future__ import annotations

import asyncio
import functools
import math
import queue
import sys
import time
from typing import Callable, NoReturn

import numpy as np
import torch
import zmq

from apex_zmq import checkpoint, flow, optim
from apex_zmq import config as C
from apex_zmq.envs import env_spec
from apex_zmq.networks import state_arrays
from apex_zmq.transport import Sockets, get_until, install_stop, put_until, recv_until, run_role, send_until
from apex_zmq.wire import PriorityUpdate, Telemetry, Weights, WireError, decode_sample, encode, new_incarnation

from .algos import make_rule
from .dqn import Batch, batch_from_sample
from .readback import PendingUpdates, Update, copier_for
from .shards import draw_shard, route

# Sharded replay: how long a priority update waits for its shard's queue (seconds) before it is dropped
# and counted. A shard that is down takes nothing (its updates would be stale for the restarted one,
# which has a new incarnation), and the trainer must not stall on it while the other shards serve.
SHARD_SEND_WAIT_S = 1.0

# Priority updates the training thread may leave in flight on a GPU: it runs at most this many steps ahead
# of the device (a small bound: each pending step holds its batch's device memory until it has run).
MAX_PENDING = 4


def pick_device(name: str) -> torch.device:
    """``auto`` means CUDA when there is one."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


class LearnerCore:
    """Training state without sockets: learner, resume, checkpoints, weight snapshots, timings."""

    def __init__(self, cfg: C.LearnerConfig) -> None:
        self.cfg = cfg
        self.spec = env_spec(cfg.env)
        self.device = pick_device(cfg.device)
        self.amp = cfg.amp == "on" or (cfg.amp == "auto" and self.device.type == "cuda")
        # channels-last lets cuDNN pick its fastest (tensor-core) convolutions under mixed precision.
        self.channels_last = self.amp and self.spec.atari
        if cfg.compile and self.device.type != "cuda":  # --device auto on a machine without CUDA
            self._refuse(f"--compile captures the step in CUDA graphs; this learner trains on {self.device} "
                         f"(no CUDA device): drop --compile")
        self.learner = make_rule(self.spec, cfg, self.device, self.amp, self.channels_last)
        self.ckpt_path = checkpoint.last_path(cfg.run_dir)
        self.resumed_from = -1
        if self.ckpt_path.exists():
            self._resume(checkpoint.load(self.ckpt_path))
        self.incarnation = new_incarnation()  # actors take a restarted learner's weights at once
        self.bad_items = 0  # sampled items whose observations did not decompress (removed from replay)
        self.loss = float("nan")
        self.wait_s = 0.0   # time the training loop waited for a batch (after the first)
        self.train_s = 0.0  # time spent in training steps

    def _resume(self, state: dict) -> None:
        """Load ``state`` (``last.pt``) into the rule, or stop with ``CONFIG_ERROR_EXIT`` saying what differs
        and the way out: a checkpoint this run cannot load fails the same way on every restart."""
        cfg = self.cfg
        # None: a checkpoint that does not say (those from before --algo are double DQN's)
        written = (state.get("env"), state.get("hidden"), state.get("algo", "dqn"))
        fits = all(w in (None, own) for w, own in zip(written, (cfg.env, cfg.hidden, cfg.algo)))
        detail = ""
        saved_opts, opts = state.get("net_options"), C.net_options(cfg)
        if fits and saved_opts is not None and saved_opts != opts:  # e.g. another C51 support
            differ = sorted(k for k in set(saved_opts) | set(opts) if saved_opts.get(k) != opts.get(k))
            fits, detail = False, " (network options differ: " + ", ".join(
                f"{k} {saved_opts.get(k)} in the checkpoint, {opts.get(k)} now" for k in differ) + ")"
        if fits and isinstance(state.get("net"), dict):  # shapes or dtypes differ all the same
            problem = checkpoint.tensor_mismatch(state["net"], self.learner.net.state_dict())
            fits, detail = problem is None, f" ({problem})" if problem else ""
        if not fits:
            self._refuse(f"{self.ckpt_path} was written for --algo {written[2]} --env {written[0] or '?'} "
                         f"--hidden {written[1] or '?'}; this run has --algo {cfg.algo} --env {cfg.env} "
                         f"--hidden {cfg.hidden}: use another --run-dir or the same flags{detail}")
        own_opt = getattr(getattr(self.learner, "opt", None), "kind", None)
        saved_opt = optim.kind_of(state["opt"]) if isinstance(state.get("opt"), dict) else None
        if own_opt and saved_opt and saved_opt != own_opt:
            self._refuse(f"{self.ckpt_path} was written with --optimizer {saved_opt}; this run has --optimizer "
                         f"{own_opt}: start a new run directory (another --run-dir) or pass --optimizer {saved_opt}")
        try:
            self.learner.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            # torch names shapes in a header, then one line per tensor; ours say it in one line
            lines = str(e).strip().splitlines() or [repr(e)]
            self._refuse(f"{self.ckpt_path} cannot be loaded by this run (--algo {cfg.algo} --optimizer "
                         f"{cfg.optimizer}): {type(e).__name__}: {lines[min(1, len(lines) - 1)].strip()}; start a "
                         f"new run directory (another --run-dir) or resume with the flags it was written with")
        self.resumed_from = self.learner.steps

    def _refuse(self, message: str) -> NoReturn:
        print(f"learner: {message}", file=sys.stderr, flush=True)
        raise SystemExit(C.CONFIG_ERROR_EXIT)

    def weights(self, seq: int) -> list:
        """The current network as an encoded weights message."""
        names, arrays = state_arrays(self.learner.net)
        return encode(Weights(sender="learner", seq=seq, version=self.learner.steps, names=names,
                              arrays=arrays, incarnation=self.incarnation))

    def pending_updates(self) -> PendingUpdates:
        """The FIFO of priority updates for this device: on a GPU up to ``MAX_PENDING`` in flight and the
        loss read every ``--loss-every`` steps; on the CPU each update leaves after its step, with its loss."""
        cuda = self.device.type == "cuda"
        return PendingUpdates(copier_for(self.device, MAX_PENDING + 1), MAX_PENDING,
                              self.cfg.loss_every if cuda else 1)

    def save(self) -> None:
        """Write ``last.pt`` atomically."""
        state = self.learner.state_dict()
        state["env"] = self.cfg.env
        state["hidden"] = self.cfg.hidden
        state["algo"] = self.cfg.algo
        state["env_module"] = self.cfg.env_module  # what play imports to make a custom env
        state["net_options"] = C.net_options(self.cfg)  # what play builds the network with
        checkpoint.save_atomic(state, self.ckpt_path)


def train(core: LearnerCore, next_batch: Callable[[], Batch | None], send: Callable[[list], object],
          publish: Callable[[list], None], stopped: Callable[[], bool],
          pending: PendingUpdates | None = None,
          send_to: Callable[[int, list], object] | None = None) -> None:
    """The training thread's loop: a batch from ``next_batch`` (None: stop), one step of the rule, its
    priority update to ``send`` (encoded frames; in training order, each batch's once, through
    ``pending``: on a GPU once its copy to the host has finished; with ``send_to``, sharded replay,
    ``send_to(shard, frames)`` to the shard the batch came from instead), weights (encoded) to ``publish``
    and a checkpoint on their periods; until ``stopped()`` or ``--max-learner-steps``. The updates
    still pending are sent and a checkpoint written at the end."""
    cfg, learner = core.cfg, core.learner
    pending = pending if pending is not None else core.pending_updates()

    def out(updates: list[Update]) -> None:
        for u in updates:
            if u.loss is not None:
                core.loss = u.loss
            # no hop to the event loop: ZeroMQ's own I/O thread sends it
            frames = encode(PriorityUpdate(sender="learner", seq=u.seq, ids=u.ids, priority=u.priority,
                                           incarnation=u.incarnation, remove=u.remove))
            if send_to is None:
                send(frames)
            else:  # sharded replay: back to the shard that sampled the items
                send_to(route(u.shard, cfg.replay_shards), frames)

    last_weights = last_ckpt = time.monotonic()
    while not stopped() and (cfg.max_learner_steps == 0 or learner.steps < cfg.max_learner_steps):
        t0 = time.perf_counter()
        b = next_batch()
        if b is None:
            break
        t1 = time.perf_counter()
        if learner.steps > max(core.resumed_from, 0):  # waiting for the very first batch is start-up
            core.wait_s += t1 - t0
        result = learner.step_tensors(b) if len(b.ids) else None
        updates = pending.push(b, learner.steps, result)  # may wait for the oldest update's copy
        core.train_s += time.perf_counter() - t1
        core.bad_items += len(b.bad_ids)
        out(updates)
        now = time.monotonic()
        if now - last_weights >= cfg.weights_period:
            publish(core.weights(learner.steps))
            last_weights = now
        if now - last_ckpt >= cfg.checkpoint_period:
            core.save()
            last_ckpt = now
    out(pending.drain())
    core.save()


async def main_async(cfg: C.LearnerConfig) -> None:
    """Wire the learner core to its sockets and train until stopped."""
    torch.set_num_threads(cfg.torch_threads)
    core = LearnerCore(cfg)
    if core.resumed_from >= 0:
        print(f"learner: resumed from {core.ckpt_path} at step {core.resumed_from}", flush=True)
    # The one bound ./run.sh cannot state without building the network: model-sized messages in flight.
    w = flow.wire_bytes(core.weights(0))
    for ln in flow.model_links(cfg, w):
        print(f"learner: in flight, at most: {flow.describe_link(ln)}", flush=True)
    if C.is_async(cfg):  # the parameter server of the asynchronous family: no replay, gradients in
        from .param_server import serve
        await serve(cfg, core)
        return
    print(f"learner: {flow.settings(cfg, 'learner')} (samples: one per loader thread)", flush=True)
    socks = Sockets(cfg.insecure, cfg.keys)
    # Each loader thread owns a PULL socket (the replay deals batches to them in turn): a batch goes
    # from ZeroMQ to the thread that decodes it with no hop through the event loop.
    # --loader-threads 0: the trainer thread receives and decodes each batch itself (a small network on
    # few cores: a loader thread beside it costs the step more in GIL hand-offs than decoding does).
    # Sharded replay: every loader owns one PULL socket per shard (the draw picks which to read from) and
    # the trainer one priorities PUSH per shard. One shard: shard_cfgs is [cfg], the sockets are as before.
    shards = cfg.replay_shards
    shard_cfgs = [C.for_shard(cfg, i) for i in range(shards)]
    samples = [[socks.open(c, "learner", "samples", sync=True) for c in shard_cfgs]
               for _ in range(max(1, cfg.loader_threads))]
    prios = [socks.open(c, "learner", "priorities", sync=True) for c in shard_cfgs]  # owned by the trainer
    weights = socks.open(cfg, "learner", "weights")
    tel = socks.open(cfg, "learner", "telemetry")
    stop = asyncio.Event()
    install_stop(stop)
    batch_q: queue.Queue = queue.Queue(maxsize=flow.LOADER_QUEUE)
    counts = {"rejected": 0, "priorities_dropped": 0, **{f"from_shard_{i}": 0 for i in range(shards)}}
    send_wait = [SHARD_SEND_WAIT_S] * shards  # seconds an update to each shard may wait (0: the shard is down)
    masses: list[float | None] = [None] * shards  # each shard's priority mass as its last batch said
    rngs = [np.random.default_rng([cfg.seed, i]) for i in range(len(samples))]
    latest = {"frames": core.weights(0)}

    def next_frames(socks_: list, rng: np.random.Generator) -> list | None:
        """The next sample message: from the one socket, or (sharded) from the shard drawn among those
        with a batch waiting (learner/shards.py), else the first to arrive; None on stop."""
        if len(socks_) == 1:
            return recv_until(socks_[0], stop)
        poller = zmq.Poller()
        for sk in socks_:
            poller.register(sk, zmq.POLLIN)
        while not stop.is_set():
            ready = dict(poller.poll(0)) or dict(poller.poll(250))
            i = draw_shard(masses, [sk in ready for sk in socks_], rng)
            if i is not None:
                return socks_[i].recv_multipart(copy=False)
        return None

    def receive(socks_: list, rng: np.random.Generator) -> Batch | None:
        """The next good batch (malformed ones are counted and dropped); None on stop."""
        while (frames := next_frames(socks_, rng)) is not None:
            try:
                s = decode_sample(frames)
                if s.shard >= shards:
                    raise WireError(f"shard {s.shard} outside [0, {shards})")
                if shards > 1:
                    masses[s.shard] = s.mass
                    counts[f"from_shard_{s.shard}"] += 1
                return batch_from_sample(s, core.spec.num_actions, core.device,
                                         pin=core.device.type == "cuda", channels_last=core.channels_last,
                                         obs_spec=(core.spec.obs_shape, core.spec.obs_dtype))
            except WireError:
                counts["rejected"] += 1
        return None

    def send_shard(shard: int, frames: list) -> bool:
        """A priority update to its shard, waiting up to SHARD_SEND_WAIT_S; dropped and counted after."""
        sock = prios[shard]
        deadline = time.monotonic() + send_wait[shard]
        while not stop.is_set():
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                send_wait[shard] = SHARD_SEND_WAIT_S
                return True
            except zmq.Again:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                sock.poll(int(min(250, left * 1000)) + 1, zmq.POLLOUT)
        counts["priorities_dropped"] += 1
        send_wait[shard] = 0.0  # down: its next updates are dropped at once until one goes through
        return False

    def loader(socks_: list, rng: np.random.Generator) -> None:
        # Decode and decompress ahead of the training step; lz4 and torch release the GIL. Loaders
        # index and copy small tensors: one torch thread each, the trainer has the role's budget.
        torch.set_num_threads(1)
        while (b := receive(socks_, rng)) is not None:
            put_until(batch_q, b, stop)

    next_batch = ((lambda: get_until(batch_q, stop)) if cfg.loader_threads
                  else (lambda: receive(samples[0], rngs[0])))

    def trainer() -> None:
        train(core, next_batch, lambda msg: send_until(prios[0], msg, stop),
              lambda frames: latest.__setitem__("frames", frames), stop.is_set,
              send_to=send_shard if shards > 1 else None)

    async def publish() -> None:
        # Republished every period, so an actor that joins late gets weights within one period.
        while True:
            await weights.send_multipart(latest["frames"], copy=False)
            await asyncio.sleep(cfg.weights_period)

    async def report() -> None:
        last, last_steps, last_wait, last_train = time.monotonic(), core.learner.steps, 0.0, 0.0
        while True:
            await asyncio.sleep(cfg.telemetry_period)
            now = time.monotonic()
            steps = core.learner.steps
            busy = (core.wait_s - last_wait) + (core.train_s - last_train)
            metrics = {"learner/steps": steps, "learner/steps_per_s": (steps - last_steps) / (now - last),
                       "learner/rejected": counts["rejected"], "learner/bad_items": core.bad_items,
                       "perf/learner_wait_fraction": (core.wait_s - last_wait) / busy if busy > 0 else 0.0}
            if shards > 1:  # sharded replay: batches taken from each shard, updates dropped for a dead one
                metrics["learner/priorities_dropped"] = counts["priorities_dropped"]
                metrics.update({f"learner/batches_from_shard_{i}": counts[f"from_shard_{i}"] for i in range(shards)})
            if math.isfinite(core.loss):  # telemetry carries finite numbers only
                metrics["learner/loss"] = core.loss
            last, last_steps, last_wait, last_train = now, steps, core.wait_s, core.train_s
            await tel.send_multipart(encode(Telemetry(sender="learner", seq=steps, role="learner",
                                                      time=time.time(), metrics=metrics)))

    try:
        await run_role(stop, [publish(), report()],
                       [trainer] + [functools.partial(loader, s, r) for s, r in zip(samples[:cfg.loader_threads], rngs)],
                       torch_threads=cfg.torch_threads)
    finally:
        socks.close()


def main(argv: list[str] | None = None) -> None:
    """``apex-zmq learner``: run the learner."""
    cfg = C.parse(C.LearnerConfig, argv, "learner")
    C.save(cfg, cfg.run_dir, "config_learner")
    asyncio.run(main_async(cfg))


if __name__ == "__main__":
    main(sys.argv[1:])
