"""Attention pictures: the image once per generated word, with where the model looked."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from captioner.data.images import load_image
from captioner.utils.io import atomic_write_bytes

PANEL = 160
LABEL = 20


def attention_panels(image: Image.Image, words: list[str], attention: torch.Tensor,
                     columns: int = 5) -> Image.Image:
    """One panel per word: attention (L, R) over an r x r grid, upsampled and blended in red."""
    base = image.convert("RGB").resize((PANEL, PANEL), Image.BICUBIC)
    n = max(len(words), 1)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    sheet = Image.new("RGB", (cols * PANEL, rows * (PANEL + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    R = attention.shape[-1] if attention.numel() else 1
    side = int(round(math.sqrt(R)))
    for i, word in enumerate(words):
        a = attention[i].float().reshape(side, side).numpy() if side * side == R else np.ones((1, 1))
        a = a / max(float(a.max()), 1e-8)
        heat = Image.fromarray((a * 255).astype(np.uint8)).resize((PANEL, PANEL), Image.BILINEAR)
        red = Image.new("RGB", (PANEL, PANEL), (255, 0, 0))
        panel = Image.composite(red, base, heat.point(lambda v: int(v * 0.6)))
        x, y = (i % cols) * PANEL, (i // cols) * (PANEL + LABEL)
        sheet.paste(panel, (x, y))
        draw.text((x + 4, y + PANEL + 4), word, fill="black")
    return sheet


def save_attention_figure(result: dict, path) -> None:
    """``result`` from ``inference.caption_files``; written atomically as PNG."""
    import io

    image = load_image(result["path"])
    sheet = attention_panels(image, result["words"], result["attention"])
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
