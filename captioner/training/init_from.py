"""``init_from=PATH``: start a run from a trained model's weights only (e.g. self-critical
training after cross-entropy), with a fresh optimizer, schedule and loop. Distinct from resuming
(``ckpt_path``), which restores everything and takes precedence: Lightning restores a resumed
checkpoint after the ``setup`` hook where these weights are loaded."""

from __future__ import annotations

import logging

import lightning as L

from captioner.checkpoint import CheckpointError, load_checkpoint

log = logging.getLogger(__name__)


class InitFromCheckpoint(L.Callback):
    """Load the model weights of a captioner checkpoint into ``pl_module.model`` at fit setup.
    The checkpoint must have the run's vocabulary (same training captions) and model shape."""

    def __init__(self, path: str | None = None):
        self.path = path

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.path or stage != "fit":
            return
        model, tokenizer, _ = load_checkpoint(self.path)
        if tokenizer.get_vocab() != pl_module.tokenizer.get_vocab():
            raise CheckpointError(f"{self.path}: its vocabulary differs from this run's "
                                  "(init_from needs the training captions it was trained on)")
        try:
            pl_module.model.load_state_dict(model.state_dict())
        except RuntimeError as e:
            raise CheckpointError(f"{self.path}: its weights do not fit the configured model "
                                  f"(use the model settings it was trained with): {str(e)[:300]}") from None
        log.info("initialised the model from %s", self.path)
