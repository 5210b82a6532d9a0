"""LightningModule adapting the plain ``Captioner`` to training: loss, metrics, optimisers,
and the self-contained checkpoint payload."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F

from captioner.checkpoint import checkpoint_payload
from captioner.data.tokenizer import decode as decode_ids
from captioner.metrics.bleu import bleu
from captioner.metrics.cider import cider_d
from captioner.metrics.text import tokenize
from captioner.models.captioner import Captioner


def gather_dict(trainer, local: dict) -> dict:
    """Merge per-rank dicts so metrics cover the whole split, not one rank's shard (duplicates
    added by the distributed sampler's padding collapse onto the same image id)."""
    if trainer is None or trainer.world_size == 1:
        return local
    parts = [None] * trainer.world_size
    torch.distributed.all_gather_object(parts, local)
    merged = {}
    for p in parts:
        merged.update(p)
    return merged


class CaptioningModule(L.LightningModule):
    """Args:
        model: the ``Captioner`` (encoder + decoder).
        tokenizer: the run's tokenizer (saved inside every checkpoint).
        model_config: the plain-data config that rebuilds ``model`` (saved in checkpoints).
        optimizer / scheduler: factories (Hydra ``_partial_``) taking params / optimizer.
        decode: generation settings for test; val_decode: for per-epoch validation metrics.
        alpha_c: doubly stochastic attention regularisation (Show, Attend and Tell).
        image_size: the training image size, stored so that captioning resizes the same way.
    """

    def __init__(
        self,
        model: Captioner,
        tokenizer,
        model_config: dict,
        optimizer: Callable,
        scheduler: Callable | None = None,
        scheduler_interval: str = "epoch",
        decode: dict | None = None,
        val_decode: dict | None = None,
        alpha_c: float = 1.0,
        label_smoothing: float = 0.0,
        image_size: int = 224,
    ):
        super().__init__()
        self.model, self.tokenizer, self.model_config = model, tokenizer, model_config
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval = scheduler_interval
        self.decode = dict(decode or {"method": "greedy", "max_length": 20})
        self.val_decode = dict(val_decode or self.decode)
        self.alpha_c, self.label_smoothing = alpha_c, label_smoothing
        self.image_size = image_size
        self.save_hyperparameters(ignore=["model", "tokenizer", "optimizer", "scheduler"])
        self._hyps: dict[int, str] = {}

    # ---- loss -------------------------------------------------------------------------------
    def features(self, batch: dict) -> torch.Tensor:
        """Region features (B, R, C): cached ones when the data module provides them."""
        if "features" in batch:
            return batch["features"]
        return self.model.encode(batch["images"])

    def caption_loss(self, batch: dict, regularise: bool = True) -> torch.Tensor:
        captions = batch["captions"]  # (B, k, T)
        B, k, T = captions.shape
        tokens = captions.view(B * k, T)
        # (B*k, T-1, V), (B*k, T-1, R)
        logits, attn = self.model.decoder(self.features(batch), tokens[:, :-1])
        targets = tokens[:, 1:]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
            ignore_index=self.model.pad_id, label_smoothing=self.label_smoothing,
        )
        if regularise and self.alpha_c > 0:
            # Each region should receive about one unit of attention over the caption.
            real = (targets != self.model.pad_id).unsqueeze(-1)  # (B*k, T-1, 1)
            coverage = (attn * real).sum(1)  # (B*k, R)
            loss = loss + self.alpha_c * ((1.0 - coverage) ** 2).mean()
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.caption_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["captions"].size(0))
        return loss

    # ---- generation metrics -----------------------------------------------------------------
    def generate_captions(self, features: torch.Tensor, decode: dict) -> list[str]:
        tokens, _ = self.model.generate(features=features, **decode)
        return [decode_ids(self.tokenizer, row) for row in tokens.tolist()]

    def _eval_step(self, batch: dict, stage: str, decode: dict) -> None:
        B = batch["captions"].size(0)
        self.log(f"{stage}/loss", self.caption_loss(batch, regularise=False), batch_size=B,
                 sync_dist=True)
        captions = self.generate_captions(self.features(batch), decode)
        for image_id, caption in zip(batch["image_ids"].tolist(), captions):
            self._hyps[image_id] = caption

    def _eval_epoch_end(self, stage: str) -> None:
        hyps = gather_dict(self.trainer, self._hyps)
        self._hyps = {}
        if not hyps:
            return
        refs = self.trainer.datamodule.references(stage)
        refs = {i: [tokenize(c) for c in refs[i]] for i in hyps}
        hyps = {i: tokenize(c) for i, c in hyps.items()}
        cider, _ = cider_d(refs, hyps)
        bleus, _ = bleu(refs, hyps)
        # Same value on every rank (computed from gathered captions): no sync needed.
        self.log(f"{stage}/cider", float(cider), prog_bar=True)
        self.log(f"{stage}/bleu4", float(bleus[3]), prog_bar=True)
        self.log(f"{stage}/num_images", float(len(hyps)))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_decode)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.decode)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # ---- optimisation and checkpoints ---------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval,
                                 "monitor": "val/cider"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint.update(checkpoint_payload(self.model_config, self.tokenizer, self.decode, self.image_size))
