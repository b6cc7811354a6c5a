"""Every thread that runs torch work runs it with its role's thread budget."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch

from apex_zmq import config as C
from apex_zmq.launch import build_roles
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


def test_launcher_gives_every_role_an_openmp_floor(tmp_path: Path) -> None:
    cfg = C.parse(C.LaunchConfig, ["--env", "CartPole-v1", "--run-dir", str(tmp_path), "--num-actors", "2",
                                   "--torch-threads", "1"], "run")
    roles = build_roles(cfg, tmp_path / "config.json")
    assert len(roles) == 5
    for r in roles:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            assert r.env[var] == "1", (r.name, var)
