"""Captioning with a trained model: a data loader's images, or image files from disk."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from captioner.data.images import ImageLoadError, build_transform, load_image
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
                  batch_size: int = 16, preprocess: dict | None = None) -> list[dict]:
    """Caption image files, one result per path in order. A caption: ``path``, ``caption``,
    ``words`` and per-word attention ``attention`` (L, R) for pictures of where the model looked.
    An image that cannot be read does not stop the others: its result is ``path`` and
    ``error`` (the one-line message naming it). ``preprocess``: the checkpoint's stored one
    (None: ImageNet statistics at ``image_size``, as checkpoints written before it were fed)."""
    model.eval()
    transform = build_transform(image_size, preprocess=preprocess)
    results: list[dict] = []
    loaded = []  # (index into results, image tensor) of the readable images
    for p in paths:
        try:
            loaded.append((len(results), transform(load_image(p))))
            results.append({"path": str(p)})
        except ImageLoadError as e:
            results.append({"path": str(p), "error": str(e)})
    for start in range(0, len(loaded), batch_size):
        chunk = loaded[start : start + batch_size]
        images = torch.stack([image for _, image in chunk])  # (B, 3, S, S)
        tokens, attn = model.generate(images, **decode)  # (B, L), (B, L, R)
        for (i, _), row, a in zip(chunk, tokens.tolist(), attn):
            caption = decode_ids(tokenizer, row)
            n = len(caption.split())
            results[i].update(caption=caption, words=caption.split(), attention=a[:n])
    return results
