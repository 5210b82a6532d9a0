"""The model handle the server calls: a batch of PIL images and one set of decode settings in,
one caption result per image out.

The server knows nothing else about the model: ``load_caption_model`` returns the PyTorch
checkpoint's handle or an ONNX export's, both running the same search."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image


@dataclass(frozen=True)
class DecodeSettings:
    """What a request may choose; everything else (min length, length penalty, n-gram blocking,
    precision) is the checkpoint's. ``beam_size`` 1 is greedy search; ``alternatives`` <=
    ``beam_size`` best hypotheses are returned; ``attention``: include the per-word grid."""

    beam_size: int
    max_length: int
    alternatives: int = 1
    attention: bool = False


class CaptionModel(Protocol):
    """``info``: plain data for ``GET /info`` (``name``, ``vocab_size``, ``encoder``,
    ``image_size``, ``grid`` [rows, columns] of the attention, ``decode`` defaults with
    ``beam_size`` and ``max_length``).

    A call returns, per image: ``caption``, ``words``, ``score`` (float or None), ``alternatives``
    (``[{"caption", "score"}]``, best first) and, when ``settings.attention``, ``attention``: one
    row of ``grid[0] * grid[1]`` weights per word (row-major)."""

    info: dict

    def __call__(self, images: list[Image.Image], settings: DecodeSettings) -> list[dict]: ...


def _finite(x: float) -> float | None:
    return x if x == x and abs(x) != float("inf") else None  # JSON has no inf / nan


class _SearchCaptionModel:
    """A model with ``Captioner``'s inference calls (``encode``, ``generate``) behind the server:
    the PyTorch checkpoint and the ONNX export differ only in how they are loaded."""

    def __init__(self, model, tokenizer, image_size: int, preprocess: dict | None, decode: dict,
                 info: dict, device: str = "cpu"):
        import torch

        from captioner.data.images import resolve_preprocess

        self.model, self.tokenizer, self.image_size = model, tokenizer, int(image_size)
        # what training fed the encoder (size, crop, mean/std); None for older checkpoints
        self.preprocess = preprocess
        self.decode = decode
        height, width = resolve_preprocess(preprocess, self.image_size)["size"]
        with torch.no_grad():  # the grid the attention lives on (and a warm-up)
            probe = torch.zeros(1, 3, height, width, device=device)
            regions = model.encode(probe).shape[1]  # (1, R, C)
        side = round(regions**0.5)
        method = decode.get("method", "greedy")
        self.info = {
            **info,
            "vocab_size": len(tokenizer),
            "image_size": self.image_size,
            "grid": [side, side] if side * side == regions else [1, regions],
            "decode": {"beam_size": 1 if method == "greedy" else int(decode.get("beam_size", 3)),
                       "max_length": int(decode.get("max_length", 20)),
                       **{k: v for k, v in decode.items()
                          if k not in ("method", "beam_size", "max_length")}},
        }

    def __call__(self, images: list[Image.Image], settings: DecodeSettings) -> list[dict]:
        from captioner.inference import caption_images

        decode = {**self.decode, "method": "greedy" if settings.beam_size == 1 else "beam",
                  "beam_size": settings.beam_size, "max_length": settings.max_length}
        results = caption_images(self.model, self.tokenizer, images, self.image_size, decode,
                                 num_return=settings.alternatives, preprocess=self.preprocess)
        out = []
        for r in results:
            item = {"caption": r["caption"], "words": r["words"], "score": _finite(r["score"]),
                    "alternatives": [{"caption": a["caption"], "score": _finite(a["score"])}
                                     for a in r["alternatives"]]}
            if settings.attention:
                item["attention"] = [[round(float(w), 5) for w in row]
                                     for row in r["attention"].tolist()]  # (L, R)
            out.append(item)
        return out


def _describe_encoder(config: dict) -> dict:
    """A stored encoder config as ``/info`` shows it: its settings and class name."""
    described = {k: v for k, v in config.items() if k != "_target_"}
    described["class"] = config["_target_"].rsplit(".", 1)[1]
    return described


class TorchCaptionModel(_SearchCaptionModel):
    """A captioner checkpoint run with PyTorch, read under the checkpoint rules
    (``checkpoint.load_checkpoint``: ``weights_only``, format version, allowlisted classes)."""

    def __init__(self, checkpoint, device: str = "cpu"):
        """``checkpoint``: a path, or a list of paths served as one ensemble
        (``checkpoint.load_checkpoints``)."""
        from captioner.checkpoint import load_checkpoints
        from captioner.inference import decode_settings
        from captioner.models.ensemble import ConcatEncoder, EnsembleDecoder

        paths = list(checkpoint) if isinstance(checkpoint, (list, tuple)) else [checkpoint]
        model, tokenizer, payload = load_checkpoints(paths, map_location=device)
        configs = payload.get("ensemble_model_configs", [payload["model_config"]])
        encoders = [_describe_encoder(c["encoder"]) for c in configs]
        encoder = encoders[0]
        if isinstance(model.encoder, ConcatEncoder):  # distinct encoders, grids joined
            by_slice = {}  # members on one encoder read one channel slice: describe it once
            for described, channels in zip(encoders, model.decoder.slices):
                by_slice.setdefault(channels, described)
            members = list(by_slice.values())
            encoder = {"class": "ConcatEncoder", "members": members,
                       "name": " + ".join(str(e.get("name") or e["class"]) for e in members)}
        decoders = (model.decoder.members if isinstance(model.decoder, EnsembleDecoder)
                    else [model.decoder])
        info = {"name": " + ".join(Path(p).name for p in paths), "runtime": "pytorch",
                "decoder": " + ".join(type(d).__name__ for d in decoders), "encoder": encoder}
        super().__init__(model.to(device).eval(), tokenizer, payload["image_size"],
                         payload.get("preprocess"), decode_settings(payload["decode"]), info, device)


class OnnxCaptionModel(_SearchCaptionModel):
    """An ONNX export directory (``captioner-export``) run with ONNX Runtime on the CPU; the
    search is the same as the PyTorch model's (``export/onnx_runtime.py``)."""

    def __init__(self, directory):
        from captioner.export.onnx_runtime import load
        from captioner.inference import decode_settings

        model = load(directory)  # ONNX Runtime threads: torch's (the server set them)
        info = {"name": Path(directory).name, "runtime": "onnxruntime",
                "decoder": model.config["decoder"]["class"],
                "encoder": {"name": "encoder.onnx", **model.config["features"]}}
        super().__init__(model, model.tokenizer, model.image_size, model.preprocess,
                         decode_settings(model.decode), info)


def load_caption_model(path, device: str = "cpu") -> CaptionModel:
    """The handle for a model: a directory is an ONNX export (``captioner-export``, CPU only),
    a file a captioner checkpoint (``.ckpt``, or any file torch reads), a list of files one
    ensemble of checkpoints. Raises an ``InputError`` (one line naming the file or directory)
    for a bad one."""
    if isinstance(path, (list, tuple)):
        if len(path) == 1:
            return load_caption_model(path[0], device)
        exports = [str(p) for p in path if Path(p).is_dir()]
        if exports:
            from captioner.checkpoint import CheckpointError

            raise CheckpointError(f"{exports[0]}: an ensemble is served from checkpoints, not "
                                  "ONNX exports")
        return TorchCaptionModel(path, device)
    if Path(path).is_dir():
        if device != "cpu":
            from captioner.export.onnx_runtime import OnnxLoadError

            raise OnnxLoadError(f"{path}: an ONNX export runs on the CPU only (not {device})")
        return OnnxCaptionModel(path)
    return TorchCaptionModel(path, device)
