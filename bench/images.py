"""Real images for requests that carry them (img2img, mix2img), as base64 text."""

from __future__ import annotations

import base64
import io
import os

from PIL import Image


def png_base64(colour: tuple[int, int, int] = (200, 30, 30)) -> str:
    """A small flat-coloured PNG."""
    out = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def noisy_png_base64(side: int = 64) -> str:
    """A photo-like PNG: noise does not compress, so it is about side*side*3 bytes."""
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def broken_png_base64() -> str:
    """Bytes that begin like a PNG and are not one: validation cannot tell, a backend can."""
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64).decode()
