"""Safe image loading and the transforms, built from the preprocessing the encoder declares
(``encoder.preprocess``: size, resize, crop, interpolation, mean/std; see
``models/encoders/base.make_preprocess``) and stored in checkpoints, so captioning (``caption.py``,
a server) feeds a model exactly what its training fed it."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

from captioner.models.encoders.base import IMAGENET_MEAN, IMAGENET_STD, make_preprocess
from captioner.utils.errors import InputError

DEFAULT_MAX_PIXELS = 100_000_000
WIDE_INTEGER_MODES = ("I;16", "I;16B", "I;16L", "I")  # 16-bit scans and PNGs, 32-bit int TIFFs


class ImageLoadError(InputError, RuntimeError):
    """An image could not be read; the message names the file."""


@contextlib.contextmanager
def _opened(path):
    """``Image.open`` with Pillow's own pixel limit (``MAX_IMAGE_PIXELS``, about 89M) off: it
    would refuse images under ``data.max_pixels`` and cap a larger setting; the caller checks
    ``max_pixels`` instead. Restored at once (loaders run in processes, not threads)."""
    pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        img = Image.open(path)  # reads the header only
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit
    with img:
        yield img


def load_image(path, max_pixels: int = DEFAULT_MAX_PIXELS, *, name: str | None = None,
               max_frames: int | None = None, limit_name: str = "data.max_pixels") -> Image.Image:
    """Any PIL mode -> RGB, EXIF orientation applied, refusing decompression bombs.

    ``path``: a file name or a binary file object (an upload; ``name`` then names it in errors).
    The size check reads only the header, so a small file claiming huge dimensions is refused
    before any pixel is decoded; ``max_frames`` refuses animations with more frames (the first
    frame is the one used). 16/32-bit integer images are taken as 16-bit data (value / 256);
    transparent images are composed onto white. ``limit_name``: the setting the size error names."""
    label = name or path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _opened(path) as img:
                if img.width * img.height > max_pixels:
                    raise ImageLoadError(
                        f"{label}: {img.width}x{img.height} pixels exceeds the limit of {max_pixels} "
                        f"({limit_name}, a guard against decompression bombs)"
                    )
                frames = getattr(img, "n_frames", 1)
                if max_frames is not None and frames > max_frames:
                    raise ImageLoadError(f"{label}: {frames} frames exceeds the limit of "
                                         f"{max_frames} (an animation; its first frame is used)")
                img = ImageOps.exif_transpose(img)
                if img.mode in WIDE_INTEGER_MODES:  # PIL's point() misses big-endian I;16B
                    pixels = np.asarray(img, dtype=np.float64) / 256
                    img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))  # L
                if img.mode in ("RGBA", "LA", "P", "PA"):
                    img = img.convert("RGBA")
                    background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                    img = Image.alpha_composite(background, img)
                return img.convert("RGB")
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError(f"{label}: image file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(f"{label}: is a directory, not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(f"{label}: refused as a possible decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{label}: not a readable image (unknown format, empty or not an image)") from None
    except Exception as e:  # truncated or corrupt data: decoders raise OSError, SyntaxError,
        # ValueError, EOFError, struct.error, IndexError... depending on the format and the damage
        raise ImageLoadError(f"{label}: corrupt or truncated image ({type(e).__name__}: {e})") from None


def legacy_preprocess(image_size: int) -> dict:
    """What every encoder was fed before encoders declared their preprocessing (and what a
    checkpoint without ``preprocess`` was trained on): the whole image squashed to a square,
    ImageNet statistics."""
    return make_preprocess(image_size, IMAGENET_MEAN, IMAGENET_STD, any_size=True)


def resolve_preprocess(declared: dict | None, image_size: int | None) -> dict:
    """The preprocessing to feed: the encoder's ``declared`` one, at ``image_size``
    (``data.image_size``) when the encoder takes any size (CNNs), else at its own size (vision
    transformers, whose position embeddings fix it; ``image_size`` is then not used). The result
    is fixed (``any_size`` false): checkpoints store it, evaluation and captioning reuse it."""
    if declared is None:
        return {**legacy_preprocess(image_size or 224), "any_size": False}
    out = dict(declared)
    if out.get("any_size") and image_size is not None and out["size"] != [image_size] * 2:
        # the resize keeps its ratio to the crop (a CNN's squash: none)
        ratio = (max(out["resize_size"]) if isinstance(out["resize_size"], list)
                 else out["resize_size"]) / max(out["size"])
        resize_size = round(image_size * ratio)
        out.update(size=[image_size, image_size],
                   resize_size=[resize_size] * 2 if out["resize"] == "squash" else resize_size)
    out["any_size"] = False
    return out


def build_transform(image_size: int | None = None, train: bool = False, augment: bool = False,
                    preprocess: dict | None = None):
    """PIL image -> normalised float tensor (3, H, W), as ``preprocess`` says (None:
    ``legacy_preprocess(image_size)``). No horizontal flips: they would contradict captions that
    say "left of"."""
    p = resolve_preprocess(preprocess, image_size)
    size, resize_size = p["size"], p["resize_size"]
    # bilinear is torchvision's default: leaving it implicit keeps the transform's repr, hence
    # the feature-cache keys of every encoder configured before preprocessing was declared
    interp = ({} if p["interpolation"] == "bilinear"
              else {"interpolation": v2.InterpolationMode(p["interpolation"])})
    if p["resize"] == "squash":
        ops = [v2.ToImage(), v2.Resize(tuple(resize_size), antialias=True, **interp)]
        resized = list(resize_size)
    else:  # the shorter side to resize_size, aspect kept: crop needed whatever the sizes
        ops = [v2.ToImage(), v2.Resize(resize_size, antialias=True, **interp)]
        resized = None
    if resized != size:
        ops.append(v2.CenterCrop(tuple(size)))
    if train and augment:
        ops.append(v2.ColorJitter(0.1, 0.1, 0.1))
    mean, std = p["mean"], p["std"]
    if [round(m, 6) for m in mean] == list(IMAGENET_MEAN) and [round(s, 6) for s in std] == list(IMAGENET_STD):
        mean, std = IMAGENET_MEAN, IMAGENET_STD  # the same repr as before (cache keys)
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(ops)


def checkpoint_transform(payload: dict):
    """The eval transform a checkpoint's model was trained with: its stored ``preprocess``, or
    (checkpoints written before it) ImageNet statistics at its ``image_size``."""
    return build_transform(payload.get("image_size"), preprocess=payload.get("preprocess"))
