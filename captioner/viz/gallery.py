"""A contact sheet: photos in a grid with the model's caption (and a human reference) under each."""

from __future__ import annotations

import io
import math
import textwrap

from PIL import Image, ImageDraw

from captioner.data.images import load_image
from captioner.utils.io import atomic_write_bytes

PHOTO = 224
CHARS = 36  # characters per text line under a 224-pixel photo (PIL's default font)
LINE = 13


def gallery(items: list[dict], columns: int = 4) -> Image.Image:
    """``items``: ``path``, ``caption`` and optionally ``reference``. The caption is drawn in
    black, the reference in grey below it."""
    texts = []
    for it in items:
        lines = textwrap.wrap(it["caption"], CHARS)
        ref = textwrap.wrap(f"human: {it['reference']}", CHARS) if it.get("reference") else []
        texts.append((lines, ref))
    text_h = LINE * max(len(a) + len(b) for a, b in texts) + 10 if texts else 0
    cols = min(columns, max(len(items), 1))
    rows = math.ceil(len(items) / cols)
    cell_w, cell_h = PHOTO + 8, PHOTO + text_h + 8
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (it, (lines, ref)) in enumerate(zip(items, texts)):
        x, y = (i % cols) * cell_w + 4, (i // cols) * cell_h + 4
        sheet.paste(load_image(it["path"]).convert("RGB").resize((PHOTO, PHOTO)), (x, y))
        ty = y + PHOTO + 4
        for line in lines:
            draw.text((x, ty), line, fill="black")
            ty += LINE
        for line in ref:
            draw.text((x, ty), line, fill=(110, 110, 110))
            ty += LINE
    return sheet


def save_gallery(items: list[dict], path, columns: int = 4) -> None:
    buf = io.BytesIO()
    gallery(items, columns).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
