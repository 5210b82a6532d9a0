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
from captioner.models.encoders import encoder_param_groups
from captioner.training.schedules import build_scheduler, scheduled_sampling_prob
from captioner.training.scst import CaptionReward, rewards_and_baseline, self_critical_loss


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


def attention_penalty(attn: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Doubly stochastic attention regularisation (Show, Attend and Tell): every region should
    receive about one unit of attention over the caption. attn (N, T, R), real (N, T) the
    non-pad positions; returns mean over (N, R) of (1 - sum_t attn)^2."""
    coverage = (attn * real.unsqueeze(-1)).sum(1)  # (N, R)
    return ((1.0 - coverage) ** 2).mean()


class CaptioningModule(L.LightningModule):
    """Args:
        model: the ``Captioner`` (encoder + decoder).
        tokenizer: the run's tokenizer (saved inside every checkpoint).
        model_config: the plain-data config that rebuilds ``model`` (saved in checkpoints).
        optimizer / scheduler: factories (Hydra ``_partial_``) taking params / optimizer.
        decode: generation settings for test; val_decode: for per-epoch validation metrics.
        alpha_c: doubly stochastic attention regularisation (Show, Attend and Tell); None: the
            decoder's ``default_alpha_c`` (1 for the LSTM-attention decoder, 0 for the Transformer).
        label_smoothing: cross-entropy label smoothing.
        scheduled_sampling: ``{start, increase, every, max_prob}`` (see
            ``schedules.scheduled_sampling_prob``; None or max_prob 0: off): teacher forcing
            with some input tokens replaced by the model's own sampled predictions (the model's
            ``forward(..., ss_prob=)``), the fraction ramping per epoch.
        scst: ``{num_samples, baseline: greedy|mean, max_length, temperature, bleu_weight}`` or
            None: self-critical training with the CIDEr-D (+ ``bleu_weight`` x BLEU-4) reward
            instead of cross-entropy.
        image_size: the training image size, stored so that captioning resizes the same way.
        preprocess: the whole input transform the encoder was trained on
            (``CaptionDataModule.preprocess``), stored in checkpoints for captioning.
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
        alpha_c: float | None = None,
        label_smoothing: float = 0.0,
        scheduled_sampling: dict | None = None,
        scst: dict | None = None,
        image_size: int = 224,
        preprocess: dict | None = None,
    ):
        super().__init__()
        self.model, self.tokenizer, self.model_config = model, tokenizer, model_config
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.scheduler_interval = scheduler_interval
        self.decode = dict(decode or {"method": "greedy", "max_length": 20})
        self.val_decode = dict(val_decode or self.decode)
        self.alpha_c = model.decoder.default_alpha_c if alpha_c is None else alpha_c
        self.label_smoothing = label_smoothing
        self.image_size = image_size
        self.preprocess = dict(preprocess) if preprocess else None
        self.scheduled_sampling = dict(scheduled_sampling) if scheduled_sampling else None
        self.scst = {"num_samples": 5, "baseline": "greedy", "max_length": 20, "temperature": 1.0,
                     "bleu_weight": 0.0, **scst} if scst else None
        # plain dicts, not the config nodes passed in: checkpoints must load with weights_only
        self.save_hyperparameters(ignore=["model", "tokenizer", "optimizer", "scheduler",
                                          "scheduled_sampling", "scst"])
        self.hparams.update(scheduled_sampling=self.scheduled_sampling, scst=self.scst)
        self._hyps: dict[int, str] = {}
        self.ss_prob = 0.0  # scheduled-sampling probability of the current epoch
        self.reward: CaptionReward | None = None  # built from the training references at fit start

    # ---- loss -------------------------------------------------------------------------------
    def features(self, batch: dict) -> torch.Tensor:
        """Region features (B, R, C): cached ones when the data module provides them."""
        if "features" in batch:
            return batch["features"]
        if "trunk" in batch:  # the frozen trunk's cached maps: the trainable blocks run here
            return self.model.encoder.from_trunk(batch["trunk"])
        return self.model.encode(batch["images"])

    def caption_loss(self, batch: dict, regularise: bool = True, ss_prob: float = 0.0,
                     features: torch.Tensor | None = None) -> torch.Tensor:
        captions = batch["captions"]  # (B, k, T)
        B, k, T = captions.shape
        tokens = captions.view(B * k, T)
        features = self.features(batch) if features is None else features
        # (B*k, T-1, V), (B*k, T-1, R)
        logits, attn = self.model(None, tokens[:, :-1], features=features, ss_prob=ss_prob)
        targets = tokens[:, 1:]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
            ignore_index=self.model.pad_id, label_smoothing=self.label_smoothing,
        )
        if regularise and self.alpha_c > 0:
            loss = loss + self.alpha_c * attention_penalty(attn, targets != self.model.pad_id)
        return loss

    def self_critical_loss(self, batch: dict) -> torch.Tensor:
        """Sample ``num_samples`` captions per image, reward them (``CaptionReward``) against the image's
        references and reinforce those that beat the baseline (``training/scst.py``)."""
        cfg, decoder = self.scst, self.model.decoder
        features = self.features(batch)  # (B, R, C)
        image_ids = batch["image_ids"].tolist()
        # (B*S, L) image-major samples, log-probs with grad, real-position mask
        tokens, logprobs, mask = self.model.sample(
            features=features, num_samples=cfg["num_samples"], max_length=cfg["max_length"],
            temperature=cfg["temperature"],
        )  # fmt: skip
        greedy = None
        if cfg["baseline"] == "greedy":  # test-time inference: no dropout, no length floor
            decoder.eval()
            greedy_tokens, _ = self.model.generate(features=features.detach(), method="greedy",
                                                   max_length=cfg["max_length"], min_length=0)
            decoder.train()
            greedy = self.decode_tokens(greedy_tokens)
        reward, baseline = rewards_and_baseline(
            self.reward, self.decode_tokens(tokens), image_ids, cfg["num_samples"],
            cfg["baseline"], greedy, device=logprobs.device,
        )  # fmt: skip
        B = len(image_ids)
        self.log("train/reward", reward.mean(), prog_bar=True, batch_size=B)
        self.log("train/reward_baseline", baseline.mean(), batch_size=B)
        return self_critical_loss(logprobs, mask, reward, baseline)

    def on_fit_start(self) -> None:
        if self.scst is not None and self.reward is None:
            self.reward = CaptionReward(self.trainer.datamodule.references("train"),
                                        bleu_weight=self.scst["bleu_weight"])

    def on_train_epoch_start(self) -> None:
        encoder = self.model.encoder
        after = getattr(encoder, "finetune_after_epoch", None)
        if after is not None and self.current_epoch >= after:  # idempotent, also after a resume
            encoder.set_trainable(encoder.trainable_layers)
        if self.scheduled_sampling and self.scheduled_sampling.get("max_prob", 0) > 0:
            self.ss_prob = scheduled_sampling_prob(self.current_epoch, **self.scheduled_sampling)
            self.log("train/ss_prob", self.ss_prob)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.scst is not None:
            loss = self.self_critical_loss(batch)
        else:
            loss = self.caption_loss(batch, ss_prob=self.ss_prob)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["captions"].size(0))
        return loss

    # ---- generation metrics -----------------------------------------------------------------
    def decode_tokens(self, tokens: torch.Tensor) -> list[str]:
        return [decode_ids(self.tokenizer, row) for row in tokens.tolist()]

    def generate_captions(self, features: torch.Tensor, decode: dict) -> list[str]:
        tokens, _ = self.model.generate(features=features, **decode)
        return self.decode_tokens(tokens)

    def _eval_step(self, batch: dict, stage: str, decode: dict) -> None:
        B = batch["captions"].size(0)
        features = self.features(batch)  # encode once for the loss and the captions
        self.log(f"{stage}/loss", self.caption_loss(batch, regularise=False, features=features),
                 batch_size=B, sync_dist=True)
        captions = self.generate_captions(features, decode)
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
        # The encoder's tunable weights get their own group (own lr) from the start, even while
        # frozen: parameters without gradients are skipped, so unfreezing needs no rebuild.
        encoder_groups = encoder_param_groups(self.model.encoder)
        in_encoder = {id(p) for g in encoder_groups for p in g["params"]}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in in_encoder]
        optimizer = self.optimizer_factory(params=[{"params": rest}, *encoder_groups])
        if self.scheduler_factory is None:
            return optimizer
        # warm-up schedules from transformers need the run's length: known once the trainer is
        scheduler = build_scheduler(self.scheduler_factory, optimizer,
                                    self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval,
                                 "monitor": "val/cider"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        encoder = self.model.encoder
        checkpoint.update(checkpoint_payload(
            self.model_config, self.tokenizer, self.decode, self.image_size, self.preprocess,
            encoder.architecture() if hasattr(encoder, "architecture") else None))
