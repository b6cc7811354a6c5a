"""The learning rule: double-DQN n-step targets, IS-weighted Huber loss, target sync, state round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from apex_zmq.wire import SampleBatch, WireError, compress_obs, frame_table
from learner.dqn import Batch, DQNLearner, batch_from_sample, double_dqn_td


class Table(nn.Module):
    """Q(s, a) = table[s, a] for integer states: Q values we can write down by hand."""

    def __init__(self, table: list[list[float]]) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.table[obs.long().squeeze(1)]


def _batch(obs, action, ret, disc, next_obs, weight=None) -> Batch:
    n = len(obs)
    return Batch(obs=torch.tensor(obs)[:, None], action=torch.tensor(action), ret=torch.tensor(ret),
                 disc=torch.tensor(disc), next_obs=torch.tensor(next_obs)[:, None],
                 weight=torch.tensor(weight if weight is not None else [1.0] * n), ids=np.arange(n))


def test_double_dqn_td_picks_action_online_and_value_target() -> None:
    online = Table([[1.0, 2.0], [5.0, 3.0], [0.0, 9.0]])
    target = Table([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]])
    b = _batch(obs=[0, 2, 1], action=[1, 0, 0], ret=[1.0, 0.5, 2.0], disc=[0.9 ** 3, 0.0, 0.9],
               next_obs=[1, 0, 2], )
    td = double_dqn_td(online, target, b)
    # s'=1: online argmax is action 0 (5 > 3) -> target Q(1, 0) = 30, not the target's max 40.
    # s'=0 with disc 0 (terminated): y = R. s'=2: online argmax 1 -> target 60.
    expected = [1.0 + 0.9 ** 3 * 30.0 - 2.0, 0.5 - 0.0, 2.0 + 0.9 * 60.0 - 5.0]
    torch.testing.assert_close(td, torch.tensor(expected))


def test_step_uses_is_weights_in_the_huber_loss_and_returns_abs_td() -> None:
    online = Table([[0.0, 0.0], [0.0, 0.0]])
    learner = DQNLearner(online, "adam", lr=0.0, target_update=1000, grad_clip=40.0)
    b = _batch(obs=[0, 1], action=[0, 1], ret=[0.5, 3.0], disc=[0.0, 0.0], next_obs=[0, 0],
               weight=[1.0, 0.25])
    prios, loss = learner.step(b)
    np.testing.assert_allclose(prios, [0.5, 3.0])
    # Huber: 0.5 * 0.5^2 = 0.125 (quadratic part); |3| - 0.5 = 2.5 (linear part), weighted 0.25.
    assert loss == pytest.approx((0.125 * 1.0 + 2.5 * 0.25) / 2)


def test_target_network_syncs_every_target_update_steps() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2))
    learner = DQNLearner(net, "adam", lr=0.1, target_update=3, grad_clip=40.0)
    b = Batch(obs=torch.randn(8, 3), action=torch.randint(0, 2, (8,)), ret=torch.randn(8),
              disc=torch.full((8,), 0.9), next_obs=torch.randn(8, 3), weight=torch.ones(8), ids=np.arange(8))
    start = [p.clone() for p in learner.target.parameters()]
    for _ in range(2):
        learner.step(b)
    assert all(torch.equal(a, p) for a, p in zip(start, learner.target.parameters()))  # not yet
    learner.step(b)
    assert all(torch.equal(a, p) for a, p in zip(net.parameters(), learner.target.parameters()))


def test_gradient_norm_is_clipped() -> None:
    net = nn.Sequential(nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        net[0].weight.fill_(0.0)
    learner = DQNLearner(net, "rmsprop", lr=1e-3, target_update=100, grad_clip=0.5)
    b = Batch(obs=torch.full((4, 1), 100.0), action=torch.zeros(4, dtype=torch.long), ret=torch.full((4,), 1e4),
              disc=torch.zeros(4), next_obs=torch.zeros(4, 1), weight=torch.ones(4), ids=np.arange(4))
    seen = []
    net[0].weight.register_hook(lambda g: seen.append(g.norm().item()))
    learner.step(b)
    assert seen[0] > 0.5 and net[0].weight.grad.norm().item() == pytest.approx(0.5, rel=1e-4)


def test_state_dict_round_trip_restores_counters_and_optimizer() -> None:
    torch.manual_seed(1)
    make = lambda: nn.Sequential(nn.Linear(3, 2))  # noqa: E731
    a = DQNLearner(make(), "adam", 1e-2, 5, 40.0)
    b = Batch(obs=torch.randn(4, 3), action=torch.randint(0, 2, (4,)), ret=torch.randn(4),
              disc=torch.full((4,), 0.9), next_obs=torch.randn(4, 3), weight=torch.ones(4), ids=np.arange(4))
    for _ in range(7):
        a.step(b)
    c = DQNLearner(make(), "adam", 1e-2, 5, 40.0)
    c.load_state_dict(a.state_dict())
    assert c.steps == 7
    pa, _ = a.step(b)
    pc, _ = c.step(b)
    np.testing.assert_allclose(pa, pc, rtol=1e-6)  # same optimizer moments: same next step


def test_mixed_precision_step_runs_in_bf16_and_keeps_float32_state() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    learner = DQNLearner(net, "adam", 1e-3, 100, 40.0, amp=True)
    b = Batch(obs=torch.randn(32, 16), action=torch.randint(0, 4, (32,)), ret=torch.randn(32),
              disc=torch.full((32,), 0.97), next_obs=torch.randn(32, 16), weight=torch.ones(32), ids=np.arange(32))
    exact = double_dqn_td(net, learner.target, b).detach().abs().numpy()
    dtypes = []  # what the promise is about: the forward passes run in bf16 (rather than "results differ")
    net[0].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    prios, loss = learner.step(b)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert prios.dtype == np.float32 and np.isfinite(loss)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in net.parameters())
    # bf16 keeps ~3 significant digits: the priorities are float32's within that.
    np.testing.assert_allclose(prios, exact, rtol=0.05, atol=0.05)


def _sample(obs: np.ndarray, n: int) -> SampleBatch:
    data, offsets = frame_table(compress_obs(obs))
    return SampleBatch(seq=1, obs_shape=obs.shape[1:], obs_dtype="uint8", frame_data=data, frame_offsets=offsets,
                       obs_idx=np.arange(n, dtype=np.int32), next_idx=np.arange(1, n + 1, dtype=np.int32),
                       action=np.zeros(n, np.int32), ret=np.ones(n, np.float32), disc=np.full(n, 0.9, np.float32),
                       ids=np.arange(n, dtype=np.int64), weight=np.ones(n, np.float32))


def test_batch_from_sample_decompresses_and_stacks_channels_last() -> None:
    obs = np.random.default_rng(3).integers(0, 255, (5, 4, 84, 84), dtype=np.uint8)
    b = batch_from_sample(_sample(obs, 4), 6, torch.device("cpu"), channels_last=True)
    assert b.obs.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(b.obs.numpy(), obs[:4])
    np.testing.assert_array_equal(b.next_obs.numpy(), obs[1:5])


def test_batch_from_sample_rejects_actions_outside_the_env() -> None:
    s = _sample(np.zeros((3, 4), np.uint8), 2)
    s.action = np.array([0, 6], np.int32)
    with pytest.raises(WireError, match="action"):
        batch_from_sample(s, 6, torch.device("cpu"))


def test_batch_from_sample_rejects_observations_of_another_env() -> None:
    s = _sample(np.zeros((3, 2, 2), np.uint8), 2)
    with pytest.raises(WireError, match="observations"):
        batch_from_sample(s, 6, torch.device("cpu"), obs_spec=((4, 84, 84), "uint8"))
    assert batch_from_sample(s, 6, torch.device("cpu"), obs_spec=((2, 2), "uint8")).obs.shape == (2, 2, 2)



# --------------------------------------------------------------------------- samples with a corrupt blob


def _cartpole_sample(blobs: list[bytes], obs_idx, next_idx, ids, incarnation: int = 77) -> SampleBatch:
    n = len(obs_idx)
    data, offsets = frame_table(blobs)
    return SampleBatch(seq=3, obs_shape=(4,), obs_dtype="float32", frame_data=data, frame_offsets=offsets,
                       obs_idx=np.asarray(obs_idx, np.int32), next_idx=np.asarray(next_idx, np.int32),
                       action=(np.arange(n) % 2).astype(np.int32),
                       ret=np.arange(n, dtype=np.float32) + 0.5,
                       disc=np.linspace(0.1, 0.9, n).astype(np.float32),
                       ids=np.asarray(ids, np.int64), weight=np.linspace(1.0, 0.3, n).astype(np.float32),
                       incarnation=incarnation)


def _obs(m: int) -> np.ndarray:
    """Observation j is [j, 10 j, -j, 0.5 j]: recognisable after the round trip."""
    j = np.arange(m, dtype=np.float32)
    return np.stack([j, 10 * j, -j, 0.5 * j], axis=1)


def test_batch_from_sample_leaves_out_items_with_a_corrupt_observation() -> None:
    obs = _obs(5)
    blobs = compress_obs(obs)
    blobs[2] = b"\xff" * 24 + blobs[2]  # does not decompress
    # item:         a  b  c  d  e  f  g     (b: bad next obs, c: bad obs, f: bad both, g repeats c)
    obs_idx = [0, 1, 2, 3, 0, 2, 2]
    next_idx = [1, 2, 3, 4, 4, 2, 3]
    ids = [10, 11, 12, 13, 14, 15, 12]
    s = _cartpole_sample(blobs, obs_idx, next_idx, ids)
    b = batch_from_sample(s, 2, torch.device("cpu"), obs_spec=((4,), "float32"))
    keep = [0, 3, 4]
    assert b.ids.tolist() == [10, 13, 14]
    assert b.bad_ids.dtype == np.int64 and b.bad_ids.tolist() == [11, 12, 15]  # each once
    assert b.incarnation == 77
    np.testing.assert_array_equal(b.obs.numpy(), obs[[0, 3, 0]])
    np.testing.assert_array_equal(b.next_obs.numpy(), obs[[1, 4, 4]])
    assert b.action.dtype == torch.int64 and b.action.tolist() == [int(s.action[k]) for k in keep]
    np.testing.assert_array_equal(b.ret.numpy(), s.ret[keep])
    np.testing.assert_array_equal(b.disc.numpy(), s.disc[keep])
    np.testing.assert_array_equal(b.weight.numpy(), s.weight[keep])
    assert all(len(t) == 3 for t in (b.obs, b.next_obs, b.action, b.ret, b.disc, b.weight))
    # The good rest trains, one priority per kept item.
    torch.manual_seed(0)
    learner = DQNLearner(nn.Sequential(nn.Linear(4, 2)), "adam", 1e-3, 100, 40.0)
    prios, loss = learner.step(b)
    assert prios.shape == (3,) and np.isfinite(loss) and learner.steps == 1


def test_batch_from_sample_flags_a_blob_of_the_wrong_size() -> None:
    import lz4.block
    obs = _obs(3)
    blobs = compress_obs(obs)
    blobs[0] = lz4.block.compress(obs[0].tobytes()[:12], store_size=False)  # 12 bytes, 16 expected
    s = _cartpole_sample(blobs, [0, 1], [1, 2], [5, 6])
    b = batch_from_sample(s, 2, torch.device("cpu"))
    assert b.ids.tolist() == [6] and b.bad_ids.tolist() == [5]
    np.testing.assert_array_equal(b.obs.numpy(), obs[[1]])
    np.testing.assert_array_equal(b.next_obs.numpy(), obs[[2]])


def test_batch_from_sample_with_every_item_bad_has_no_items() -> None:
    obs = _obs(4)
    blobs = compress_obs(obs)
    blobs[1] = b"\xff" * 24 + blobs[1]
    # every transition touches obs 1, as obs or as next obs (several share an id, as in a sample)
    s = _cartpole_sample(blobs, [0, 1, 1, 2, 0], [1, 2, 3, 1, 1], [8, 3, 3, 9, 8], incarnation=5)
    b = batch_from_sample(s, 2, torch.device("cpu"))
    assert len(b.ids) == 0 and b.ids.dtype == np.int64
    assert b.bad_ids.tolist() == [3, 8, 9]
    assert b.incarnation == 5
    assert tuple(b.obs.shape) == (0, 4) and tuple(b.next_obs.shape) == (0, 4)
    assert all(len(t) == 0 for t in (b.action, b.ret, b.disc, b.weight))


def test_batch_from_sample_bad_items_with_channels_last_images() -> None:
    obs = np.random.default_rng(4).integers(0, 255, (4, 4, 8, 8), dtype=np.uint8)
    blobs = compress_obs(obs)
    blobs[3] = b"\xff" * 24 + blobs[3]
    data, offsets = frame_table(blobs)
    s = SampleBatch(seq=1, obs_shape=(4, 8, 8), obs_dtype="uint8", frame_data=data, frame_offsets=offsets,
                    obs_idx=np.array([0, 1, 2], np.int32), next_idx=np.array([1, 2, 3], np.int32),
                    action=np.zeros(3, np.int32), ret=np.ones(3, np.float32), disc=np.full(3, 0.9, np.float32),
                    ids=np.array([40, 41, 42], np.int64), weight=np.ones(3, np.float32))
    b = batch_from_sample(s, 6, torch.device("cpu"), channels_last=True)
    assert b.ids.tolist() == [40, 41] and b.bad_ids.tolist() == [42]
    assert b.obs.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(b.obs.numpy(), obs[[0, 1]])
    np.testing.assert_array_equal(b.next_obs.numpy(), obs[[1, 2]])


def test_batch_from_sample_of_a_good_sample_has_no_bad_ids() -> None:
    s = _cartpole_sample(compress_obs(_obs(3)), [0, 1], [1, 2], [1, 2], incarnation=(1 << 53) - 1)
    b = batch_from_sample(s, 2, torch.device("cpu"))
    assert b.ids.tolist() == [1, 2] and len(b.bad_ids) == 0 and b.bad_ids.dtype == np.int64
    assert b.incarnation == (1 << 53) - 1


def test_checkpoints_keep_the_cuda_rng_state_where_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Noisy layers and IQN's taus draw on the training device: a GPU run's resume restores that RNG too.
    (Faked here: the state torch.cuda would give, and what it is set back to.)"""
    learner = DQNLearner(nn.Sequential(nn.Linear(3, 2)), "adam", 1e-2, 5, 40.0)
    assert "cuda_rng" not in learner.state_dict() or torch.cuda.is_available()
    states = [torch.arange(8, dtype=torch.uint8), torch.arange(8, 16, dtype=torch.uint8)]
    restored: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: restored.append(list(s)))
    state = learner.state_dict()
    assert [torch.equal(a, b) for a, b in zip(state["cuda_rng"], states)] == [True, True]
    learner.load_state_dict(state)
    assert len(restored) == 1 and len(restored[0]) == 1 and torch.equal(restored[0][0], states[0])  # one GPU here
    del state["cuda_rng"]  # a checkpoint written without a GPU
    learner.load_state_dict(state)
    assert len(restored) == 1
