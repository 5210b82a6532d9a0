"""Outputs are as readable as the user's umask says (temp files start 0600 before the rename)."""

import os
import stat

import pytest
import torch

from captioner.training.checkpoint_io import AtomicCheckpointIO
from captioner.utils.io import atomic_write_json


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_checkpoints_and_json_follow_the_umask(tmp_path, umask_022):
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, tmp_path / "last.ckpt")
    atomic_write_json(tmp_path / "metrics.json", {"a": 1})
    assert mode(tmp_path / "last.ckpt") == 0o644 and mode(tmp_path / "metrics.json") == 0o644


def test_a_rewritten_file_keeps_its_mode(tmp_path, umask_022):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"a": 1})
    path.chmod(0o600)  # the user made it private
    atomic_write_json(path, {"a": 2})
    assert mode(path) == 0o600
