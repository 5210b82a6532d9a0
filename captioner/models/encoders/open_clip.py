"""open_clip's image tower (its own ``VisionTransformer``, a timm trunk as in the SigLIP, EVA and
ConvNeXt models, or OpenAI's ``ModifiedResNet``) with weights from a local file, a local folder
or the local Hugging Face cache: never a download. ``open_clip_torch`` is optional
(``pip install 'captioner[encoders]'``), imported when used."""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor

from captioner.models.encoders.base import (
    FINAL,
    EncoderWeightsError,
    TokenEncoder,
    lazy_import,
    make_preprocess,
    stored_architecture,
)

WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
PREPROCESS_KEYS = ("size", "mean", "std", "interpolation", "resize_mode")


def _hf_file(repo: str, filenames) -> str | None:
    from huggingface_hub import hf_hub_download

    for f in filenames:
        try:
            return hf_hub_download(repo, f, local_files_only=True)
        except Exception:  # not cached
            continue
    return None


def _tag_file(open_clip, name: str, tag: str) -> tuple[str, dict]:
    """(local file, preprocessing) of an open_clip pretrained tag, from the Hugging Face cache."""
    cfg = open_clip.pretrained.get_pretrained_cfg(name, tag)
    hub = (cfg.get("hf_hub") or "")
    repo, filename = os.path.split(hub)
    found = _hf_file(repo or hub.rstrip("/"), [filename] if filename else WEIGHT_FILES) if hub else None
    if found is None:
        raise EncoderWeightsError(
            f"open_clip model {name} ({tag}): weights not in the local Hugging Face cache and "
            "nothing is downloaded at run time: fetch them once with internet (python -c \"import "
            f"open_clip; open_clip.create_model('{name}', pretrained='{tag}')\"), or give "
            "model.encoder.pretrained=FILE")
    return found, {k: cfg[k] for k in PREPROCESS_KEYS if k in cfg}


def _vit_unit(name: str) -> int | None:
    """open_clip ``VisionTransformer``: the stem (patch conv, class and position embeddings,
    ``ln_pre``), each residual block, ``ln_post`` with the last; the CLIP projection unused."""
    if name.startswith("transformer.resblocks."):
        return int(name.split(".")[2]) + 1
    if name.startswith("ln_post."):
        return FINAL
    if name == "proj" or name.startswith(("attn_pool", "head")):
        return None  # the CLIP projection of the pooled token: not in the features
    return 0


def _timm_units(visual) -> dict[str, int | None]:
    """open_clip ``TimmModel``: the trunk's units as ``TimmEncoder``'s; open_clip's projection
    head unused."""
    from captioner.models.encoders.timm import timm_units

    units = {f"trunk.{n}": u for n, u in timm_units(visual.trunk).items()}
    units.update({n: None for n, _ in visual.named_parameters() if not n.startswith("trunk.")})
    return units


def _resnet_units(visual) -> dict[str, int | None]:
    """open_clip ``ModifiedResNet``: the stem (three convolutions), then each bottleneck block of
    layer1..layer4 in order; the attention pooling unused."""
    blocks = [f"layer{i}.{j}." for i in range(1, 5) for j in range(len(getattr(visual, f"layer{i}")))]
    units = {}
    for n, _ in visual.named_parameters():
        if n.startswith("attnpool."):
            units[n] = None
        else:
            units[n] = next((k + 1 for k, b in enumerate(blocks) if n.startswith(b)), 0)
    return units


