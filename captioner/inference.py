"""Captioning with a trained model: a data loader's images, or image files from disk."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

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
def caption_loader(model, tokenizer, loader: Iterable[dict], decode: dict,
                   progress: bool = True) -> dict[int, str]:
    """{image_id: caption} for every image of a ``CaptionDataModule`` loader (a progress bar with
    elapsed and remaining time on stderr when ``progress``)."""
    model.eval()
    out = {}
    for batch in tqdm(loader, desc="captioning", unit="batch", disable=not progress,
                      dynamic_ncols=True):
        if "features" in batch:  # a data module serving cached encoder features
            tokens, _ = model.generate(features=batch["features"], **decode)
        elif "trunk" in batch:  # or a frozen trunk's maps (the encoder's last blocks run here)
            tokens, _ = model.generate(features=model.encoder.from_trunk(batch["trunk"]), **decode)
        else:
            tokens, _ = model.generate(batch["images"], **decode)
        for image_id, row in zip(batch["image_ids"].tolist(), tokens.tolist()):
            out[image_id] = decode_ids(tokenizer, row)
    return out


@torch.no_grad()
def caption_images(model, tokenizer, images: list, image_size: int, decode: dict,
                   num_return: int = 1, preprocess: dict | None = None) -> list[dict]:
    """Caption PIL images (any size; already RGB, as ``load_image`` gives them) in one batched
    search. One result per image: ``caption``, ``words``, ``score``, per-word ``attention``
    (L, R) of the best caption and ``alternatives`` (the ``num_return`` best hypotheses, best
    first: ``caption``, ``score``; hypotheses the search could not fill are left out).
    ``preprocess``: the checkpoint's stored one (``caption_files``)."""
    model.eval()
    transform = build_transform(image_size, preprocess=preprocess)
    batch = torch.stack([transform(image) for image in images])  # (B, 3, S, S)
    tokens, attn, scores = model.generate(batch, num_return=num_return, **decode)
    # tokens (B, N, L), attn (B, L, R), scores (B, N)
    results = []
    for rows, a, row_scores in zip(tokens.tolist(), attn, scores.tolist()):
        alternatives = [{"caption": decode_ids(tokenizer, row), "score": score}
                        for row, score in zip(rows, row_scores) if score != float("-inf")]
        best = alternatives[0] if alternatives else {"caption": "", "score": float("-inf")}
        words = best["caption"].split()
        results.append({"caption": best["caption"], "words": words, "score": best["score"],
                        "attention": a[: len(words)], "alternatives": alternatives})
    return results


@torch.no_grad()
def caption_files(model, tokenizer, paths: list, image_size: int, decode: dict,
                  batch_size: int = 16, preprocess: dict | None = None) -> list[dict]:
    """Caption image files, one result per path in order. A caption: ``path``, ``caption``,
    ``words`` and per-word attention ``attention`` (L, R) for pictures of where the model looked
    (and ``score``, ``alternatives`` as ``caption_images`` gives them).
    An image that cannot be read does not stop the others: its result is ``path`` and
    ``error`` (the one-line message naming it). ``preprocess``: the checkpoint's stored one
    (None: ImageNet statistics at ``image_size``, as checkpoints written before it were fed)."""
    results = [{"path": str(p)} for p in paths]
    # images are read one batch at a time: a long list of big photos never sits in memory
    for start in range(0, len(paths), batch_size):
        loaded = []  # (index into results, image) of this batch's readable images
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                loaded.append((i, load_image(paths[i])))
            except ImageLoadError as e:
                results[i]["error"] = str(e)
        if loaded:
            captions = caption_images(model, tokenizer, [image for _, image in loaded],
                                      image_size, decode, preprocess=preprocess)
            for (i, _), caption in zip(loaded, captions):
                results[i].update(caption)
    return results
