"""Self-contained checkpoints: weights + model config + tokenizer + decoding settings, all plain
data, so ``torch.load(weights_only=True)`` reads them and a checkpoint alone can caption.

Every way a file can fail to be one (missing, a directory, not a torch file, truncated, unsafe
pickle, a Lightning checkpoint without our payload, another format version, weights that do not
fit the stored config, a config that differs from the one a resumed run asks for) is a
``CheckpointError`` naming the file."""

from __future__ import annotations

from pathlib import Path

import torch

from captioner.data.tokenizer import tokenizer_from_json, tokenizer_to_json, with_vocabulary
from captioner.utils.errors import InputError

FORMAT_VERSION = 1
KEY = "captioner"
PAYLOAD_FIELDS = ("format_version", "model_config", "tokenizer", "decode", "image_size")


class CheckpointError(InputError, RuntimeError):
    """A file that is not a usable captioner checkpoint; the message names it."""


def checkpoint_payload(model_config: dict, tokenizer, decode: dict, image_size: int,
                       preprocess: dict | None = None, encoder: dict | None = None) -> dict:
    """``preprocess``: the input the encoder was trained on (``data/images.py``), so captioning
    feeds the same; ``encoder``: what rebuilds the encoder without its original files (its
    ``architecture()``: a Hugging Face config, an open_clip model config). Both optional:
    checkpoints written before them load as before (ImageNet statistics at ``image_size``)."""
    payload = {"format_version": FORMAT_VERSION, "model_config": model_config,
               "tokenizer": tokenizer_to_json(tokenizer), "decode": dict(decode),
               "image_size": int(image_size)}
    if preprocess is not None:
        payload["preprocess"] = dict(preprocess)
    if encoder is not None:
        payload["encoder"] = dict(encoder)
    return {KEY: payload}


def save_checkpoint(path, model: torch.nn.Module, model_config: dict, tokenizer, decode: dict,
                    image_size: int, preprocess: dict | None = None) -> Path:
    """Write a model built outside training (``build_model``, a script, a test) as a checkpoint
    that ``load_checkpoint``, ``caption.py`` and the server read like a trained run's: the
    weights under Lightning's ``state_dict`` names (``model.``) plus the payload. Written
    atomically: a kill leaves the old file or the new one."""
    import io

    from captioner.utils.io import atomic_write_bytes

    buffer = io.BytesIO()
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                **checkpoint_payload(model_config, tokenizer, decode, image_size, preprocess)},
               buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def build_model(model_config: dict, stored_encoder: dict | None = None):
    """The model of a stored (or composed) model config. Only the allowlisted model classes can
    be built, and the config is checked as data before any of them runs
    (``models/build.py``): a checkpoint's config cannot call anything else. ``stored_encoder``
    (a checkpoint's ``encoder`` record, ``{}`` for none): build for the checkpoint's weights,
    without the encoder's pretrained files."""
    from captioner.models.build import ModelConfigError, build_captioner

    try:
        return build_captioner(model_config, stored_encoder)
    except ModelConfigError as e:
        raise CheckpointError(f"model config refused: {e}") from None


