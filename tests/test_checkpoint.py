"""Atomic checkpoints: a failed write keeps the old file loadable and leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from apex_zmq import checkpoint


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_write_keeps_the_old_checkpoint_and_no_temporary(tmp_path: Path, monkeypatch,
                                                                error: BaseException) -> None:
    path = checkpoint.last_path(tmp_path)
    checkpoint.save_atomic({"steps": 1, "w": torch.arange(4.0)}, path)

    def half_save(obj, f, *args, **kwargs) -> None:
        f.write(b"the first bytes of a checkpoint")  # fails mid-write, with part of the file out
        raise error

    monkeypatch.setattr(checkpoint.torch, "save", half_save)
    with pytest.raises(type(error)):
        checkpoint.save_atomic({"steps": 2, "w": torch.zeros(4)}, path)
    monkeypatch.undo()

    state = checkpoint.load(path)
    assert state["steps"] == 1 and torch.equal(state["w"], torch.arange(4.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary left behind
