"""Captioning with a trained model: a data loader's images, or image files from disk."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from captioner.data.images import build_transform, load_image
from captioner.data.tokenizer import decode as decode_ids


def decode_settings(*layers: dict) -> dict:
    """Decoding settings from layers of increasing priority (a checkpoint's, then the user's),
    where None means "not set"; ``precision`` defaults to ``auto`` (bf16 only where the hardware
    runs it natively, ``utils.hardware``)."""
    out = {"precision": "auto"}
    for layer in layers:
        out.update({k: v for k, v in (layer or {}).items() if v is not None})
    return out


@torch.no_grad()
def caption_loader(model, tokenizer, loader: Iterable[dict], decode: dict) -> dict[int, str]:
    """{image_id: caption} for every image of a ``CaptionDataModule`` loader."""
    model.eval()
    out = {}
    for batch in loader:
        if "features" in batch:  # a data module serving cached encoder features
            tokens, _ = model.generate(features=batch["features"], **decode)
        else:
            tokens, _ = model.generate(batch["images"], **decode)
        for image_id, row in zip(batch["image_ids"].tolist(), tokens.tolist()):
            out[image_id] = decode_ids(tokenizer, row)
    return out


@torch.no_grad()
def caption_files(model, tokenizer, paths: list, image_size: int, decode: dict,
                  batch_size: int = 16) -> list[dict]:
    """Caption image files. Each result: ``path``, ``caption``, ``words`` and per-word attention
    ``attention`` (L, R) for pictures of where the model looked."""
    model.eval()
    transform = build_transform(image_size)
    results = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = torch.stack([transform(load_image(p)) for p in chunk])  # (B, 3, S, S)
        tokens, attn = model.generate(images, **decode)  # (B, L), (B, L, R)
        for p, row, a in zip(chunk, tokens.tolist(), attn):
            caption = decode_ids(tokenizer, row)
            n = len(caption.split())
            results.append({"path": str(p), "caption": caption, "words": caption.split(),
                            "attention": a[:n]})
    return results
