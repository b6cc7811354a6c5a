"""Priority updates without a host sync per step: the bounded in-order FIFO (``learner.readback``) on a fake
device whose copies finish when the test says, the training loop (``learner.main.train``) over it, the
CPU path unchanged, and ``--compile``'s validation and captured loss."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from apex_zmq import config as C
from apex_zmq.wire import decode_priorities
from conftest import ROOT
from learner.dqn import Batch, DQNLearner
from learner.main import LearnerCore, train
from learner.readback import CpuCopier, PendingUpdates


class FakeEvent:
    """A copy that finishes on the test's word (or after ``after`` polls); ``synchronize`` is a wait."""

    def __init__(self, after: int | None = None) -> None:
        self.done, self.after, self.polls, self.waited = False, after, 0, False

    def query(self) -> bool:
        self.polls += 1
        if self.after is not None and self.polls >= self.after:
            self.done = True
        return self.done

    def synchronize(self) -> None:
        self.waited = self.done = True


class FakeCopier:
    """A fake device with the copier contract of ``CudaCopier``: ``slots`` host buffers in turn (so an update
    must take its values out before its slot comes round again), values usable once the event says so;
    counts the losses copied."""

    def __init__(self, slots: int, after: int | None = None) -> None:
        self.after = after
        self.events: list[FakeEvent] = []
        self.loss_copies = 0
        self.buffers = np.zeros((slots, 64), np.float32)
        self.in_flight_max = 0

    def copy(self, priorities: torch.Tensor, loss: torch.Tensor | None):
        self.in_flight_max = max(self.in_flight_max, sum(not e.done for e in self.events) + 1)
        n = priorities.numel()
        buffer = self.buffers[len(self.events) % len(self.buffers)]
        buffer[:n] = priorities.detach().numpy()
        self.loss_copies += loss is not None
        e = FakeEvent(self.after)
        self.events.append(e)
        return buffer[:n], None if loss is None else loss.detach().reshape(1).numpy().copy(), e


def _batch(i: int, n: int = 3, incarnation: int = 7, bad: tuple[int, ...] = ()) -> Batch:
    z = torch.zeros(n)
    return Batch(obs=z, action=z.long(), ret=z, disc=z, next_obs=z, weight=z, ids=np.arange(n) + 100 * i,
                 incarnation=incarnation, bad_ids=np.array(bad, np.int64))


def _result(i: int, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((n,), float(i)), torch.tensor(float(i) / 10)


def test_updates_leave_in_order_with_at_most_k_pending() -> None:
    copier = FakeCopier(slots=4)
    pending = PendingUpdates(copier, max_pending=3, loss_every=1)
    sent = []
    for i in range(1, 11):
        sent += pending.push(_batch(i), i, _result(i))
        assert len(pending) <= 3
        assert [u.seq for u in sent] == list(range(1, len(sent) + 1))  # in order, none skipped
    assert len(sent) == 7 and pending.waited == 7  # nothing finished by itself: the oldest was waited for
    assert all(e.waited for e in copier.events[:7]) and not any(e.waited for e in copier.events[7:])
    sent += pending.drain()
    assert [u.seq for u in sent] == list(range(1, 11)) and len(pending) == 0
    for u in sent:  # each its own values, though the fake device reuses one buffer
        np.testing.assert_array_equal(u.priority, np.full(3, float(u.seq), np.float32))
        np.testing.assert_array_equal(u.ids, np.arange(3) + 100 * u.seq)
        assert u.incarnation == 7 and u.loss == pytest.approx(u.seq / 10)


def test_a_finished_update_does_not_overtake_an_older_one() -> None:
    copier = FakeCopier(slots=5)
    pending = PendingUpdates(copier, max_pending=4, loss_every=1)
    assert pending.push(_batch(1), 1, _result(1)) == []
    assert pending.push(_batch(2), 2, _result(2)) == []
    copier.events[1].done = True  # the second copy finished first
    assert pending.ready() == []
    # A batch with nothing to train on (every item bad): its update (removals only) queues behind too.
    assert pending.push(_batch(3, bad=(300, 301)), 3, None) == []
    copier.events[0].done = True
    out = pending.ready()
    assert [u.seq for u in out] == [1, 2, 3] and not any(e.waited for e in copier.events)
    assert out[2].priority.size == 0 and out[2].remove.tolist() == [300, 301] and out[2].loss is None


def test_updates_leave_once_their_copies_finish_without_waiting() -> None:
    copier = FakeCopier(slots=5, after=2)  # each copy is seen finished at its second poll
    pending = PendingUpdates(copier, max_pending=4, loss_every=1)
    sent = []
    for i in range(1, 21):
        sent += pending.push(_batch(i), i, _result(i))
    sent += pending.drain()
    assert [u.seq for u in sent] == list(range(1, 21))
    assert pending.waited == 0 and copier.in_flight_max <= 5


def test_loss_is_copied_every_n_steps_only() -> None:
    copier = FakeCopier(slots=3)
    pending = PendingUpdates(copier, max_pending=2, loss_every=5)
    sent = []
    for i in range(1, 13):
        sent += pending.push(_batch(i), i, _result(i))
    sent += pending.drain()
    assert copier.loss_copies == 2
    assert [(u.seq, u.loss) for u in sent if u.loss is not None] == [(5, pytest.approx(0.5)), (10, pytest.approx(1.0))]


def test_cpu_copier_sends_each_update_after_its_step() -> None:
    pending = PendingUpdates(CpuCopier(), max_pending=4, loss_every=1)
    for i in range(1, 4):
        out = pending.push(_batch(i), i, _result(i))
        assert [u.seq for u in out] == [i] and len(pending) == 0
        assert out[0].loss == pytest.approx(i / 10)


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError):
        PendingUpdates(CpuCopier(), max_pending=0, loss_every=1)
    with pytest.raises(ValueError):
        PendingUpdates(CpuCopier(), max_pending=1, loss_every=0)


