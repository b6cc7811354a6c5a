"""Every thread that runs torch work runs it with its role's thread budget."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch

from apex_zmq import config as C
from apex_zmq.launch import RoleBudget, build_roles, plan_budgets
from apex_zmq.transport import run_role


async def _worker_threads(torch_threads: int) -> list[int]:
    seen: list[int] = []
    await run_role(asyncio.Event(), [], [lambda: seen.append(torch.get_num_threads())], torch_threads=torch_threads)
    return seen


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to tell 1 thread from the default")
def test_worker_threads_run_torch_with_the_role_budget() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count())  # whatever the main thread has...
    try:
        assert asyncio.run(_worker_threads(0)) == [os.cpu_count()]
        assert asyncio.run(_worker_threads(1)) == [1]  # ...each worker runs with the role's budget
    finally:
        torch.set_num_threads(before)


def _cfg(tmp_path: Path, *flags: str) -> C.LaunchConfig:
    return C.parse(C.LaunchConfig, ["--run-dir", str(tmp_path), *flags], "run")


@pytest.mark.parametrize("flags,cores,gpu,learner", [
    (["--env", "CartPole-v1", "--num-actors", "1"], 2, False, RoleBudget(1.0, 1, 1 + 0 + 2)),   # no loader (preset)
    (["--env", "ALE/Pong-v5", "--num-actors", "14"], 16, False, RoleBudget(1.0, 1, 1 + 2 + 2)),
    (["--env", "ALE/Pong-v5", "--num-actors", "8"], 16, False, RoleBudget(6.0, 6, 6 + 2 + 2)),
    (["--env", "ALE/Pong-v5", "--num-actors", "8"], 16, True, RoleBudget(1.0, 1, 1 + 2 + 2)),
    (["--env", "ALE/Pong-v5", "--num-actors", "8", "--learner-threads", "3"], 16, False, RoleBudget(3.0, 3, 3 + 2 + 2)),
])
def test_budgets_per_role(tmp_path: Path, flags: list[str], cores: int, gpu: bool, learner: RoleBudget) -> None:
    b = plan_budgets(_cfg(tmp_path, *flags), cores, gpu)
    assert b["learner"] == learner
    assert b["replay_server"] == RoleBudget(1.0, 1, 3) and b["evaluator"] == RoleBudget(1.0, 1, 3)
    atari = "ALE/Pong-v5" in flags
    assert b["actor"] == RoleBudget(1.0, 1, 1 + (2 * 1 if atari else 0) + 2)  # 2 env groups x 1 ale-py thread


def test_launcher_gives_every_role_its_budget(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "--env", "ALE/Pong-v5", "--num-actors", "8", "--torch-threads", "1")
    roles = build_roles(cfg, tmp_path / "config.json", cores=16, learner_on_gpu=False)
    assert [r.name for r in roles] == ["evaluator", "replay_server", "learner"] + [f"actor-{i}" for i in range(8)]
    for r in roles:
        want = "6" if r.name == "learner" else "1"
        assert r.argv[-2:] == ["--torch-threads", want], r.name  # after --config: the budget wins
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            assert r.env[var] == want, (r.name, var)


@pytest.mark.parametrize("env,atari", [("CartPole-v1", False), ("ALE/Pong-v5", True)])
def test_asynchronous_family_has_no_replay_server_and_a_one_thread_learner(tmp_path: Path, env: str,
                                                                           atari: bool) -> None:
    """The learner only applies gradients (one thread, no loaders); the replay server's core goes to one
    more actor-learner, which steps its K envs as one group."""
    cfg = _cfg(tmp_path, "--env", env, "--algo", "a3c")
    assert cfg.num_actors == max(1, (os.cpu_count() or 1) - 1)
    cfg.num_actors = 15
    b = plan_budgets(cfg, 16, False)
    assert b["learner"] == RoleBudget(1.0, 1, 1 + 2)
    assert b["actor"] == RoleBudget(1.0, 1, 1 + (1 if atari else 0) + 2)
    roles = build_roles(cfg, tmp_path / "config.json", cores=16, learner_on_gpu=False)
    assert [r.name for r in roles] == ["evaluator", "learner"] + [f"actor-{i}" for i in range(15)]
    assert all(r.argv[-2:] == ["--torch-threads", "1"] for r in roles)


_ASK_GPU = """
import sys
from apex_zmq import config as C, launch
launch.gpu_device_nodes = lambda: {nodes!r}
cfg = C.parse(C.LaunchConfig, ["--run-dir", {run_dir!r}, "--device", {device!r}], "run")
print(launch._learner_on_gpu(cfg), "torch" in sys.modules)
"""


@pytest.mark.parametrize("nodes,device,imports_torch", [
    ([], "auto", False),                   # no GPU driver: the launcher does not pay torch's import
    ([], "cpu", False),
    (["/dev/nvidia0"], "auto", True),      # a driver's node: ask torch (this machine's answer)
])
def test_launcher_asks_torch_about_a_gpu_only_where_a_driver_is(tmp_path: Path, nodes: list[str], device: str,
                                                                 imports_torch: bool) -> None:
    import subprocess
    import sys
    code = _ASK_GPU.format(nodes=nodes, run_dir=str(tmp_path), device=device)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    on_gpu = imports_torch and torch.cuda.is_available()
    assert out == [str(on_gpu), str(imports_torch)]
