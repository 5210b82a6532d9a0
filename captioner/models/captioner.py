"""Encoder + decoder: the nn.Module a checkpoint holds (plain PyTorch, no Lightning).

It owns every way of running the decoder: teacher forcing (``forward``, optionally with
scheduled sampling), sampling for self-critical training (``sample``) and inference
(``generate``). Each takes images, or the encoder's features (B, R, C) when they are at hand
(cached, or shared with another call)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from captioner.models.scheduled_sampling import scheduled_sampling
from captioner.models.search import generate, sample, vocabulary_bans
from captioner.utils.hardware import DECODE_PRECISIONS, resolve_decode_precision


class Captioner(nn.Module):
    """``decoder`` is a factory (a Hydra ``_partial_``) completed with the vocabulary size and the
    encoder's channel count, which are only known once the tokenizer and encoder exist."""

    def __init__(
        self,
        encoder: nn.Module,
        decoder: Callable[..., nn.Module],
        vocab_size: int,
        pad_id: int,
        bos_id: int,
        eos_id: int,
        unk_id: int | None = None,
        bad_ending_ids: list[int] | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder(vocab_size=vocab_size, encoder_dim=encoder.out_dim, pad_id=pad_id)
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        # vocabulary facts for the search's bans (``search.py``), from ``tokenizer.with_vocabulary``
        self.unk_id, self.bad_ending_ids = unk_id, list(bad_ending_ids or ())

    def _bans(self, ban_unk: bool, ban_bad_endings: bool) -> dict:
        return vocabulary_bans(self.unk_id, self.bad_ending_ids, ban_unk, ban_bad_endings)

    def encode(self, images: Tensor) -> Tensor:
        return self.encoder(images)  # (B, R, C)

    def _features(self, images: Tensor | None, features: Tensor | None) -> Tensor:
        if (images is None) == (features is None):
            raise ValueError("pass exactly one of images and features")
        return self.encode(images) if features is None else features  # (B, R, C)

    def forward(self, images: Tensor | None, tokens: Tensor, *, features: Tensor | None = None,
                ss_prob: float = 0.0) -> tuple[Tensor, Tensor]:
        """Teacher forcing: tokens (B*k, T) inputs (BOS first), k captions per image ->
        logits (B*k, T, V), attention (B*k, T, R) (heads averaged). With ``ss_prob`` > 0 each
        input after BOS is the model's own sampled prediction with that probability
        (scheduled sampling, step by step; ``models/scheduled_sampling.py``)."""
        features = self._features(images, features)
        if ss_prob > 0:
            return scheduled_sampling(self.decoder, features, tokens, ss_prob)
        return self.decoder(features, tokens)

    def sample(self, images: Tensor | None = None, features: Tensor | None = None,
               num_samples: int = 5, max_length: int = 20, temperature: float = 1.0,
               ban_unk: bool = True, ban_bad_endings: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """``num_samples`` captions per image for self-critical training, with gradients:
        tokens, their log-probs and the real-position mask, each (B*S, L), image-major
        (``search.sample``; ``<unk>`` and bad endings banned as in ``generate``)."""
        return sample(
            self.decoder, self._features(images, features), self.bos_id, self.eos_id,
            self.pad_id, num_samples=num_samples, max_length=max_length, temperature=temperature,
            **self._bans(ban_unk, ban_bad_endings),
        )  # fmt: skip

    @torch.no_grad()
    def generate(self, images: Tensor | None = None, features: Tensor | None = None,
                 precision: str | None = None, ban_unk: bool = True,
                 ban_bad_endings: bool = True, **decode):
        """Token ids (B, L) (no BOS, EOS kept, pad after) and attention (B, L, R); with
        ``num_return=N`` also the N best hypotheses and their scores (``search.generate``).

        ``ban_unk``: never choose ``<unk>``; ``ban_bad_endings``: never end right after an
        article or preposition (both need the ids this model was built with; ``search.py``).

        ``precision``: ``"auto"`` the fast one for this device (``utils.hardware``: bf16 only
        where it is native), ``"bf16"`` / ``"fp16"`` encoder and search under that autocast
        (scores are still accumulated in float32), ``"fp32"`` float32 even inside an autocast
        region, ``None`` as the caller runs (e.g. under Lightning's ``trainer.precision``)."""
        if precision not in (None, *DECODE_PRECISIONS):
            raise ValueError(f"decode.precision={precision!r}: one of {list(DECODE_PRECISIONS)} or null")
        device = (features if images is None else images).device
        precision = resolve_decode_precision(precision, device.type)
        if precision is None:
            scope = nullcontext()
        else:
            dtype = torch.float16 if precision == "fp16" else torch.bfloat16
            scope = torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")
        with scope:
            features = self._features(images, features)
            if precision == "fp32":  # e.g. features encoded under a caller's bf16 autocast
                features = features.float()
            tokens, attn, *scores = generate(
                self.decoder, features, bos_id=self.bos_id,
                eos_id=self.eos_id, pad_id=self.pad_id, **self._bans(ban_unk, ban_bad_endings),
                **decode,
            )  # fmt: skip
        # scores only with ``num_return`` (``search.generate``): tokens (B, N, L), scores (B, N)
        return (tokens, attn.float(), *(s.float() for s in scores))
