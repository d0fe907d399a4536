"""Atomic writes: a crash while writing a checkpoint or a result file never leaves a truncated file."""

from __future__ import annotations

import pytest
import torch

from tlframe.atomic import AtomicCheckpointIO, atomic_path, atomic_write_text
from tlframe.module import TransferModule


class Crash(RuntimeError):
    pass


def test_crash_while_writing_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "results.md"
    atomic_write_text(target, "old table\n")
    with pytest.raises(Crash):
        with atomic_path(target) as tmp:
            tmp.write_text("half a new tab")
            raise Crash
    assert target.read_text() == "old table\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md"]
    atomic_write_text(target, "new table\n")
    assert target.read_text() == "new table\n"


def test_checkpoint_io_replaces_atomically(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)  # creates the folder
    assert io.load_checkpoint(path)["global_step"] == 1

    def torch_save_dies_halfway(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 truncated")
        raise Crash("killed while writing")

    monkeypatch.setattr(torch, "save", torch_save_dies_halfway)
    with pytest.raises(Crash):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1  # the previous checkpoint, complete
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_module_installs_atomic_checkpoint_io_and_keeps_a_custom_one(synthetic_dm, trainer_factory):
    trainer = trainer_factory(max_steps=1)
    trainer.fit(TransferModule("dtn", 10), synthetic_dm())
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO

    class MyIO(AtomicCheckpointIO):
        pass

    trainer = trainer_factory(max_steps=1, plugins=[MyIO()])
    trainer.fit(TransferModule("dtn", 10), synthetic_dm())
    assert type(trainer.strategy.checkpoint_io) is MyIO
