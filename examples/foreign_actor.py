#!/usr/bin/env python3
"""An Ape-X actor written from PROTOCOL.md alone.

It uses nothing of apex-zmq: only pyzmq, msgpack, lz4, numpy and the standard library, as an actor
in another language would. It plays its own CartPole (the physics of gymnasium's CartPole-v1,
written out in numpy below), acts epsilon-greedily with the dueling MLP it reads from the learner's
weights messages (randomly until the first one arrives), builds n-step transitions with initial
priorities, and pushes them as experience chunks to a replay server run with ``--env CartPole-v1``.
It also reports telemetry as role ``actor``.

    python examples/foreign_actor.py --experience tcp://127.0.0.1:5551 \
        --weights tcp://127.0.0.1:5554 --telemetry tcp://127.0.0.1:5555 --seconds 60

At the end it prints one JSON line with what it did (chunks and transitions sent, weights
received, episodes, ...). Section numbers (§) refer to PROTOCOL.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from collections import deque
from pathlib import Path

import lz4.block
import msgpack
import numpy as np
import zmq
import zmq.auth

SCHEMA_VERSION = 2       # §7
MAX_EPISODES = 4096      # §3.2: episodes per telemetry report
MAX_INCARNATION = 1 << 53
OBS_SHAPE, OBS_DTYPE, NUM_ACTIONS = (4,), "float32", 2  # §4: CartPole-v1
WEIGHT_DTYPES = {"float32": "<f4", "float16": "<f2", "int64": "<i8"}  # §5.4, little-endian
MLP_NAMES = ["torso.1.weight", "torso.1.bias", "value.0.weight", "value.0.bias", "value.2.weight",
             "value.2.bias", "advantage.0.weight", "advantage.0.bias", "advantage.2.weight",
             "advantage.2.bias"]  # §8


# --------------------------------------------------------------------------- the environment


class CartPoles:
    """K CartPole-v1 environments stepped together (Barto, Sutton & Anderson; gymnasium's constants).

    Reward 1 every step, termination when the cart leaves [-2.4, 2.4] or the pole leans more than
    12 degrees, truncation at 500 steps. ``step`` returns the observation after the action (the
    final one for an episode that ended) and resets ended envs itself: ``obs`` is then the first
    observation of the next episode.
    """

    GRAVITY, MASSCART, MASSPOLE, LENGTH, FORCE, TAU = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
    X_LIMIT, THETA_LIMIT, MAX_STEPS = 2.4, 12 * 2 * math.pi / 360, 500

    def __init__(self, k: int, rng: np.random.Generator) -> None:
        self.rng = rng
        self.state = rng.uniform(-0.05, 0.05, size=(k, 4))
        self.t = np.zeros(k, dtype=np.int64)

    @property
    def obs(self) -> np.ndarray:
        return self.state.astype(np.float32)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        x, x_dot, th, th_dot = self.state.T
        force = np.where(actions == 1, self.FORCE, -self.FORCE)
        cos, sin = np.cos(th), np.sin(th)
        total, pml = self.MASSCART + self.MASSPOLE, self.MASSPOLE * self.LENGTH
        temp = (force + pml * th_dot ** 2 * sin) / total
        th_acc = (self.GRAVITY * sin - cos * temp) / (
            self.LENGTH * (4.0 / 3.0 - self.MASSPOLE * cos ** 2 / total))
        x_acc = temp - pml * th_acc * cos / total
        self.state = np.stack([x + self.TAU * x_dot, x_dot + self.TAU * x_acc,
                               th + self.TAU * th_dot, th_dot + self.TAU * th_acc], axis=1)
        self.t += 1
        final = self.obs
        terminated = (np.abs(self.state[:, 0]) > self.X_LIMIT) | (np.abs(self.state[:, 2]) > self.THETA_LIMIT)
        truncated = ~terminated & (self.t >= self.MAX_STEPS)
        ended = terminated | truncated
        if ended.any():
            self.state[ended] = self.rng.uniform(-0.05, 0.05, size=(int(ended.sum()), 4))
            self.t[ended] = 0
        return final, np.ones(len(actions), dtype=np.float32), terminated, truncated


# --------------------------------------------------------------------------- the network (§8)


class DuelingMLP:
    """Q(s, .) = V(s) + A(s, .) - mean A(s, .) from the arrays of a weights message."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.p = {n: np.asarray(arrays[n], dtype=np.float32) for n in MLP_NAMES}

    @staticmethod
    def fits(names: list[str], arrays: list[np.ndarray]) -> str | None:
        """Why these arrays are not a CartPole dueling MLP (None if they are)."""
        if names != MLP_NAMES:
            return f"expected arrays {MLP_NAMES}, got {names[:4]}..."
        s = {n: a.shape for n, a in zip(names, arrays)}
        h = s["torso.1.weight"][0] if len(s["torso.1.weight"]) == 2 else -1
        want = {"torso.1.weight": (h, OBS_SHAPE[0]), "torso.1.bias": (h,), "value.0.weight": (h, h),
                "value.0.bias": (h,), "value.2.weight": (1, h), "value.2.bias": (1,),
                "advantage.0.weight": (h, h), "advantage.0.bias": (h,),
                "advantage.2.weight": (NUM_ACTIONS, h), "advantage.2.bias": (NUM_ACTIONS,)}
        bad = [n for n in MLP_NAMES if s[n] != want[n]]
        return f"shapes of {bad} do not fit obs {OBS_SHAPE}, {NUM_ACTIONS} actions" if bad or h < 1 else None

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        p = self.p
        lin = lambda x, n: x @ p[f"{n}.weight"].T + p[f"{n}.bias"]  # noqa: E731
        h = np.maximum(lin(obs.reshape(len(obs), -1), "torso.1"), 0)
        v = lin(np.maximum(lin(h, "value.0"), 0), "value.2")
        a = lin(np.maximum(lin(h, "advantage.0"), 0), "advantage.2")
        return v + a - a.mean(axis=1, keepdims=True)


# --------------------------------------------------------------------------- messages (§3, §5)


def header(t: str, sender: str, seq: int, **fields) -> dict:
    return {"v": SCHEMA_VERSION, "t": t, "s": sender, "q": int(seq), **fields}


def encode_experience(sender: str, seq: int, obs_table: list[np.ndarray], obs_idx, next_idx, action,
                      ret, disc, priority) -> list[bytes]:
    """An ``experience`` message (§5.1): the header, the lz4 frame table (§4), six arrays."""
    blobs = [lz4.block.compress(np.ascontiguousarray(o, dtype="<f4").tobytes(), store_size=False)
             for o in obs_table]
    offsets = np.zeros(len(blobs) + 1, dtype="<i8")
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    arrays = [("frame_data", b"".join(blobs)), ("frame_offsets", offsets),
              ("obs_idx", np.asarray(obs_idx, "<i4")), ("next_idx", np.asarray(next_idx, "<i4")),
              ("action", np.asarray(action, "<i4")), ("ret", np.asarray(ret, "<f4")),
              ("disc", np.asarray(disc, "<f4")), ("priority", np.asarray(priority, "<f4"))]
    spec = [[n, len(a) if isinstance(a, bytes) else int(a.size)] for n, a in arrays]
    h = header("experience", sender, seq, shape=list(OBS_SHAPE), dtype=OBS_DTYPE, a=spec)
    return [msgpack.packb(h, use_bin_type=True)] + [a if isinstance(a, bytes) else a.tobytes() for _, a in arrays]


def encode_telemetry(sender: str, seq: int, metrics: dict[str, float], episodes: list[dict]) -> list[bytes]:
    """A ``telemetry`` message (§5.5): one frame; ``time`` must be a float."""
    h = header("telemetry", sender, seq, role="actor", time=float(time.time()),
               m={k: float(v) for k, v in metrics.items()}, e=episodes)
    return [msgpack.packb(h, use_bin_type=True)]


class BadMessage(ValueError):
    pass


def decode_weights(frames: list[bytes]) -> tuple[int, int, list[str], list[np.ndarray]]:
    """(incarnation, version, names, arrays) of a ``weights`` message (§5.4); BadMessage if malformed."""
    try:
        h = msgpack.unpackb(frames[0], raw=False, max_bin_len=0, max_ext_len=0)
    except Exception as e:
        raise BadMessage(f"header is not msgpack: {e}") from None
    is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
    if not isinstance(h, dict) or not is_int(h.get("v")) or h["v"] != SCHEMA_VERSION or h.get("t") != "weights":
        raise BadMessage("not a weights message of schema version 2")
    inc, version, specs = h.get("inc"), h.get("version"), h.get("a")
    if not (is_int(inc) and 0 <= inc < MAX_INCARNATION and is_int(version) and version >= 0):
        raise BadMessage("bad inc or version")
    if not isinstance(specs, list) or len(specs) != len(frames) - 1:
        raise BadMessage("one [name, dtype, shape] per array frame expected")
    names, arrays = [], []
    for spec, frame in zip(specs, frames[1:]):
        if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str)
                and spec[1] in WEIGHT_DTYPES and isinstance(spec[2], list) and len(spec[2]) <= 8
                and all(is_int(d) and 0 <= d < 1 << 31 for d in spec[2])):
            raise BadMessage(f"bad array spec {spec!r:.80}")
        dt = np.dtype(WEIGHT_DTYPES[spec[1]])
        if len(frame) != math.prod(spec[2]) * dt.itemsize:
            raise BadMessage(f"{spec[0]}: frame size disagrees with its shape")
        names.append(spec[0])
        arrays.append(np.frombuffer(frame, dtype=dt).reshape(spec[2]))
    return inc, version, names, arrays


