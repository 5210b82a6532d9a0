"""Self-contained checkpoints: weights + model config + tokenizer + decoding settings, all plain
data, so ``torch.load(weights_only=True)`` reads them and a checkpoint alone can caption."""

from __future__ import annotations

from pathlib import Path

import torch

from captioner.data.tokenizer import tokenizer_from_json, tokenizer_to_json

FORMAT_VERSION = 1
KEY = "captioner"


class CheckpointError(RuntimeError):
    """A file that is not a usable captioner checkpoint; the message names it."""


def checkpoint_payload(model_config: dict, tokenizer, decode: dict, image_size: int) -> dict:
    return {KEY: {"format_version": FORMAT_VERSION, "model_config": model_config,
                  "tokenizer": tokenizer_to_json(tokenizer), "decode": dict(decode),
                  "image_size": int(image_size)}}


def build_model(model_config: dict):
    """Instantiate a model config; only the project's own classes may be named in it."""
    from hydra.utils import instantiate

    def check(node):
        if isinstance(node, dict):
            target = node.get("_target_")
            if target is not None and not str(target).startswith("captioner."):
                raise CheckpointError(f"model config names a foreign class {target!r}")
            for v in node.values():
                check(v)

    check(model_config)
    return instantiate(model_config)


def load_checkpoint(path, map_location="cpu"):
    """-> (model in eval mode, tokenizer, payload: ``decode``, ``image_size``, ``model_config``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # not a torch file, truncated, or unsafe contents
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or KEY not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a captioner checkpoint (no '{KEY}' payload)")
    payload = ckpt[KEY]
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version}, this captioner reads {FORMAT_VERSION}")
    model = build_model(payload["model_config"])
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model config stored in it: {str(e)[:300]}") from None
    return model.eval(), tokenizer_from_json(payload["tokenizer"]), payload
