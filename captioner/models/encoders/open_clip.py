"""open_clip's image tower (a ``VisionTransformer``) with weights from a local file, a local
folder or the local Hugging Face cache: never a download. ``open_clip_torch`` is optional
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


class OpenCLIPEncoder(TokenEncoder):
    """open_clip's ``VisionTransformer`` tokens after its final LayerNorm (``ln_post``, the
    tokens its ``output_tokens=True`` returns) as features (B, R, C): R = (S / patch)^2 patches,
    +1 with ``class_token=keep``. C is the transformer width (before the CLIP projection).

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
            units: the stem (patch conv, class and position embeddings, ``ln_pre``), then
            each residual block (the last with ``ln_post``).

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
        if type(visual).__name__ != "VisionTransformer" or visual.attn_pool is not None:
            raise ValueError(f"open_clip model {name}: its image tower ({type(visual).__name__}) "
                             "gives no patch tokens here; use a ViT model")
        self.name, self.config, self.pretrained = name, config, pretrained
        self.out_dim = visual.transformer.width
        units = {}
        for n, _ in visual.named_parameters():
            if n.startswith("transformer.resblocks."):
                units[n] = int(n.split(".")[2]) + 1
            elif n.startswith("ln_post."):
                units[n] = FINAL
            elif n == "proj" or n.startswith(("attn_pool", "head")):
                units[n] = None  # the CLIP projection of the pooled token: not in the features
            else:
                units[n] = 0
        self._setup(units, class_token, True, trainable, trainable_layers, finetune_after_epoch,
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
        x = v.transformer(v._embeds(images))  # (B, 1 + h*w, C), class token first
        if not v.final_ln_after_pool:
            x = v.ln_post(x)  # what output_tokens=True returns for the patches
        return x, 1

    def architecture(self) -> dict:
        return {"open_clip_config": self.model_cfg, "preprocess": self.preprocess}

    def identity(self) -> dict:
        return {"class": "OpenCLIPEncoder", "name": self.name, "config": self.config,
                "pretrained": self.pretrained, "class_token": self.class_token}