# --------------------------------------------------------------------------- n-step transitions


class NStep:
    """Per-env n-step returns (§9 step 5). Observations are numbered; a transition names its two."""

    def __init__(self, k: int, n: int, gamma: float) -> None:
        self.n, self.gamma = n, gamma
        self.pending: list[deque] = [deque() for _ in range(k)]  # [obs id, action, ret, steps]
        self.out: list[tuple[int, int, float, int, float]] = []   # (obs id, action, ret, next id, disc)

    def step(self, env: int, obs_id: int, action: int, reward: float, next_id: int,
             terminated: bool, truncated: bool) -> None:
        q = self.pending[env]
        q.append([obs_id, action, 0.0, 0])
        for p in q:
            p[2] += self.gamma ** p[3] * reward
            p[3] += 1
        if terminated or truncated:  # every pending transition ends here
            for o, a, r, k in q:
                self.out.append((o, a, r, next_id, 0.0 if terminated else self.gamma ** k))
            q.clear()
        elif q[0][3] == self.n:
            o, a, r, k = q.popleft()
            self.out.append((o, a, r, next_id, self.gamma ** k))


# --------------------------------------------------------------------------- sockets (§2)


def sockets(ctx: zmq.Context, args: argparse.Namespace) -> tuple[zmq.Socket, zmq.Socket, zmq.Socket | None]:
    def make(kind: int, hwm: int) -> zmq.Socket:
        s = ctx.socket(kind)
        s.setsockopt(zmq.SNDHWM, hwm)
        s.setsockopt(zmq.RCVHWM, hwm)
        s.setsockopt(zmq.MAXMSGSIZE, 256 << 20)
        s.setsockopt(zmq.IMMEDIATE, 1)
        if args.keys:  # §2.3: every connecting socket is a CURVE client
            server_public, _ = zmq.auth.load_certificate(Path(args.keys) / "server.key")
            public, secret = zmq.auth.load_certificate(Path(args.keys) / "client.key_secret")
            s.curve_serverkey, s.curve_publickey, s.curve_secretkey = server_public, public, secret
        return s

    exp = make(zmq.PUSH, 8)
    exp.setsockopt(zmq.LINGER, 2000)  # let the last chunk out at exit
    exp.connect(args.experience)
    weights = make(zmq.SUB, 2)
    weights.setsockopt(zmq.LINGER, 0)
    weights.setsockopt(zmq.SUBSCRIBE, b"")
    weights.connect(args.weights)
    tel = None
    if args.telemetry:
        tel = make(zmq.PUB, 100)
        tel.setsockopt(zmq.LINGER, 500)
        tel.connect(args.telemetry)
    return exp, weights, tel


