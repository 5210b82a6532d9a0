"""``ExactResume``: what makes a run resumed from ``last.ckpt`` end exactly where an uninterrupted
run with the same seed ends (on CPU; GPU kernels may add their own non-determinism)."""

from __future__ import annotations

import logging
import random

import lightning as L
import numpy as np
import torch

log = logging.getLogger(__name__)
KEY = "captioner_resume"


def epoch_seed(seed: int, epoch: int) -> int:
    """A 32-bit seed mixing run seed and epoch (not ``seed + epoch``, which would make epoch 1
    of seed 42 replay epoch 0 of seed 43)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class ExactResume(L.Callback):
    """Two gaps Lightning leaves when resuming from an end-of-epoch checkpoint:

    1. RNG: the checkpoint holds no RNG state, so resumed epochs would shuffle, pick captions
       and drop out differently. Python, NumPy and torch are reseeded at every epoch start from
       (seed, epoch), so an epoch's randomness depends on its number alone. The sampler order and
       worker seeds are drawn from torch's RNG when the epoch's data-loader iterator is created:
       Lightning creates it after this hook, except in the first epoch a ``fit`` runs (fresh or
       resumed), where it exists before any hook; that one is created again after reseeding.
       Persistent data-loader workers keep their own RNG across epochs, so randomness inside
       workers replays exactly only with ``data.num_workers=0`` (or non-persistent workers).
    2. Epoch-interval LR schedulers: ``last.ckpt`` is written at validation end, before the
       epoch's scheduler step, and Lightning skips that step when it resumes (it has no
       metrics for ``ReduceLROnPlateau``). The checkpoint here records the metrics; the missing
       step is taken when the resumed training starts.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._iterator_made_early = False
        self._pending_epoch_end: dict | None = None  # metrics of the restored, unfinished epoch end

    # ---- 1. per-epoch seeding -----------------------------------------------------------------
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        s = epoch_seed(self.seed, trainer.current_epoch)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)  # also seeds every CUDA device
        if self._iterator_made_early:
            self._iterator_made_early = False
            fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)  # Lightning 2.x internals
            if fetcher is not None:
                iter(fetcher)

    # ---- 2. the scheduler step of the checkpoint's epoch -----------------------------------------
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        progress = trainer.fit_loop.epoch_progress.current
        at_epoch_end = (trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
                        and progress.completed < progress.started)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1)}
        checkpoint[KEY] = {"epoch_end_pending": bool(at_epoch_end), "metrics": metrics}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        state = checkpoint.get(KEY) or {}
        self._pending_epoch_end = state["metrics"] if state.get("epoch_end_pending") else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._iterator_made_early = True
        metrics, self._pending_epoch_end = self._pending_epoch_end, None
        if metrics is None:
            return
        for config in trainer.lr_scheduler_configs:  # as Lightning's epoch-end update would
            if config.interval != "epoch" or (trainer.current_epoch + 1) % config.frequency:
                continue
            if not config.reduce_on_plateau:
                pl_module.lr_scheduler_step(config.scheduler, None)
            elif config.monitor in metrics:
                pl_module.lr_scheduler_step(config.scheduler, torch.tensor(metrics[config.monitor]))
            else:
                log.warning("resume: %s not in the checkpoint's metrics; the scheduler misses one step",
                            config.monitor)
