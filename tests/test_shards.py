"""Sharded replay (``--replay-shards N``): the learner's shard draw (``learner.shards``), priority updates
routed back to the shard that sampled them, shard endpoints from config, the optional ``shard``/``mass``
of sample batches, the launcher's shard roles and port check, and the evaluator's per-shard totals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from apex_zmq import config as C
from apex_zmq import launch
from apex_zmq.wire import SampleBatch, WireError, decode_priorities, decode_sample, encode
from evaluator.monitor import RunMonitor
from learner.dqn import Batch
from learner.main import LearnerCore, train
from learner.shards import draw_shard, route
from replay_server.replay import PrioritizedReplay, importance_weights

# ----------------------------------------------------------------------------------------- the draw


def test_draw_is_proportional_to_mass() -> None:
    rng = np.random.default_rng(0)
    n = 40_000
    draws = np.array([draw_shard([1.0, 3.0, 4.0], [True, True, True], rng) for _ in range(n)])
    freq = np.bincount(draws, minlength=3) / n
    # binomial standard error at n = 40k is <= 0.0025: 4 sigma
    assert np.allclose(freq, [1 / 8, 3 / 8, 4 / 8], atol=0.01), freq


def test_draw_takes_only_ready_shards() -> None:
    rng = np.random.default_rng(1)
    assert draw_shard([1.0, 100.0], [False, False], rng) is None
    assert {draw_shard([1.0, 100.0], [True, False], rng) for _ in range(200)} == {0}  # a dead shard has none
    freq = np.bincount([draw_shard([2.0, 100.0, 6.0], [True, False, True], rng) for _ in range(20_000)],
                       minlength=3) / 20_000
    assert freq[1] == 0 and abs(freq[0] - 0.25) < 0.02


def test_draw_unknown_and_zero_masses() -> None:
    rng = np.random.default_rng(2)
    # not heard of yet: counts as the mean of the known masses (here 2): 2 / (2 + 2)
    freq = np.bincount([draw_shard([2.0, None], [True, True], rng) for _ in range(20_000)], minlength=2) / 20_000
    assert abs(freq[0] - 0.5) < 0.02
    # none known, or all zero: uniform
    for masses in ([None, None], [0.0, 0.0]):
        freq = np.bincount([draw_shard(masses, [True, True], rng) for _ in range(20_000)], minlength=2) / 20_000
        assert abs(freq[0] - 0.5) < 0.02


def test_proportional_draw_samples_the_one_replay_distribution() -> None:
    """Whole batches from shard i with probability M_i / M give each item p_j / M, and per-batch
    normalised IS weights equal those of one replay holding both shards (the shard factor cancels)."""
    rng = np.random.default_rng(3)
    p = [np.array([1.0, 2.0, 3.0]), np.array([10.0, 0.5])]
    masses = [float(x.sum()) for x in p]
    total = sum(masses)
    counts = [np.zeros(3), np.zeros(2)]
    for _ in range(30_000):
        i = draw_shard(masses, [True, True], rng)
        j = rng.choice(len(p[i]), p=p[i] / masses[i])
        counts[i][j] += 1
    got = np.concatenate(counts) / 30_000
    assert np.allclose(got, np.concatenate(p) / total, atol=0.01), got
    # a batch of shard 1's items: shard-local weights == global weights (both normalised by the batch max)
    local = importance_weights(p[1], masses[1], len(p[1]), 0.4)
    glob = importance_weights(p[1], total, 5, 0.4)
    assert np.allclose(local, glob)


def test_route_sends_an_update_to_its_own_shard() -> None:
    assert [route(i, 3) for i in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError):
        route(3, 3)


def test_train_routes_each_priority_update_to_the_shard_of_its_batch(tmp_path: Path) -> None:
    cfg = C.parse(C.LearnerConfig, ["--env", "CartPole-v1", "--run-dir", str(tmp_path), "--device", "cpu",
                                    "--checkpoint-period", "1e9", "--replay-shards", "3"], "learner")
    torch.manual_seed(0)
    core = LearnerCore(cfg)
    g = torch.Generator().manual_seed(1)
    batches = []
    for i in range(9):
        k = 8
        batches.append(Batch(obs=torch.randn(k, 4, generator=g), action=torch.randint(0, 2, (k,), generator=g),
                             ret=torch.randn(k, generator=g), disc=torch.full((k,), 0.97),
                             next_obs=torch.randn(k, 4, generator=g), weight=torch.ones(k),
                             ids=np.arange(k) + 100 * i, incarnation=10 + i % 3, shard=i % 3))
    feed = iter(batches)
    to: dict[int, list] = {0: [], 1: [], 2: []}
    plain: list = []
    train(core, lambda: next(feed, None), plain.append, lambda frames: None, lambda: False,
          send_to=lambda shard, frames: to[shard].append(decode_priorities([bytes(f) for f in frames])))
    assert plain == []  # sharded: nothing goes to the one-socket path
    for shard, updates in to.items():
        assert [int(u.ids[0]) // 100 for u in updates] == [i for i in range(9) if i % 3 == shard]
        assert {u.incarnation for u in updates} == {10 + shard}  # each shard's own incarnation echoed


# ----------------------------------------------------------------------------------------- endpoints


def test_shard_endpoints_are_offset_from_config() -> None:
    assert C.shard_endpoint("tcp://127.0.0.1:5551", 0, 100) == "tcp://127.0.0.1:5551"
    assert C.shard_endpoint("tcp://127.0.0.1:5551", 2, 100) == "tcp://127.0.0.1:5751"
    assert C.shard_endpoint("tcp://[::1]:5551", 1, 10) == "tcp://[::1]:5561"
    assert C.shard_endpoint("ipc:///tmp/exp", 1, 100) == "ipc:///tmp/exp-1"
    for bad in ("tcp://127.0.0.1:*", "tcp://127.0.0.1:0"):
        with pytest.raises(ValueError):
            C.shard_endpoint(bad, 1, 100)
    with pytest.raises(ValueError):
        C.shard_endpoint("tcp://127.0.0.1:65500", 1, 100)
    cfg = C.LaunchConfig(env="CartPole-v1", replay_shards=3, shard_port_step=7, **C.loopback_endpoints(20000))
    assert C.shard_endpoints(cfg, "samples") == ["tcp://127.0.0.1:20001", "tcp://127.0.0.1:20008",
                                                 "tcp://127.0.0.1:20015"]
    assert C.for_shard(cfg, 1).priorities == "tcp://127.0.0.1:20009"


def test_config_checks_shards() -> None:
    with pytest.raises(C.ConfigError):
        C.parse(C.ReplayConfig, ["--env", "CartPole-v1", "--replay-shards", "0"], "replay_server")
    with pytest.raises(C.ConfigError):
        C.parse(C.ReplayConfig, ["--env", "CartPole-v1", "--replay-shards", "2", "--shard", "2"], "replay_server")
    with pytest.raises(C.ConfigError):
        C.parse(C.ActorConfig, ["--env", "CartPole-v1", "--replay-shards", "2",
                                "--experience", "tcp://127.0.0.1:*"], "actor")
    one = C.parse(C.ReplayConfig, ["--env", "CartPole-v1"], "replay_server")
    assert (one.replay_shards, one.shard) == (1, 0)


def test_launcher_runs_one_role_per_shard_and_checks_every_shards_ports(tmp_path: Path) -> None:
    cfg = C.LaunchConfig(env="CartPole-v1", run_dir=str(tmp_path), num_actors=1, replay_shards=2,
                         **C.loopback_endpoints(21000))
    roles = launch.build_roles(cfg, tmp_path / "config.json", cores=2, learner_on_gpu=False)
    shards = [r for r in roles if r.name.startswith("replay_server")]
    assert [r.name for r in shards] == ["replay_server-0", "replay_server-1"]
    assert [r.argv[r.argv.index("--shard") + 1] for r in shards] == ["0", "1"]
    eps = launch.bound_endpoints(cfg)
    for name in C.SHARD_ENDPOINTS:
        assert set(C.shard_endpoints(cfg, name)) <= set(eps.values())
    assert len(eps) == 8
    one = C.LaunchConfig(env="CartPole-v1", run_dir=str(tmp_path), num_actors=1)
    assert [r.name for r in launch.build_roles(one, tmp_path / "c.json", cores=2, learner_on_gpu=False)
            if r.name.startswith("replay")] == ["replay_server"]
    assert list(launch.bound_endpoints(one)) == ["experience", "samples", "priorities", "weights", "telemetry"]


# ----------------------------------------------------------------------------------------- wire and service


def _sample(**kw) -> SampleBatch:
    replay = PrioritizedReplay(16, 0.6, seed=0)
    from test_replay import simple_chunk  # noqa: E402 (the replay tests' chunk maker)
    from apex_zmq.wire import decode_experience
    replay.add(decode_experience(encode(simple_chunk(np.ones(8), tag=1))))
    b = replay.sample(4, 0.4)
    for k, v in kw.items():
        setattr(b, k, v)
    return b


def test_one_shard_batches_carry_no_shard_fields() -> None:
    import msgpack
    h = msgpack.unpackb(bytes(encode(_sample())[0]), raw=False)
    assert "shard" not in h and "mass" not in h
    s = decode_sample(encode(_sample()))
    assert (s.shard, s.mass) == (0, None)
    s = decode_sample([bytes(f) for f in encode(_sample(shard=3, mass=12.5))])
    assert (s.shard, s.mass) == (3, 12.5)


@pytest.mark.parametrize("bad", [{"shard": -1}, {"shard": 1.0}, {"shard": 5000}, {"mass": -1.0},
                                 {"mass": float("inf")}, {"mass": 3}])
def test_bad_shard_fields_are_refused(bad: dict) -> None:
    import msgpack
    frames = [bytes(f) for f in encode(_sample())]
    h = msgpack.unpackb(frames[0], raw=False)
    h.update(bad)
    frames[0] = msgpack.packb(h, use_bin_type=True)
    with pytest.raises(WireError):
        decode_sample(frames)


def test_sharded_service_stamps_shard_and_mass(tmp_path: Path) -> None:
    from replay_server.main import ReplayService
    from test_replay import simple_chunk
    svc = ReplayService(C.ReplayConfig(env="CartPole-v1", capacity=64, batch_size=4, min_size=4,
                                       replay_shards=2, shard=1, run_dir=str(tmp_path)))
    assert svc.on_experience(encode(simple_chunk(np.ones(8), tag=1)))
    s = decode_sample([bytes(f) for f in svc.sample_frames()])
    assert s.shard == 1 and s.mass == pytest.approx(svc.replay.tree.total) and s.mass > 0
    assert s.incarnation == svc.incarnation
    assert svc.snapshot_path.name == "snapshot-1.npz"


# ----------------------------------------------------------------------------------------- telemetry


def _tel(sender: str, metrics: dict):
    from apex_zmq.wire import Telemetry
    return Telemetry(sender=sender, seq=1, role="replay", time=1.0, metrics=metrics, episodes=[])


def test_monitor_totals_over_live_shards() -> None:
    m = RunMonitor(num_slots=0, heartbeat_timeout=5.0)
    m.take(_tel("replay-0", {"replay/0/size": 100.0, "replay/0/capacity": 1000.0,
                             "replay/0/inserted_per_s": 10.0}), now=1.0)
    m.take(_tel("replay-1", {"replay/1/size": 300.0, "replay/1/capacity": 1000.0,
                             "replay/1/inserted_per_s": 5.0}), now=2.0)
    assert m.metrics["replay/size"] == 400.0 and m.metrics["replay/fill"] == pytest.approx(0.2)
    assert m.metrics["replay/inserted_per_s"] == 15.0 and m.metrics["replay/0/size"] == 100.0
    line = m.progress_line(3.0)
    assert "replay 400" in line and "shards [100 300]" in line
    # shard 0 silent past the timeout: down, and no longer in the totals
    m.take(_tel("replay-1", {"replay/1/size": 310.0, "replay/1/capacity": 1000.0}), now=9.0)
    assert m.metrics["replay/size"] == 310.0
    assert "shards [down 310]" in m.progress_line(9.0)
    # a lone replay server: no shard part
    lone = RunMonitor(num_slots=0)
    lone.take(_tel("replay", {"replay/size": 5.0}), now=1.0)
    assert "shards" not in lone.progress_line(1.0) and lone.metrics["replay/size"] == 5.0


# ----------------------------------------------------------------------------------------- Slurm


def test_sbatch_runs_one_replay_server_per_shard(tmp_path: Path) -> None:
    from test_deploy import _dry_run, _fake_scontrol, _parse_dry_run
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    env = {**_fake_scontrol(tmp_path, ["cn1", "cn2"]), "SLURM_JOB_NODELIST": "cn[1-2]", "SLURM_JOB_ID": "7",
           "SLURM_CPUS_ON_NODE": "4", "SLURM_SUBMIT_DIR": "/shared/apex", "APEX_HEAD_ADDR": "10.0.0.1",
           "APEX_KEYS": str(keys)}
    proc = _dry_run(env, "--replay-shards", "2")
    assert proc.returncode == 0, proc.stderr
    lines = _parse_dry_run(proc.stdout)
    replay = [a for w, a in lines if w == "cn1" and a[1] == "replay_server"]
    assert [a[a.index("--shard") + 1] for a in replay] == ["0", "1"]
    for _, argv in lines:  # every role, actors and learner included, knows the shard count
        if argv[1] in ("replay_server", "learner", "actor"):
            assert argv[argv.index("--replay-shards") + 1] == "2"
    one = _parse_dry_run(_dry_run(env).stdout)
    assert [a for w, a in one if a[1] == "replay_server" and "--shard" in a] == []
    assert _dry_run(env, "--replay-shards", "0").returncode != 0


def test_dashboard_state_lists_each_shard() -> None:
    m = RunMonitor(num_slots=0, heartbeat_timeout=5.0)
    assert m.state(1.0)["replay_shards"] == []
    m.take(_tel("replay-1", {"replay/1/size": 7.0, "replay/1/capacity": 10.0}), now=1.0)
    m.take(_tel("replay-0", {"replay/0/size": 3.0, "replay/0/capacity": 10.0}), now=1.0)
    st = m.state(2.0)
    assert st["replay_shards"] == [{"sender": "replay-0", "size": 3.0}, {"sender": "replay-1", "size": 7.0}]
    assert st["latest"]["replay/size"] == 10.0 and st["latest"]["replay/fill"] == 0.5
