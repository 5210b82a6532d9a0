"""``data.skip_bad_images=true``: how many images each epoch skipped, as one log line.

The per-image warnings come from the data-loader worker processes, interleaved with the progress
bar; the count here comes back with the batches (``num_skipped`` from ``PadCollate``)."""

from __future__ import annotations

import logging

import lightning as L

log = logging.getLogger(__name__)


class SkippedImagesReport(L.Callback):
    def __init__(self):
        self.counts = {"train": 0, "val": 0}

    def _add(self, stage: str, batch) -> None:
        if isinstance(batch, dict):
            self.counts[stage] += int(batch.get("num_skipped", 0))

    def _report(self, trainer: L.Trainer, stage: str) -> None:
        if self.counts[stage] and not trainer.sanity_checking:
            log.warning("epoch %d: skipped %d unreadable %s images (data.skip_bad_images=true)",
                        trainer.current_epoch, self.counts[stage], stage)
        self.counts[stage] = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.counts["train"] = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._add("train", batch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, "train")

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.counts["val"] = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0) -> None:
        self._add("val", batch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, "val")
