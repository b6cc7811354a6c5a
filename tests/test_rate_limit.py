"""--samples-per-insert: the replay holds sampled/inserted transitions to a ratio, whichever side is faster."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import cartpole_chunk, endpoint_flags, start_role, stop_all

from apex_zmq import wire
from apex_zmq.config import loopback_endpoints
from replay_server.replay import SampleToInsertRatio

SPI, TOL, MIN, CHUNK, BATCH = 2.0, 256.0, 200, 50, 32


def _off_ratio(lim: SampleToInsertRatio) -> float:
    """How far sampling is from the target ratio, in sampled transitions."""
    return lim.sampled - lim.spi * (lim.inserted - lim.min_size)


@pytest.mark.parametrize("insert_every,sample_every", [(20, 1), (1, 20), (3, 2)])
def test_ratio_holds_whichever_side_is_faster(insert_every: int, sample_every: int) -> None:
    lim = SampleToInsertRatio(SPI, TOL, MIN)
    for t in range(20_000):
        if t % insert_every == 0 and lim.can_insert():
            lim.on_insert(CHUNK)
        if t % sample_every == 0 and lim.can_sample(BATCH):
            lim.on_sample(BATCH)
        if lim.inserted >= MIN:
            # Sampling never more than TOL ahead; inserts at most one chunk past TOL ahead.
            assert -TOL - SPI * CHUNK <= _off_ratio(lim) <= TOL, (t, lim.inserted, lim.sampled)
    assert lim.ratio == pytest.approx(SPI, rel=0.05)


def test_nothing_is_sampled_before_min_size_and_off_means_unlimited() -> None:
    lim = SampleToInsertRatio(SPI, TOL, MIN)
    lim.on_insert(MIN - 1)
    assert not lim.can_sample(1) and lim.can_insert()
    lim.on_insert(1)
    assert lim.can_sample(BATCH)  # the tolerance lets sampling start
    off = SampleToInsertRatio(0.0, 0.0, MIN)
    off.on_sample(10**9)
    assert off.can_sample(10**9) and off.can_insert()


def test_without_blocking_inserts_fast_actors_lower_the_ratio() -> None:
    """With inserts not held, only sampling is limited: fast actors make the ratio fall below target
    (the limiter cannot make a slow learner sample more), as --spi-block-inserts documents."""
    lim = SampleToInsertRatio(SPI, TOL, MIN)
    for t in range(10_000):
        lim.on_insert(CHUNK)  # never held
        if t % 20 == 0 and lim.can_sample(BATCH):
            lim.on_sample(BATCH)
    assert lim.ratio < SPI / 10


# --------------------------------------------------------------------------- the live replay server




@pytest.mark.parametrize("fast", ["learner", "actors"])
def test_live_replay_holds_the_ratio(tmp_path: Path, port_base: int, fast: str) -> None:
    """A real replay server; this test is the actor and the learner, one of them much faster."""
    eps = loopback_endpoints(port_base)
    ctx = zmq.Context()
    tel = ctx.socket(zmq.SUB)
    tel.setsockopt(zmq.SUBSCRIBE, b"")
    tel.bind(eps["telemetry"])
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 4)
    push.connect(eps["experience"])
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 2)
    pull.connect(eps["samples"])
    proc = start_role("replay_server", [
        "--env", "CartPole-v1", "--run-dir", str(tmp_path), *endpoint_flags(port_base), "--capacity", "100000",
        "--min-size", str(MIN), "--batch-size", str(BATCH), "--prefetch", "2", "--samples-per-insert", str(SPI),
        "--spi-tolerance", str(TOL), "--spi-block-inserts", "--telemetry-period", "0.2"], tmp_path / "replay.log")
    rng = np.random.default_rng(0)
    reports: list[dict] = []
    try:
        seq, deadline = 0, time.monotonic() + 8.0
        next_insert = next_sample = time.monotonic()
        while time.monotonic() < deadline:
            now = time.monotonic()
            # The fast side acts every time it can; the slow one every 50 ms.
            if now >= next_insert:
                try:
                    push.send_multipart(cartpole_chunk(rng, seq), flags=zmq.NOBLOCK)
                    seq += 1
                except zmq.Again:  # the replay holds inserts: its queue toward it is full
                    pass
                next_insert = now + (0.0 if fast == "actors" else 0.05)
            if now >= next_sample:
                if pull.poll(0):
                    wire.decode_sample(pull.recv_multipart())
                next_sample = now + (0.0 if fast == "learner" else 0.05)
            while tel.poll(0):
                reports.append(wire.decode_telemetry(tel.recv_multipart()).metrics)
            time.sleep(0.001)
        assert proc.poll() is None, (tmp_path / "replay.log").read_text()[-2000:]
    finally:
        stop_all([proc])
        for s in (tel, push, pull):
            s.close(0)
        ctx.term()
    counted = [r for r in reports if r["replay/inserted"] > MIN + 4 * CHUNK]
    assert len(counted) >= 5, reports[-3:]
    for r in counted:
        off = r["replay/sampled"] - SPI * (r["replay/inserted"] - MIN)
        assert -TOL - SPI * CHUNK <= off <= TOL, r
    last = counted[-1]
    assert last["replay/samples_per_insert"] == pytest.approx(SPI, rel=0.25), last
    assert last["replay/samples_per_insert_target"] == SPI
    # The slow side set the pace: the fast one was held, not merely slow.
    assert last["replay/sampled"] >= 10 * BATCH, last
