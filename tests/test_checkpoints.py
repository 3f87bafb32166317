"""Checkpoint files: written whole or not at all, and an unreadable one named in the error."""

import pickle

import pytest
import torch

from callbacks.last_checkpoint import AtomicCheckpointIO


def test_a_failed_write_leaves_the_previous_checkpoint_readable(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "weight": torch.ones(3)}, path)
    with pytest.raises((AttributeError, pickle.PicklingError)):  # a lambda does not pickle
        io.save_checkpoint({"global_step": 2, "unpicklable": lambda: None}, path)
    assert io.load_checkpoint(path, weights_only=False)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no partial file left behind


def test_a_truncated_checkpoint_gets_an_error_naming_the_file(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"weight": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(RuntimeError, match=f"cannot read checkpoint {path}"):
        io.load_checkpoint(path)
