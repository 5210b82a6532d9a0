"""Encoder + decoder: the nn.Module a checkpoint holds (plain PyTorch, no Lightning)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from captioner.models.search import generate
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
    ):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder(vocab_size=vocab_size, encoder_dim=encoder.out_dim, pad_id=pad_id)
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id

    def encode(self, images: Tensor) -> Tensor:
        return self.encoder(images)  # (B, R, C)

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        return self.decoder(self.encode(images), tokens)

    @torch.no_grad()
    def generate(self, images: Tensor | None = None, features: Tensor | None = None,
                 precision: str | None = None, **decode):
        """Token ids (B, L) (no BOS, EOS kept, pad after) and attention (B, L, R).

        ``precision``: ``"auto"`` the fast one for this device (``utils.hardware``: bf16 only
        where it is native), ``"bf16"`` / ``"fp16"`` encoder and search under that autocast
        (scores are still accumulated in float32), ``"fp32"`` float32 even inside an autocast
        region, ``None`` as the caller runs (e.g. under Lightning's ``trainer.precision``)."""
        if precision not in (None, *DECODE_PRECISIONS):
            raise ValueError(f"decode.precision={precision!r}: one of {list(DECODE_PRECISIONS)} or null")
        device = (images if features is None else features).device
        precision = resolve_decode_precision(precision, device.type)
        if precision is None:
            scope = nullcontext()
        else:
            dtype = torch.float16 if precision == "fp16" else torch.bfloat16
            scope = torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")
        with scope:
            if features is None:
                features = self.encode(images)
            if precision == "fp32":  # e.g. grids encoded under a caller's bf16 autocast
                features = features.float()
            tokens, attn = generate(
                self.decoder, features, bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id,
                **decode,
            )
        return tokens, attn.float()
