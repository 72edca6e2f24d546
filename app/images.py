"""Turning a backend's image bytes into the JPEG every result is stored as."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

JPEG_QUALITY = 92


class NotAnImage(ValueError):
    """The bytes are not an image Pillow can read."""


def to_jpeg(data: bytes) -> bytes:
    """Return `data` as JPEG bytes: unchanged when it already is a JPEG, re-encoded otherwise.

    Raises NotAnImage when `data` is not a readable image. CPU-bound: run it off the event loop
    for large images (asyncio.to_thread).
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format
            if image_format == "JPEG":
                image.verify()  # reads the whole stream; catches truncated files
                return data
            image.load()
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise NotAnImage(f"not a readable image ({exc})") from None
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()