# ------------------------------------------------------------------------------------- the training loop


def _core(tmp_path: Path, *flags: str) -> LearnerCore:
    cfg = C.parse(C.LearnerConfig, ["--env", "CartPole-v1", "--run-dir", str(tmp_path), "--device", "cpu",
                                    "--checkpoint-period", "1e9", *flags], "learner")
    torch.manual_seed(0)
    return LearnerCore(cfg)


def _cartpole_batches(count: int, n: int = 16) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(count):
        bad = (i * 1000 + 999,) if i % 4 == 3 else ()
        k = 0 if i == 5 else n  # one batch whose every item was bad: nothing to train on
        out.append(Batch(obs=torch.randn(k, 4, generator=g), action=torch.randint(0, 2, (k,), generator=g),
                         ret=torch.randn(k, generator=g), disc=torch.full((k,), 0.97),
                         next_obs=torch.randn(k, 4, generator=g), weight=torch.ones(k),
                         ids=np.arange(k) + 1000 * i, incarnation=1 + i // 6, bad_ids=np.array(bad, np.int64)))
    return out


def _run(core: LearnerCore, batches: list[Batch], pending: PendingUpdates | None = None):
    feed = iter(batches)
    sent, losses, pending_max = [], [], [0]

    def send(frames: list) -> bool:
        sent.append(decode_priorities([bytes(f) for f in frames]))
        losses.append(core.loss)
        if pending is not None:
            pending_max[0] = max(pending_max[0], len(pending))
        return True

    train(core, lambda: next(feed, None), send, lambda frames: None, lambda: False, pending)
    return sent, losses, pending_max[0]


def test_every_sampled_batch_gets_exactly_one_update_in_order(tmp_path: Path) -> None:
    core = _core(tmp_path)
    batches = _cartpole_batches(23)
    copier = FakeCopier(slots=4, after=3)
    pending = PendingUpdates(copier, max_pending=3, loss_every=4)
    sent, losses, pending_max = _run(core, batches, pending)
    assert len(sent) == len(batches)
    for b, u in zip(batches, sent):  # one each, in the order sampled, for the replay that sampled it
        assert u.ids.tolist() == b.ids.tolist() and u.incarnation == b.incarnation
        assert u.remove.tolist() == b.bad_ids.tolist()
        assert len(u.priority) == len(b.ids) and np.all(np.isfinite(u.priority))
    assert [u.seq for u in sent] == sorted(u.seq for u in sent)
    assert core.learner.steps == 22 and sent[-1].seq == 22  # the empty batch took no step
    assert pending_max <= 3 and copier.in_flight_max <= 4
    # The loss is read at steps 4, 8, ... only: core.loss changes at those updates and nowhere else.
    prev, changed = float("nan"), []
    for u, loss in zip(sent, losses):
        if not (loss == prev or (math.isnan(loss) and math.isnan(prev))):
            changed.append(u.seq)
        prev = loss
    assert changed == [4, 8, 12, 16, 20] and copier.loss_copies == 5
    assert core.ckpt_path.exists()  # written at the end


def test_cpu_training_loop_reads_every_step_as_before(tmp_path: Path) -> None:
    """The CPU path: the update and the loss of each step leave right after it, with the values that the
    synchronous ``step`` returns."""
    batches = _cartpole_batches(6)
    core = _core(tmp_path / "a", "--loss-every", "50")  # --loss-every is for CUDA: the CPU reads every step
    sent, losses, _ = _run(core, batches)
    ref = _core(tmp_path / "b")
    expected = [ref.learner.step(b) if len(b.ids) else (np.zeros(0, np.float32), None) for b in batches]
    assert len(sent) == 6
    for u, (prios, loss) in zip(sent, expected):
        np.testing.assert_array_equal(u.priority, prios)
    trained = [loss for _, loss in expected if loss is not None]
    assert losses[-1] == pytest.approx(trained[-1]) and losses[0] == pytest.approx(trained[0])


# ------------------------------------------------------------------------------------------- --compile


def test_compile_is_refused_on_the_cpu() -> None:
    r = subprocess.run([sys.executable, "-m", "learner", "--env", "CartPole-v1", "--device", "cpu", "--compile"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == C.CONFIG_ERROR_EXIT and "--compile" in r.stderr and "--device cuda" in r.stderr
    with pytest.raises(SystemExit) as e:
        C.parse(C.LearnerConfig, ["--env", "CartPole-v1", "--algo", "a3c", "--device", "cuda", "--compile"],
                "learner")
    assert e.value.code == C.CONFIG_ERROR_EXIT
    with pytest.raises(SystemExit):
        C.parse(C.LearnerConfig, ["--env", "CartPole-v1", "--loss-every", "0"], "learner")


@pytest.mark.skipif(torch.cuda.is_available(), reason="--device auto picks CUDA here")
def test_compile_with_device_auto_and_no_cuda_is_refused(tmp_path: Path) -> None:
    cfg = C.parse(C.LearnerConfig, ["--env", "CartPole-v1", "--run-dir", str(tmp_path), "--compile"], "learner")
    with pytest.raises(SystemExit) as e:
        LearnerCore(cfg)
    assert e.value.code == C.CONFIG_ERROR_EXIT


@pytest.mark.parametrize("algo", ["dqn", "rainbow"])
def test_compiled_loss_matches_eager(tmp_path: Path, algo: str) -> None:
    """The captured part of the step traces (dynamo with aot_eager on the CPU: no CUDA graphs here) and gives
    the eager step's priorities and loss; Rainbow's noise is drawn outside it, into its buffers in place."""
    from apex_zmq.envs import env_spec
    from apex_zmq.models import build_network
    from learner.algos import _common
    from learner.rainbow import RainbowLearner
    cfg = C.parse(C.LearnerConfig, ["--env", "CartPole-v1", "--algo", algo, "--run-dir", str(tmp_path)],
                  "learner")
    spec, rule = env_spec("CartPole-v1"), {"dqn": DQNLearner, "rainbow": RainbowLearner}[algo]
    results = []
    for options in (None, dict(backend="aot_eager")):
        torch.manual_seed(0)
        learner = rule(build_network(spec, cfg.hidden, algo, **C.net_options(cfg)),
                       **{**_common(cfg, False), "compile_options": options})
        assert learner.compiled == (options is not None) and (algo == "dqn") == (not learner._noisy)
        torch.manual_seed(1)
        results.append([learner.step(b) for b in _cartpole_batches(4) if len(b.ids)])
    for (pe, le), (pc, lc) in zip(*results):
        np.testing.assert_allclose(pc, pe, rtol=1e-4, atol=1e-5)
        assert lc == pytest.approx(le, rel=1e-4, abs=1e-6)


def test_the_flag_asks_for_cuda_graphs() -> None:
    from learner.algos import _common
    cfg = C.parse(C.LearnerConfig, ["--env", "CartPole-v1", "--device", "cuda", "--compile"], "learner")
    assert _common(cfg, False)["compile_options"] == {"mode": "reduce-overhead"}
    assert _common(C.parse(C.LearnerConfig, ["--env", "CartPole-v1"], "learner"), False)["compile_options"] is None
