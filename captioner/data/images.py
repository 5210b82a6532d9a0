"""Safe image loading and the transforms: the one place that decides image normalisation."""

from __future__ import annotations

import warnings

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_PIXELS = 100_000_000


class ImageLoadError(RuntimeError):
    """An image could not be read; the message names the file."""


def load_image(path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Any PIL mode -> RGB, EXIF orientation applied, refusing decompression bombs."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > max_pixels:
                    raise ImageLoadError(
                        f"{path}: {img.width}x{img.height} pixels exceeds the limit of {max_pixels}"
                    )
                img = ImageOps.exif_transpose(img)
                if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                    img = img.point(lambda v: v / 256).convert("L")  # 16-bit -> 8-bit
                if img.mode in ("RGBA", "LA", "P"):
                    img = img.convert("RGBA")
                    background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                    img = Image.alpha_composite(background, img)
                return img.convert("RGB")
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(f"{path}: is a directory, not an image") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(f"{path}: not a readable image ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageLoadError(f"{path}: corrupt or truncated image ({e})") from None


def build_transform(image_size: int, train: bool = False, augment: bool = False):
    """PIL image -> normalised float tensor (3, S, S). No horizontal flips: they would contradict
    captions that say "left of"."""
    ops = [v2.ToImage(), v2.Resize((image_size, image_size), antialias=True)]
    if train and augment:
        ops.append(v2.ColorJitter(0.1, 0.1, 0.1))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(ops)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (images * std + mean).clamp(0, 1)
