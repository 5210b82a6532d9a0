"""Safe image loading and the transforms (normalised with the statistics the encoders declare)."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

from captioner.models.encoder import IMAGENET_MEAN, IMAGENET_STD
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


def build_transform(image_size: int, train: bool = False, augment: bool = False):
    """PIL image -> normalised float tensor (3, S, S). No horizontal flips: they would contradict
    captions that say "left of"."""
    ops = [v2.ToImage(), v2.Resize((image_size, image_size), antialias=True)]
    if train and augment:
        ops.append(v2.ColorJitter(0.1, 0.1, 0.1))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(ops)