class OpenCLIPEncoder(TokenEncoder):
    """open_clip's image tower as features (B, R, C), before any pooling or CLIP projection:
    a ``VisionTransformer``'s tokens after its final LayerNorm (``ln_post``, the tokens its
    ``output_tokens=True`` returns), R = (S / patch)^2 patches (+1 with ``class_token=keep``),
    C its width; a timm trunk's ``forward_features`` (ViT tokens after the final norm, or a
    ConvNeXt map); a ``ModifiedResNet``'s last stage (R = (S / 32)^2, C = 32 x width).

    Args:
        name: an open_clip model name (``ViT-B-32``, ``ViT-B-16-quickgelu`` for OpenAI weights,
            ``ViT-B-16-SigLIP`` ...), ``local-dir:FOLDER`` (open_clip_config.json + weights) or
            ``hf-hub:org/repo`` already in the local Hugging Face cache.
        config: a model-config JSON file (open_clip's format) registered under its file name,
            for an architecture open_clip does not ship (``name`` is then the file's stem).
        pretrained: a weights file, or an open_clip pretrained tag (``laion2b_s34b_b79k``) whose
            file is in the local Hugging Face cache; null: random weights.
        class_token: ``drop`` or ``keep``.
        trainable / trainable_layers / finetune_after_epoch / finetune_lr: as ``CNNEncoder``;
            units: the stem, then each block (``_vit_unit``, ``_timm_units``,
            ``_resnet_units``).

    Preprocessing: open_clip's preprocess config of the model and weights (size, mean/std,
    interpolation, resize mode). The input size is fixed.
    """

    def __init__(
        self,
        name: str = "ViT-B-32",
        config: str | None = None,
        pretrained: str | None = None,
        class_token: str = "drop",
        trainable: bool = False,
        trainable_layers: int | None = None,
        finetune_after_epoch: int | None = None,
        finetune_lr: float | None = None,
    ):
        super().__init__()
        open_clip = lazy_import("open_clip", "open_clip")
        stored = stored_architecture()
        if stored is not None and "open_clip_config" in stored:  # from a checkpoint
            from open_clip.model import _build_vision_tower

            cfg = stored["open_clip_config"]
            self.model = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"],
                                             quick_gelu=cfg.get("quick_gelu", False))
            self.preprocess = dict(stored["preprocess"])
            self.model_cfg = cfg
        else:
            self._load(open_clip, name, config, pretrained)
        visual = self.model
        self.kind = type(visual).__name__
        self.name, self.config, self.pretrained = name, config, pretrained
        if self.kind == "VisionTransformer" and visual.attn_pool is None:
            self.out_dim, has_cls = visual.transformer.width, True
            units = {n: _vit_unit(n) for n, _ in visual.named_parameters()}
        elif self.kind == "TimmModel":  # a timm trunk (SigLIP, EVA, ConvNeXt towers)
            self.out_dim = visual.trunk.num_features
            has_cls = getattr(visual.trunk, "cls_token", None) is not None
            units = _timm_units(visual)
        elif self.kind == "ModifiedResNet":  # OpenAI's RN50 ... towers
            self.out_dim, has_cls = visual.layer4[-1].conv3.out_channels, False
            units = _resnet_units(visual)
        else:
            raise ValueError(f"open_clip model {name}: its image tower ({self.kind}) gives no "
                             "region features here (supported: VisionTransformer without "
                             "attention pooling, timm trunks, ModifiedResNet)")
        self._setup(units, class_token, has_cls, trainable, trainable_layers, finetune_after_epoch,
                    finetune_lr)

    def _load(self, open_clip, name, config, pretrained) -> None:
        force = {}
        if config is not None:
            if not Path(config).is_file():
                raise EncoderWeightsError(f"open_clip model config {config} not found "
                                          "(model.encoder.config)")
            open_clip.add_model_config(config)
        if name.startswith("hf-hub:"):  # the cached snapshot folder, read as a local folder
            from huggingface_hub import snapshot_download

            repo = name.removeprefix("hf-hub:")
            try:
                name = "local-dir:" + snapshot_download(repo, local_files_only=True)
            except Exception:
                raise EncoderWeightsError(
                    f"open_clip model {repo}: not in the local Hugging Face cache and nothing is "
                    f"downloaded at run time: fetch it once with internet (huggingface-cli "
                    f"download {repo})") from None
        if name.startswith("local-dir:"):
            folder = Path(name.removeprefix("local-dir:"))
            if not (folder / "open_clip_config.json").is_file():
                raise EncoderWeightsError(f"open_clip model {name}: no open_clip_config.json in "
                                          f"{folder}")
            import json

            model_cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
            pretrained = None  # the folder's own weights
        else:
            model_cfg = open_clip.get_model_config(name)
            if model_cfg is None:
                raise ValueError(f"model.encoder.name={name!r}: not an open_clip model "
                                 "(model.encoder.config=FILE registers a new one)")
            if pretrained is not None and not Path(pretrained).is_file():
                if open_clip.pretrained.get_pretrained_cfg(name, pretrained):
                    pretrained, force = _tag_file(open_clip, name, pretrained)
                else:
                    raise EncoderWeightsError(
                        f"open_clip model {name}: weights file {pretrained} not found "
                        "(model.encoder.pretrained)")
        try:
            model = open_clip.create_model(name, pretrained=pretrained,
                                           force_preprocess_cfg=force or None)
        except RuntimeError as e:
            raise EncoderWeightsError(f"open_clip model {name}: weights {pretrained} do not load "
                                      f"({str(e).splitlines()[0][:200]})") from None
        pp = open_clip.get_model_preprocess_cfg(model)
        if pp.get("resize_mode", "shortest") not in ("shortest", "squash"):
            raise ValueError(f"open_clip model {name}: resize_mode {pp['resize_mode']!r} is not "
                             "supported (shortest, squash)")
        self.preprocess = make_preprocess(
            pp["size"], pp["mean"], pp["std"], pp.get("interpolation", "bicubic"),
            "shorter" if pp.get("resize_mode", "shortest") == "shortest" else "squash")
        self.model = model.visual  # the text tower is not needed
        self.model_cfg = model_cfg

    def tokens(self, images: Tensor) -> tuple[Tensor, int]:
        v = self.model
        if self.kind == "TimmModel":  # (B, N, C) after the final norm, or a map (B, C, h, w)
            return v.trunk.forward_features(images), getattr(v.trunk, "num_prefix_tokens", 0) or 0
        if self.kind == "ModifiedResNet":  # the last stage's map, before attention pooling
            return v.layer4(v.layer3(v.layer2(v.layer1(v.stem(images))))), 0  # (B, C, h, w)
        x = v.transformer(v._embeds(images))  # (B, 1 + h*w, C), class token first
        if not v.final_ln_after_pool:
            x = v.ln_post(x)  # what output_tokens=True returns for the patches
        return x, 1

    def architecture(self) -> dict:
        return {"open_clip_config": self.model_cfg, "preprocess": self.preprocess}

    def identity(self) -> dict:
        return {"class": "OpenCLIPEncoder", "name": self.name, "config": self.config,
                "pretrained": self.pretrained, "class_token": self.class_token}
