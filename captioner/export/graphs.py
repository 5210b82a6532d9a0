"""The three graphs an export holds, as small nn.Modules with flat tensor inputs and outputs
(ONNX has no dicts): the encoder, the decoder's ``init_state`` and its ``step``.

A decoder state (``models/decoder.py``) is a dict of tensors; its keys, in a fixed order, become
graph input and output names. ``step`` returns only the entries it changes ("moving": the LSTM's
``h``/``c``, the Transformer's growing ``self_k``/``self_v`` cache); the others (the grid and its
projections) pass through unchanged on the caller's side, so they are never copied out of
ONNX Runtime at every step."""

from __future__ import annotations

from torch import Tensor, nn


class EncoderGraph(nn.Module):
    """images (B, 3, S, S), normalised -> features (B, R, C)."""

    def __init__(self, captioner: nn.Module):
        super().__init__()
        self.encoder = captioner.encoder

    def forward(self, images: Tensor) -> Tensor:
        return self.encoder(images)


class InitStateGraph(nn.Module):
    """features (B, R, C) -> the state entries named ``keys``, in that order."""

    def __init__(self, decoder: nn.Module, keys: list[str]):
        super().__init__()
        self.decoder, self.keys = decoder, keys

    def forward(self, features: Tensor) -> tuple[Tensor, ...]:
        state = self.decoder.init_state(features)
        return tuple(state[k] for k in self.keys)


class StepGraph(nn.Module):
    """tokens (N,), state entries ``keys`` -> logits (N, V), attention (N, [H,] R), then the new
    values of the ``moving`` entries, in that order."""

    def __init__(self, decoder: nn.Module, keys: list[str], moving: list[str]):
        super().__init__()
        self.decoder, self.keys, self.moving = decoder, keys, moving

    def forward(self, tokens: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        logits, new, attn = self.decoder.step(tokens, dict(zip(self.keys, state)))
        return (logits, attn, *(new[k] for k in self.moving))
