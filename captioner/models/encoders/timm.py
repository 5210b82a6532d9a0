"""Any ``timm.create_model`` backbone (CNNs, ViTs, Swin, ConvNeXt, EVA, DINOv2/CLIP ViTs in
timm's port ...) with weights from a local file or the local Hugging Face cache: never a
download. ``timm`` is optional (``pip install 'captioner[encoders]'``), imported when used."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from captioner.models.encoders.base import (
    EncoderWeightsError,
    TokenEncoder,
    lazy_import,
    make_preprocess,
    stored_architecture,
)

# Parameters that the features never use once the classifier is gone: what remains of a head
# (ConvNeXt's head norm, a ViT's fc_norm or attention-pooling head) stays frozen.
UNUSED = re.compile(r"^(head|fc|classifier|fc_norm|attn_pool|head_drop)(\.|$)")
HF_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def timm_units(model) -> dict[str, int | None]:
    """Fine-tuning units of a timm model: its own coarse layer groups (``group_matcher``, what
    its layer-wise learning-rate decay uses), in order; what remains of a head (``UNUSED``) None."""
    import timm

    groups = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    of = {n: g for g, names in groups.items() for n in names}
    return {n: (None if UNUSED.match(n) else of.get(n, 0)) for n, _ in model.named_parameters()}


def _hf_cached(repo: str, filename: str | None) -> str | None:
    from huggingface_hub import hf_hub_download

    for f in ([filename] if filename else HF_FILES):
        try:
            return hf_hub_download(repo, f, local_files_only=True)
        except Exception:  # not cached (LocalEntryNotFoundError) or unknown repo
            continue
    return None


def local_pretrained_file(name: str) -> str:
    """The file of ``name``'s pretrained weights (timm's default tag unless the name has one) in
    the local Hugging Face cache or the torch hub cache; one line naming where it belongs if
    absent."""
    timm = lazy_import("timm", "timm")
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise EncoderWeightsError(f"timm model {name!r}: timm knows no pretrained weights for it "
                                  "(model.encoder.pretrained=false, or model.encoder.checkpoint=FILE)")
    cfg = cfg.to_dict()
    if cfg.get("hf_hub_id"):
        found = _hf_cached(cfg["hf_hub_id"], cfg.get("hf_hub_filename"))
        if found:
            return found
    if cfg.get("url"):
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg["url"])
        if path.is_file():
            return str(path)
    where = (f"the Hugging Face cache ({os.environ.get('HF_HUB_CACHE') or '~/.cache/huggingface/hub'},"
             f" repo {cfg['hf_hub_id']})" if cfg.get("hf_hub_id")
             else f"the torch cache ({Path(torch.hub.get_dir()) / 'checkpoints'})")
    raise EncoderWeightsError(
        f"timm model {name!r}: pretrained weights are not in {where} and nothing is downloaded at "
        f"run time: fetch them once with internet (python -c \"import timm; timm.create_model("
        f"'{name}', pretrained=True)\"), or give model.encoder.checkpoint=FILE")


class TimmEncoder(TokenEncoder):
    """A timm model's ``forward_features`` as features (B, R, C): a CNN's last map flattened
    (R = h*w), a vision transformer's patch tokens (R = (S / patch)^2, +1 with
    ``class_token=keep``; register tokens are never regions), a Swin's last stage.

    Args:
        name: a ``timm.create_model`` name, optionally with its pretrained tag
            (``vit_base_patch16_clip_224.openai``, ``convnext_tiny.fb_in22k`` ...).
        pretrained: load timm's pretrained weights for ``name`` from the local Hugging Face cache
            (or torch cache for older timm weights); never downloads.
        checkpoint: a local weights file (.safetensors, .bin, .pth state dict) instead; timm
            adapts it as it does its own downloads (classifier dropped, checkpoint filters).
        class_token: ``drop`` or ``keep`` (as an extra first region); ``keep`` needs one.
        trainable / trainable_layers / finetune_after_epoch / finetune_lr: as ``CNNEncoder``;
            units are timm's own coarse layer groups (``group_matcher``, what its layer-wise
            learning-rate decay uses): for a ViT the stem then each block (the final norm with
            the last), for a CNN the stem then each stage.

    Preprocessing: what timm declares for the weights (``resolve_data_config``: input size,
    interpolation, mean/std, ``crop_pct`` and crop mode). Models with a fixed input size (ViTs,
    Swin) keep theirs; CNNs take ``data.image_size``.
    """

    def __init__(
        self,
        name: str = "resnet18",
        pretrained: bool = False,
        checkpoint: str | None = None,
        class_token: str = "drop",
        trainable: bool = False,
        trainable_layers: int | None = None,
        finetune_after_epoch: int | None = None,
        finetune_lr: float | None = None,
    ):
        super().__init__()
        timm = lazy_import("timm", "timm")
        file = None
        if stored_architecture() is None:  # building from a checkpoint: its weights follow
            if checkpoint is not None:
                if not Path(checkpoint).is_file():
                    raise EncoderWeightsError(
                        f"timm model {name!r}: weights file {checkpoint} not found "
                        "(model.encoder.checkpoint)")
                file = str(checkpoint)
            elif pretrained:
                file = local_pretrained_file(name)
        try:
            # num_classes=0: no classifier; the file (when given) replaces every download source
            self.model = timm.create_model(
                name, pretrained=file is not None, num_classes=0,
                **({"pretrained_cfg_overlay": {"file": file}} if file else {}))
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ValueError(f"model.encoder.name={name!r}: not a timm model") from None
            raise EncoderWeightsError(f"timm model {name!r}: weights {file} do not load "
                                      f"({str(e).splitlines()[0][:200]})") from None
        self.name, self.pretrained, self.checkpoint = name, pretrained, checkpoint
        self.out_dim = self.model.num_features
        self.num_prefix = getattr(self.model, "num_prefix_tokens", 0) or 0
        self.nhwc = getattr(self.model, "output_fmt", "NCHW") == "NHWC"  # Swin-style stages
        cfg = timm.data.resolve_data_config({}, model=self.model)
        size = cfg["input_size"][1:]
        fixed = bool(self.model.pretrained_cfg.get("fixed_input_size", False))
        crop_mode = cfg.get("crop_mode") or "center"
        if crop_mode not in ("center", "squash"):
            raise ValueError(f"timm model {name!r}: crop mode {crop_mode!r} is not supported "
                             "(center, squash)")
        scale = [math.floor(s / cfg["crop_pct"]) for s in size]
        self.preprocess = make_preprocess(
            size, cfg["mean"], cfg["std"], interpolation=cfg["interpolation"],
            resize="shorter" if crop_mode == "center" else "squash",
            resize_size=min(scale) if crop_mode == "center" else scale, any_size=not fixed)
        units = timm_units(self.model)
        has_cls = bool(getattr(self.model, "has_class_token", False)) or (
            getattr(self.model, "cls_token", None) is not None)
        self._setup(units, class_token, has_cls, trainable, trainable_layers,
                    finetune_after_epoch, finetune_lr)

    def tokens(self, images: Tensor) -> tuple[Tensor, int]:
        x = self.model.forward_features(images)  # (B, N, C), or a map
        if x.dim() == 4 and self.nhwc:
            x = x.permute(0, 3, 1, 2)  # (B, h, w, C) -> (B, C, h, w)
        return x, self.num_prefix

    def identity(self) -> dict:
        return {"class": "TimmEncoder", "name": self.name, "pretrained": self.pretrained,
                "checkpoint": self.checkpoint, "class_token": self.class_token}
