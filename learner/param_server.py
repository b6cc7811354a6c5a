"""The learner as the asynchronous family's parameter server (``--algo a3c|nstep_q|onestep_q|onestep_sarsa``).

Actor-learners push gradients computed at some weights version; the server applies each with one
shared RMSProp (Mnih et al. 2016's shared statistics: one optimizer state for every actor-learner),
drops and counts gradients more than ``max_staleness`` updates old, syncs the Q algorithms' target
network every ``target_update`` updates and publishes the weights (with the target network) often.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from torch import nn

from apex_zmq import config as C
from apex_zmq import optim
from apex_zmq.asyncrl import QWithTarget, gradient_mismatch, gradient_tensors, trainable
from apex_zmq.transport import Sockets, install_stop, run_role, send_until
from apex_zmq.wire import Gradients, Telemetry, WireError, decode_gradients, encode


@dataclass
class ApplyStats:
    """What happened to the gradients offered so far (counters, and staleness of the applied ones)."""

    applied: int = 0
    stale: int = 0          # older than max_staleness versions, or from another learner process
    mismatched: int = 0     # names or shapes of another network
    staleness_sum: int = 0
    staleness_max: int = 0
    loss_sum: float = 0.0
    entropy_sum: float = 0.0
    steps: int = 0          # agent steps the applied gradients were computed on


class ParameterServer:
    """Shared parameters and one RMSProp; ``apply`` takes one gradients message. A ``LearningRule``
    for the learner's checkpoints and weights (``net``, ``steps``, ``state_dict``)."""

    def __init__(self, net: nn.Module, lr: float, alpha: float, eps: float, grad_clip: float,
                 target_update: int, max_staleness: int) -> None:
        self.net = net
        self.params = [p for _, p in trainable(net)]
        # Mnih et al. 2016: not centered, epsilon inside the square root (optim.RMSprop's convention).
        self.opt = optim.RMSprop(self.params, lr=lr, alpha=alpha, eps=eps, module=net)
        self.grad_clip = grad_clip
        self.target_update = target_update
        self.max_staleness = max_staleness
        self.steps = 0  # updates applied: the weights version
        self.incarnation = 0  # set by the program: gradients from another learner process are stale
        self.stats = ApplyStats()
        if isinstance(net, QWithTarget):
            net.sync_target()

    def staleness(self, g: Gradients) -> int | None:
        """Updates applied since ``g``'s weights (None: not this process's weights, or from the future)."""
        if g.incarnation != self.incarnation or g.version > self.steps:
            return None
        return self.steps - g.version

    def apply(self, g: Gradients) -> str:
        """Apply ``g`` unless it is stale or does not fit; returns "applied", "stale" or "mismatch"."""
        if gradient_mismatch(self.net, g.names, g.arrays) is not None:
            self.stats.mismatched += 1
            return "mismatch"
        lag = self.staleness(g)
        if lag is None or lag > self.max_staleness:
            self.stats.stale += 1
            return "stale"
        for p, t in zip(self.params, gradient_tensors(g.arrays, g.dtype)):
            if p.grad is None:
                p.grad = t.to(p.device)
            else:  # the optimizer's flat gradient buffer: straight into it, one copy (and transfer)
                p.grad.copy_(t)
        if self.grad_clip > 0:
            self.opt.clip_grad_norm_(self.grad_clip)
        self.opt.step()
        self.steps += 1
        if isinstance(self.net, QWithTarget) and self.steps % self.target_update == 0:
            self.net.sync_target()
        s = self.stats
        s.applied += 1
        s.staleness_sum += lag
        s.staleness_max = max(s.staleness_max, lag)
        s.loss_sum += g.loss
        s.entropy_sum += g.entropy
        s.steps += g.steps
        return "applied"

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "optimizer": self.opt.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])


async def serve(cfg: C.LearnerConfig, core) -> None:
    """The parameter-server program around ``core`` (a ``learner.main.LearnerCore`` whose rule is a
    ``ParameterServer``): gradients in, weights and telemetry out, checkpoints."""
    server: ParameterServer = core.learner
    server.incarnation = core.incarnation
    socks = Sockets(cfg.insecure, cfg.keys)
    # Both owned by the applying thread: a gradient goes from ZeroMQ to the optimizer, and the new
    # weights from it to ZeroMQ, with no hop through the event loop.
    grads = socks.open(cfg, "param_server", "gradients", sync=True)
    weights = socks.open(cfg, "param_server", "weights", sync=True)
    tel = socks.open(cfg, "param_server", "telemetry")
    stop = asyncio.Event()
    install_stop(stop)
    counts = {"rejected": 0}

    def applying() -> None:
        published = last_ckpt = 0.0
        version = -1
        while not stop.is_set() and (cfg.max_learner_steps == 0 or server.steps < cfg.max_learner_steps):
            if grads.poll(min(250, max(1, int(cfg.weights_period * 1000)))):
                try:
                    g = decode_gradients(grads.recv_multipart(copy=False))
                except WireError:
                    counts["rejected"] += 1
                    continue
                t0 = time.perf_counter()
                server.apply(g)
                core.train_s += time.perf_counter() - t0
            now = time.monotonic()
            # New weights at most every period; the same ones again every period for late joiners.
            if now - published >= cfg.weights_period and (server.steps != version or now - published >= 1.0):
                send_until(weights, core.weights(server.steps), stop)
                published, version = now, server.steps
            if now - last_ckpt >= cfg.checkpoint_period:
                if last_ckpt:
                    core.save()
                last_ckpt = now
        core.save()

    async def report() -> None:
        last, prev = time.monotonic(), ApplyStats()
        while True:
            await asyncio.sleep(cfg.telemetry_period)
            now = time.monotonic()
            s = ApplyStats(**vars(server.stats))
            applied = s.applied - prev.applied
            metrics = {"learner/steps": server.steps, "learner/steps_per_s": applied / (now - last),
                       "learner/updates_per_s": applied / (now - last),
                       "learner/gradients_applied": s.applied, "learner/stale_dropped": s.stale,
                       "learner/rejected": counts["rejected"] + s.mismatched,
                       "learner/staleness_max": s.staleness_max,
                       "learner/agent_steps_per_s": (s.steps - prev.steps) / (now - last)}
            if applied:
                metrics["learner/staleness"] = (s.staleness_sum - prev.staleness_sum) / applied
                metrics["learner/loss"] = (s.loss_sum - prev.loss_sum) / applied
                if cfg.algo == "a3c":
                    metrics["learner/entropy"] = (s.entropy_sum - prev.entropy_sum) / applied
            last, prev = now, s
            await tel.send_multipart(encode(Telemetry(sender="learner", seq=server.steps, role="learner",
                                                      time=time.time(), metrics=metrics)))

    try:
        await run_role(stop, [report()], [applying], torch_threads=cfg.torch_threads)
    finally:
        socks.close()

