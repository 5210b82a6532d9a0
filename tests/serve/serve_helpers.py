"""Photos for the serving tests."""

from __future__ import annotations

import io

from PIL import Image


def jpeg(width=64, height=48, color="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "JPEG")
    return buf.getvalue()