def read_checkpoint(path, map_location="cpu") -> dict:
    """The whole checkpoint dict (Lightning state + our payload under ``KEY``), checked to be a
    captioner checkpoint of this format version. Loaded with ``weights_only=True``: a checkpoint
    cannot run code."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # not a torch file, truncated, or contents that are not plain data
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: not a readable checkpoint: truncated, not a torch file, or "
                              f"holding objects other than plain data ({type(e).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    payload = ckpt.get(KEY)
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: a Lightning checkpoint without the '{KEY}' payload "
                              "(not saved by captioner's training)")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version}, this captioner reads {FORMAT_VERSION}")
    missing = [k for k in PAYLOAD_FIELDS if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: '{KEY}' payload lacks {missing}")
    return ckpt


def _flatten(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def check_same_model_config(path, stored: dict, wanted: dict) -> None:
    """Resuming needs the checkpoint's architecture: name every key that differs."""
    a, b = _flatten(stored), _flatten(wanted)
    diff = [f"model.{k}: checkpoint {a.get(k, '<absent>')!r}, config {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]
    if diff:
        raise CheckpointError(f"{path}: saved for a different model config; " + "; ".join(diff[:10])
                              + (f"; and {len(diff) - 10} more" if len(diff) > 10 else ""))


def load_weights(path, model: torch.nn.Module, state_dict: dict) -> None:
    """``model.load_state_dict`` with an error naming the missing, unexpected and mis-shaped
    tensors instead of torch's multi-page message."""
    own = model.state_dict()
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
              if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    problems = ([f"shapes differ (checkpoint vs model): {', '.join(shapes[:5])}"] if shapes else []) \
        + ([f"missing: {', '.join(missing[:5])}"] if missing else []) \
        + ([f"unexpected: {', '.join(unexpected[:5])}"] if unexpected else [])
    if problems:
        raise CheckpointError(f"{path}: weights do not fit the model config: " + "; ".join(problems))
    model.load_state_dict(state_dict)


def load_checkpoint(path, map_location="cpu"):
    """-> (model in eval mode, tokenizer, payload: ``decode``, ``image_size``, ``model_config``,
    ``preprocess`` when stored: ``data.images.checkpoint_transform(payload)`` feeds the model
    what it was trained on). The encoder's pretrained files are not needed: the checkpoint holds
    every weight."""
    ckpt = read_checkpoint(path, map_location)
    payload = ckpt[KEY]
    config = payload["model_config"]
    try:
        stored = payload.get("encoder")
        model = build_model(config, stored if isinstance(stored, dict) else {})
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # hydra's InstantiationException and friends
        raise CheckpointError(f"{path}: stored model config does not build: {str(e).splitlines()[0][:300]}") from None
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    load_weights(path, model, state)
    try:
        tokenizer = tokenizer_from_json(payload["tokenizer"])
    except Exception as e:
        raise CheckpointError(f"{path}: stored tokenizer does not load ({type(e).__name__}: {e})") from None
    if "unk_id" not in config:
        # saved before the search banned <unk> and bad endings: their ids come from its tokenizer
        vocab = with_vocabulary({}, tokenizer)
        model.unk_id, model.bad_ending_ids = vocab["unk_id"], vocab["bad_ending_ids"]
    return model.eval(), tokenizer, payload


def load_checkpoints(paths, map_location="cpu"):
    """One checkpoint (a path) as ``load_checkpoint``; several (a list) as one ensemble
    (``models/ensemble.py``) -> (model, tokenizer, payload). The ensemble's payload is the first
    checkpoint's (its decoding settings, input size, preprocessing) with ``ensemble``: the paths,
    and ``ensemble_model_configs``: each member's model config.
    The members must share the vocabulary and the input: a checkpoint that does not is named."""
    import json

    from captioner.data.images import checkpoint_transform, resolve_preprocess
    from captioner.models.ensemble import ConcatEncoder, ensemble

    paths = [str(paths)] if isinstance(paths, (str, Path)) else [str(p) for p in paths]
    if not paths:
        raise CheckpointError("no checkpoint given")
    if len(paths) == 1:
        return load_checkpoint(paths[0], map_location)
    loaded = [load_checkpoint(p, map_location) for p in paths]
    model, tokenizer, payload = loaded[0]
    for path, (_, other_tok, other) in zip(paths[1:], loaded[1:]):
        if other_tok.get_vocab() != tokenizer.get_vocab():
            raise CheckpointError(f"{path}: its vocabulary differs from {paths[0]}'s; ensemble "
                                  "members must be trained with the same tokenizer")
        # the input each model was trained on, as fed (a checkpoint older than stored
        # preprocessing reads ImageNet statistics at its size: the same as an explicit record)
        if repr(checkpoint_transform(other)) != repr(checkpoint_transform(payload)):
            raise CheckpointError(f"{path}: its input ({other.get('image_size')} px, "
                                  f"{other.get('preprocess')}) differs from {paths[0]}'s "
                                  f"({payload.get('image_size')} px, {payload.get('preprocess')}); "
                                  "ensemble members must read the same input")
    # the stored encoder config says what the weights alone do not (which grid, class token)
    keys = [json.dumps(p["model_config"].get("encoder"), sort_keys=True, default=str)
            for _, _, p in loaded]
    try:
        joined = ensemble([m for m, _, _ in loaded], keys)
        if isinstance(joined.encoder, ConcatEncoder):
            # distinct encoders must give one grid: find out now, not mid-run, at the size fed
            height, width = resolve_preprocess(payload.get("preprocess"), payload["image_size"])["size"]
            with torch.no_grad():
                joined.encoder(torch.zeros(1, 3, height, width))
    except ValueError as e:
        raise CheckpointError(f"{', '.join(paths)}: {e}") from None
    return joined.eval(), tokenizer, {**payload, "ensemble": paths,
                                      "ensemble_model_configs": [p["model_config"] for _, _, p in loaded]}
