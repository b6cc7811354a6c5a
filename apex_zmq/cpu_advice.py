"""What an Atari run on a machine without a GPU can expect, measured on its own cores at start.

The Nature dueling CNN's training step at batch 512 costs about a second on a few CPU cores (a GPU
takes hundreds of them a second), and Ape-X's Atari learning needs hundreds of thousands of them: such
a run turns over but shows no learning for days. ``./run.sh`` says so at once, with the rate it
measured, and names the MinAtar command that does learn on a CPU in minutes.
"""

from __future__ import annotations

import time

MINATAR_COMMAND = "./run.sh --env MinAtar/Breakout-v0"


def cpu_learner_steps_per_s(threads: int, batch: int = 512, obs_shape: tuple[int, int, int] = (4, 84, 84),
                            num_actions: int = 6, hidden: int = 512) -> float:
    """Training steps per second of the Atari learner's network (dueling Nature CNN, ``batch`` frame
    stacks, forward and backward of online and target, an Adam update) on ``threads`` CPU threads;
    one warm-up step at a small batch, then one timed step (a few seconds in all)."""
    import torch

    from . import optim
    from .envs import EnvSpec
    from .models import build_network

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        spec = EnvSpec("ALE/Pong-v5", obs_shape, "uint8", num_actions, True)
        net, target = build_network(spec, hidden), build_network(spec, hidden)
        opt = optim.Adam(net.parameters(), lr=1e-4)
        gen = torch.Generator().manual_seed(0)

        def step(b: int) -> None:
            obs, next_obs = (torch.randint(0, 256, (b, *obs_shape), dtype=torch.uint8, generator=gen)
                             for _ in range(2))
            with torch.no_grad():  # double DQN: the online network picks, the target evaluates
                best = net(next_obs).argmax(dim=1, keepdim=True)
                y = 0.99 * target(next_obs).gather(1, best).squeeze(1)
            q = net(obs)[:, 0]
            loss = torch.nn.functional.smooth_l1_loss(q, y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        step(16)
        t = time.perf_counter()
        step(batch)
        return 1.0 / (time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)


def no_gpu_message(env_id: str, steps_per_s: float, threads: int, batch: int = 512) -> str:
    """The launcher's lines for an Atari run without a GPU."""
    per_hour = steps_per_s * 3600
    return (f"run.sh: no GPU here: {env_id}'s learner trains the Nature CNN on the CPU, measured now at "
            f"{steps_per_s:.2f} steps/s of {batch} on {threads} thread(s) (~{per_hour:,.0f} steps an hour; "
            f"a GPU makes hundreds a second, and Ape-X's Atari curves take ~10^5-10^6 steps): this run will "
            f"turn over but show little learning for days.\n"
            f"run.sh: to see learning on a CPU in minutes, train a MinAtar game: {MINATAR_COMMAND} "
            f"(Asterix, Breakout, Freeway, Seaquest, SpaceInvaders; README \"Results\")")
