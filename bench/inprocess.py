"""The whole Ape-X data path in one process, no sockets: for debugging a run that does not learn.

The actor's core steps its envs and builds chunks, every chunk and batch goes through the wire's encoder
and strict decoder, the replay server's ``PrioritizedReplay`` stores and samples them, and the learner's
rule trains on them and sends priorities back; the actor takes fresh weights every ``--weights-every``
learner steps. Acting and learning alternate at a fixed ratio (``--samples-per-insert``), so the run is
deterministic in its schedule and free of the cores' contention: if this learns and the distributed run
does not, the fault is in the system (rates, hand-offs), not in the learning rule or the data.

    .venv/bin/python bench/inprocess.py --env MinAtar/Breakout-v0 --minutes 5 -- --lr 2.5e-4

Flags after ``--`` go to every role's config (as ./run.sh's would). Prints a line per evaluation:
frames, learner steps, mean greedy return (epsilon ``--eval-epsilon``) over ``--eval-episodes``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import _common  # noqa: F401  (puts the repo on sys.path)
import numpy as np
import torch

from actor.main import ActorCore
from apex_zmq import config as C
from apex_zmq.networks import state_arrays
from apex_zmq.wire import decode_experience, decode_sample, encode
from evaluator.protocols import PLAIN, evaluate_policy
from learner.algos import make_rule
from learner.dqn import batch_from_sample
from replay_server.replay import PrioritizedReplay, annealed_beta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default="MinAtar/Breakout-v0")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--samples-per-insert", type=float, default=16.0,
                    help="sampled transitions per inserted one (Young & Tian's DQN: 32)")
    ap.add_argument("--weights-every", type=int, default=50, help="learner steps between weight copies")
    ap.add_argument("--eval-every", type=float, default=30.0, help="seconds between evaluations")
    ap.add_argument("--eval-episodes", type=int, default=30)
    ap.add_argument("--eval-epsilon", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("role_flags", nargs="*", help="flags for every role's config, after --")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run_dir = tempfile.mkdtemp(prefix="inprocess-")
    flags = ["--env", args.env, "--run-dir", run_dir, *args.role_flags]
    launch = C.resolve(C.parse(C.LaunchConfig, flags + ["--num-actors", "1"], "run.sh"))
    values = C.to_dict(launch)
    actor_cfg, replay_cfg, learner_cfg = (C.role_config(cls, values) for cls in
                                          (C.ActorConfig, C.ReplayConfig, C.LearnerConfig))
    core = ActorCore(actor_cfg)
    rule = make_rule(core.spec, learner_cfg, torch.device("cpu"))
    replay = PrioritizedReplay(replay_cfg.capacity, replay_cfg.alpha, seed=replay_cfg.seed)
    print(f"env {args.env} {core.spec}; batch {replay_cfg.batch_size}, spi {args.samples_per_insert}, "
          f"lr {learner_cfg.lr}, target every {learner_cfg.target_update}, n {actor_cfg.n_step}", flush=True)

    def push_weights() -> None:
        core.set_weights(*state_arrays(rule.net), rule.steps)

    push_weights()
    start = last_eval = time.monotonic()
    inserted = sampled = 0
    losses: list[float] = []
    while time.monotonic() - start < args.minutes * 60:
        # Act until the ratio allows a batch (or the replay is still filling).
        while replay.size < replay_cfg.min_size or sampled + replay_cfg.batch_size > \
                args.samples_per_insert * max(0, inserted - replay_cfg.min_size) + replay_cfg.batch_size:
            chunk = core.step()
            if chunk is not None:
                inserted += len(replay.add(decode_experience(encode(chunk))))
        beta = annealed_beta(replay_cfg.beta, rule.steps, replay_cfg.beta_anneal)
        sample = decode_sample(encode(replay.sample(replay_cfg.batch_size, beta)))
        batch = batch_from_sample(sample, core.spec.num_actions, torch.device("cpu"))
        prios, loss = rule.step(batch)
        replay.update(batch.ids, prios)
        sampled += len(batch.ids)
        losses.append(loss)
        if rule.steps % args.weights_every == 0:
            push_weights()
        if time.monotonic() - last_eval >= args.eval_every:
            last_eval = time.monotonic()
            rets = evaluate_policy(rule.net, args.env, args.eval_episodes, args.eval_epsilon, rule.steps, PLAIN).returns
            print(f"t {last_eval - start:6.0f} s  frames {core.agent_steps:8d}  learner {rule.steps:7d}  "
                  f"eval {rets.mean():6.2f} +- {rets.std() / np.sqrt(len(rets)):.2f}  "
                  f"loss {np.mean(losses[-200:]):.4f}", flush=True)
            last_eval = time.monotonic()  # evaluation time is off the clock of the next interval
    core.close()


if __name__ == "__main__":
    main()
