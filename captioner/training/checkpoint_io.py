"""Atomic checkpoint files: a crash while saving leaves the previous ``last.ckpt`` intact."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from captioner.utils.io import atomic_open


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves go through ``utils.io.atomic_open`` (temp file,
    fsync, rename). Lightning's own save writes the target in place, so a kill mid-write would
    leave a truncated checkpoint under the final name. Remote (``scheme://``) paths keep
    Lightning's behaviour."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        # One writer per checkpoint file (rank 0), so a killed save's temp file can be removed.
        with atomic_open(Path(path), remove_stale=True) as f:
            torch.save(checkpoint, f)