# --------------------------------------------------------------------------- the actor


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experience", default="tcp://127.0.0.1:5551", help="replay server's experience endpoint")
    p.add_argument("--weights", default="tcp://127.0.0.1:5554", help="learner's (or a relay's) weights endpoint")
    p.add_argument("--telemetry", default="tcp://127.0.0.1:5555", help="evaluator's telemetry endpoint ('' = none)")
    p.add_argument("--keys", default="", help="CURVE key directory: server.key and client.key_secret")
    p.add_argument("--name", default=f"foreign-actor-{os.getpid()}", help="sender name, unique per process")
    p.add_argument("--envs", type=int, default=4, help="CartPoles stepped together")
    p.add_argument("--slot-base", type=int, default=60000, help="telemetry slot of the first env (§5.5)")
    p.add_argument("--n-step", type=int, default=3)
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--eps-base", type=float, default=0.4, help="epsilon of env i: base^(1 + alpha i/(K-1))")
    p.add_argument("--eps-alpha", type=float, default=7.0)
    p.add_argument("--chunk", type=int, default=64, help="transitions per experience chunk")
    p.add_argument("--wait-weights", type=float, default=0.0,
                   help="seconds to wait for the first weights before acting (random actions meanwhile)")
    p.add_argument("--steps", type=int, default=0, help="stop after this many agent steps (0: no limit)")
    p.add_argument("--seconds", type=float, default=0.0, help="stop after this many seconds (0: no limit)")
    p.add_argument("--until-weights", type=int, default=0,
                   help="stop once a chunk was sent acting with the N-th weights adopted (0: off); "
                        "N >= 2 means weights newer than the first ones")
    p.add_argument("--telemetry-period", type=float, default=1.0)
    p.add_argument("--max-steps-per-s", type=float, default=0.0,
                   help="cap on agent steps per second, to leave the CPU to the others (0: no cap)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    stop = {"now": False}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.update(now=True))

    rng = np.random.default_rng(args.seed)
    K = args.envs
    eps = np.array([args.eps_base ** (1 + args.eps_alpha * i / max(K - 1, 1)) for i in range(K)])
    env = CartPoles(K, rng)
    nstep = NStep(K, args.n_step, args.gamma)
    ctx = zmq.Context()
    exp, weights_sock, tel = sockets(ctx, args)

    net: DuelingMLP | None = None
    have = {"inc": -1, "version": -1}
    stats = dict(agent_steps=0, chunks=0, transitions=0, episodes=0, weights_received=0, weights_adopted=0,
                 weights_rejected=0, first_weights_version=None, last_weights_version=None,
                 chunk_weights_version=-1, chunk_weights_adopted=0, blocked_s=0.0)
    recent_returns: deque = deque(maxlen=20)
    episodes: list[dict] = []
    ep_return, ep_length = np.zeros(K), np.zeros(K, dtype=np.int64)

    # Observations by number: each transition names its observation and bootstrap observation.
    obs_store: dict[int, np.ndarray] = {}
    next_obs_id = 0

    def new_obs(o: np.ndarray) -> int:
        nonlocal next_obs_id
        obs_store[next_obs_id] = o
        next_obs_id += 1
        return next_obs_id - 1

    def poll_weights() -> None:
        """Drain the weights socket, adopt the newest message if newer (§6) and fitting (§8)."""
        nonlocal net
        newest = None
        while weights_sock.poll(0):
            newest = weights_sock.recv_multipart()
            stats["weights_received"] += 1
        if newest is None:
            return
        try:
            inc, version, names, arrays = decode_weights(newest)
            why = DuelingMLP.fits(names, arrays)
            if why:
                raise BadMessage(why)
        except BadMessage as e:
            stats["weights_rejected"] += 1
            print(f"{args.name}: weights rejected: {e}", file=sys.stderr, flush=True)
            return
        if inc != have["inc"] or version > have["version"]:
            net = DuelingMLP(dict(zip(names, arrays)))
            have.update(inc=inc, version=version)
            stats["weights_adopted"] += 1
            if stats["first_weights_version"] is None:
                stats["first_weights_version"] = version
            stats["last_weights_version"] = version
            print(f"{args.name}: acting with weights version {version} (learner incarnation {inc}) "
                  f"after {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)

    def send(frames: list[bytes]) -> bool:
        """Send with backpressure (§2.1): wait while the HWM is reached, give up only when stopping."""
        t0 = time.monotonic()
        while not stop["now"]:
            try:
                exp.send_multipart(frames, flags=zmq.NOBLOCK)
                stats["blocked_s"] += time.monotonic() - t0
                return True
            except zmq.Again:
                exp.poll(100, zmq.POLLOUT)
        return False

    def send_chunk() -> None:
        """The pending transitions as one experience message, every observation once (§4)."""
        out, nstep.out = nstep.out, []
        table: dict[int, int] = {}
        for o, _, _, nxt, _ in out:
            table.setdefault(o, len(table))
            table.setdefault(nxt, len(table))
        ids = list(table)
        obs_table = [obs_store[i] for i in ids]
        obs_idx = [table[t[0]] for t in out]
        next_idx = [table[t[3]] for t in out]
        action = np.array([t[1] for t in out])
        ret = np.array([t[2] for t in out], np.float32)
        disc = np.array([t[4] for t in out], np.float32)
        if net is None:
            priority = np.ones(len(out), np.float32)
        else:  # |TD| with our own Q values (§9 step 6)
            q = net(np.stack(obs_table))
            td = ret + disc * q[next_idx].max(axis=1) - q[obs_idx, action]
            priority = np.abs(td).astype(np.float32)
        if send(encode_experience(args.name, stats["chunks"] + 1, obs_table, obs_idx, next_idx,
                                  action, ret, disc, priority)):
            stats["chunks"] += 1
            stats["transitions"] += len(out)
            stats["chunk_weights_version"] = have["version"]
            stats["chunk_weights_adopted"] = stats["weights_adopted"]
        # Forget observations no pending transition needs any more.
        keep = {p[0] for q in nstep.pending for p in q} | set(cur_ids)
        for i in [i for i in obs_store if i not in keep]:
            del obs_store[i]

    def report(now: float) -> None:
        """A telemetry message (§5.5) with the episodes finished since the last one."""
        nonlocal last_report, last_steps
        sps = (stats["agent_steps"] - last_steps) / max(now - last_report, 1e-9)
        last_report, last_steps = now, stats["agent_steps"]
        batch, episodes[:] = episodes[:MAX_EPISODES], episodes[MAX_EPISODES:]
        tel.send_multipart(encode_telemetry(args.name, stats["chunks"], {
            "actor/agent_steps": stats["agent_steps"], "actor/steps_per_s": sps,
            "actor/weights_version": have["version"], "actor/rejected": stats["weights_rejected"],
            "actor/chunks": stats["chunks"], "actor/transitions": stats["transitions"]}, batch))

    start = last_report = time.monotonic()
    last_steps = 0
    if args.wait_weights > 0:
        while net is None and time.monotonic() - start < args.wait_weights and not stop["now"]:
            weights_sock.poll(100)
            poll_weights()
    cur_ids = [new_obs(o) for o in env.obs]
    obs = env.obs
    while not stop["now"]:
        now = time.monotonic()
        if (args.seconds and now - start >= args.seconds) or (args.steps and stats["agent_steps"] >= args.steps):
            break
        if args.until_weights > 0 and stats["chunk_weights_adopted"] >= args.until_weights:
            break
        if args.max_steps_per_s > 0:  # pace: sleep while ahead of the cap
            ahead = stats["agent_steps"] / args.max_steps_per_s - (now - start)
            if ahead > 0:
                time.sleep(min(ahead, 0.1))
                continue
        poll_weights()
        # Act: epsilon-greedy on Q, random before the first weights (§9 step 4).
        random = rng.integers(0, NUM_ACTIONS, size=K)
        if net is None:
            actions = random
        else:
            actions = np.where(rng.random(K) < eps, random, net(obs).argmax(axis=1))
        final, rewards, term, trunc = env.step(actions)
        stats["agent_steps"] += K
        ep_return += rewards
        ep_length += 1
        next_ids = []
        for k in range(K):
            nid = new_obs(final[k])
            nstep.step(k, cur_ids[k], int(actions[k]), float(rewards[k]), nid, bool(term[k]), bool(trunc[k]))
            if term[k] or trunc[k]:
                episodes.append({"slot": args.slot_base + k, "epsilon": float(eps[k]),
                                 "return": float(ep_return[k]), "clipped_return": float(ep_return[k]),
                                 "length": int(ep_length[k])})
                recent_returns.append(float(ep_return[k]))
                stats["episodes"] += 1
                ep_return[k], ep_length[k] = 0.0, 0
                nid = new_obs(env.obs[k])  # the first observation of the next episode
            next_ids.append(nid)
        cur_ids, obs = next_ids, env.obs
        if len(nstep.out) >= args.chunk:
            send_chunk()
        if tel is not None and now - last_report >= args.telemetry_period:
            report(now)
    if nstep.out and not stop["now"]:
        send_chunk()
    if tel is not None:
        report(time.monotonic())  # the last episodes and counters
    exp.close()  # lingers up to 2 s for the last chunks
    weights_sock.close()
    if tel is not None:
        tel.close()
    ctx.term()
    stats["seconds"] = round(time.monotonic() - start, 3)
    stats["blocked_s"] = round(stats["blocked_s"], 3)
    stats["mean_recent_return"] = float(np.mean(recent_returns)) if recent_returns else None
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
