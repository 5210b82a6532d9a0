"""The model handle the server calls: a batch of PIL images and one set of decode settings in,
one caption result per image out.

The server knows nothing else about the model, so a runtime other than PyTorch (an ONNX export)
plugs in by implementing ``CaptionModel`` and being returned by ``load_caption_model``."""

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


class TorchCaptionModel:
    """A captioner checkpoint run with PyTorch, read under the checkpoint rules
    (``checkpoint.load_checkpoint``: ``weights_only``, format version, allowlisted classes)."""

    def __init__(self, checkpoint, device: str = "cpu"):
        import torch

        from captioner.checkpoint import load_checkpoint
        from captioner.inference import decode_settings

        model, self.tokenizer, payload = load_checkpoint(checkpoint, map_location=device)
        self.model = model.to(device).eval()
        from captioner.data.images import resolve_preprocess

        self.image_size = int(payload["image_size"])
        # what training fed the encoder (size, crop, mean/std); None for older checkpoints
        self.preprocess = payload.get("preprocess")
        self.decode = decode_settings(payload["decode"])
        height, width = resolve_preprocess(self.preprocess, self.image_size)["size"]
        with torch.no_grad():  # the grid the attention lives on (and a warm-up)
            probe = torch.zeros(1, 3, height, width, device=device)
            regions = self.model.encode(probe).shape[1]  # (1, R, C)
        side = round(regions**0.5)
        grid = [side, side] if side * side == regions else [1, regions]
        config = payload["model_config"]
        encoder = {k: v for k, v in config["encoder"].items() if k != "_target_"}
        encoder["class"] = config["encoder"]["_target_"].rsplit(".", 1)[1]
        method = self.decode.get("method", "greedy")
        self.info = {
            "name": Path(checkpoint).name,
            "runtime": "pytorch",
            "decoder": config["decoder"]["_target_"].rsplit(".", 1)[1],
            "encoder": encoder,
            "vocab_size": len(self.tokenizer),
            "image_size": self.image_size,
            "grid": grid,
            "decode": {"beam_size": 1 if method == "greedy" else int(self.decode.get("beam_size", 3)),
                       "max_length": int(self.decode.get("max_length", 20)),
                       **{k: v for k, v in self.decode.items()
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


def load_caption_model(path, device: str = "cpu") -> CaptionModel:
    """The handle for a model file: a captioner checkpoint (``.ckpt``, or any file torch reads).
    Raises ``checkpoint.CheckpointError`` (one line naming the file) for a bad one."""
    return TorchCaptionModel(path, device)
