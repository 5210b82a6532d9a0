"""Hugging Face vision models through ``transformers``: the vision tower of CLIP and SigLIP,
DINOv2, ViT (any ``AutoModel`` whose output is a token sequence), read from a local folder or the
local Hugging Face cache only (``local_files_only=True``): never a download."""

from __future__ import annotations

import json
import os
import re

from torch import Tensor

from captioner.models.encoders.base import (
    FINAL,
    EncoderWeightsError,
    TokenEncoder,
    make_preprocess,
    stored_architecture,
)

LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")
UNUSED = re.compile(r"(?:^|\.)(pooler|head)\.|(?:^|\.)mask_token$")  # never reach the features
FINAL_NORM = re.compile(r"(?:^|\.)(post_layernorm|layernorm|final_layernorm|norm)\.")
# Pillow resampling codes of image processors, as interpolation names.
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
# Models whose last_hidden_state comes before the final LayerNorm (CLIP applies it to the pooled
# class token only): we apply it to every token, as open_clip's CLIP does.
NORM_AFTER = {"clip_vision_model": "post_layernorm"}
NO_CLASS_TOKEN = ("siglip_vision_model", "siglip2_vision_model")  # SigLIP pools with attention
NOT_CACHED = ("fetch it once with internet: huggingface-cli download {path} (or hf download "
              "{path}), or give model.encoder.path=FOLDER holding config.json, the weights and "
              "preprocessor_config.json (what save_pretrained writes)")


def _where(path: str) -> str:
    if os.path.isdir(path):
        return f"folder {path}"
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return f"the local Hugging Face cache ({cache})"


def preprocess_from_processor(proc: dict, path: str) -> dict:
    """``make_preprocess`` from an image processor's settings (``preprocessor_config.json``)."""
    def fail(what):
        return ValueError(f"Hugging Face model {path}: image processor {what} is not supported")

    size = proc.get("size") or {}
    interpolation = RESAMPLE.get(int(proc.get("resample", 2)))
    if interpolation is None:
        raise fail(f"resample={proc.get('resample')}")
    if proc.get("do_rescale", True) and abs(float(proc.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise fail(f"rescale_factor={proc.get('rescale_factor')}")
    normalize = proc.get("do_normalize", True)
    mean = proc.get("image_mean") if normalize else (0.0, 0.0, 0.0)
    std = proc.get("image_std") if normalize else (1.0, 1.0, 1.0)
    crop = proc.get("crop_size") if proc.get("do_center_crop") else None
    crop = [crop["height"], crop["width"]] if crop else None
    if "shortest_edge" in size:
        if crop is None:
            raise fail("resize without a centre crop (images of varying size)")
        return make_preprocess(crop, mean, std, interpolation, "shorter", size["shortest_edge"])
    if "height" in size and "width" in size:
        resize = [size["height"], size["width"]]
        return make_preprocess(crop or resize, mean, std, interpolation, "squash", resize)
    raise fail(f"size={size}")


class HFEncoder(TokenEncoder):
    """A Hugging Face vision model's last hidden states as features (B, R, C): its patch tokens
    (R = (S / patch)^2; DINOv2's register tokens are never regions), with ``class_token=keep`` the
    class token as an extra first region (SigLIP has none). CLIP's tokens get its final LayerNorm.

    Args:
        path: a folder written by ``save_pretrained`` (config.json, weights,
            preprocessor_config.json), or a hub id (``openai/clip-vit-base-patch16``,
            ``google/siglip-base-patch16-224``, ``facebook/dinov2-small``,
            ``google/vit-base-patch16-224-in21k``) already in the local Hugging Face cache.
            For a CLIP or SigLIP checkpoint only the vision tower is loaded.
        pretrained: load the weights (false: the architecture with random weights).
        class_token: ``drop`` or ``keep``.
        trainable / trainable_layers / finetune_after_epoch / finetune_lr: as ``CNNEncoder``;
            units: the embeddings (patch, position, class token), each transformer layer, the
            final norm.

    Preprocessing: the model's image processor (size, resize, centre crop, resampling,
    mean/std). Its input size is fixed (the position embeddings'): ``data.image_size`` is not used.
    """

    def __init__(
        self,
        path: str = "openai/clip-vit-base-patch16",
        pretrained: bool = True,
        class_token: str = "drop",
        trainable: bool = False,
        trainable_layers: int | None = None,
        finetune_after_epoch: int | None = None,
        finetune_lr: float | None = None,
    ):
        super().__init__()
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        stored = stored_architecture()
        if stored is not None and "hf_config" in stored:  # from a checkpoint: no files needed
            d = dict(stored["hf_config"])
            config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
            self.model = MODEL_MAPPING[type(config)](config)  # weights: the checkpoint's
            self.preprocess = dict(stored["preprocess"])
        else:
            try:
                config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
                proc = transformers.AutoImageProcessor.from_pretrained(
                    path, local_files_only=True).to_dict()
            except OSError:
                raise EncoderWeightsError(
                    f"Hugging Face model {path}: config.json or preprocessor_config.json not in "
                    f"{_where(path)} and nothing is downloaded at run time: "
                    + NOT_CACHED.format(path=path)) from None
            if getattr(config, "vision_config", None) is not None:  # CLIP, SigLIP: vision tower
                config = config.vision_config
            cls = MODEL_MAPPING[type(config)]
            if pretrained:
                try:
                    self.model = cls.from_pretrained(path, local_files_only=True)
                except OSError:
                    raise EncoderWeightsError(
                        f"Hugging Face model {path}: weights not in {_where(path)} and nothing is "
                        "downloaded at run time: " + NOT_CACHED.format(path=path)) from None
            else:
                self.model = cls(config)
            self.preprocess = preprocess_from_processor(proc, path)
        config = self.model.config
        self.path, self.pretrained = path, pretrained
        self.model_type = config.model_type
        self.out_dim = config.hidden_size
        self.patch_size = config.patch_size
        norm = NORM_AFTER.get(self.model_type)  # transformers 5 flattened vision_model away
        self.final_norm = (None if norm is None else norm if hasattr(self.model, norm)
                           else f"vision_model.{norm}")
        units = {}
        for n, _ in self.model.named_parameters():
            m = LAYER.search(n)
            units[n] = (None if UNUSED.search(n) else int(m.group(1)) + 1 if m
                        else FINAL if FINAL_NORM.search(n) else 0)
        self._setup(units, class_token, self.model_type not in NO_CLASS_TOKEN, trainable,
                    trainable_layers, finetune_after_epoch, finetune_lr)

    def tokens(self, images: Tensor) -> tuple[Tensor, int]:
        x = self.model(pixel_values=images).last_hidden_state  # (B, N, C)
        if self.final_norm:
            x = self.model.get_submodule(self.final_norm)(x)
        p = self.patch_size if isinstance(self.patch_size, int) else self.patch_size[0]
        patches = (images.shape[-2] // p) * (images.shape[-1] // p)
        return x, x.shape[1] - patches  # class token first, then any register tokens

    def architecture(self) -> dict:
        return {"hf_config": json.loads(self.model.config.to_json_string(use_diff=False)),
                "preprocess": self.preprocess}

    def identity(self) -> dict:
        return {"class": "HFEncoder", "path": self.path, "pretrained": self.pretrained,
                "model_type": self.model_type, "class_token": self.class_token}
