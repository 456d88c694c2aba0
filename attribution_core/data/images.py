"""Decoding and resizing: one function used everywhere an image enters the system."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from attribution_core.errors import ImageDecodeError, ImageShapeError, InputError

MAX_PIXELS = 64 * 2**20  # a decompression-bomb guard well above any training image


def decode_image(data: bytes, example_id: str, resolution: int, channels: int,
                 *, min_side: int = 0, max_aspect: float = 0.0) -> np.ndarray:
    """PNG/JPEG/... bytes -> ``float32 [channels, resolution, resolution]`` in [-1, 1].

    Colour images are converted to RGB (``channels=3``) or luminance (``channels=1``);
    a non-square image is centre-cropped to a square first; then it is resized (bilinear,
    antialiased) to ``resolution``. ``min_side`` / ``max_aspect`` (0 = no limit) refuse
    images too small or too elongated for that to keep their content (``ImageShapeError``).
    """
    if channels not in (1, 3):
        raise InputError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise ImageDecodeError(f"example {example_id!r}: no image bytes")
    try:
        with Image.open(io.BytesIO(bytes(data))) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageDecodeError(f"example {example_id!r}: image is {w}x{h}, larger than {MAX_PIXELS} pixels")
            img.load()
            img = img.convert("RGB" if channels == 3 else "L")
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"example {example_id!r}: cannot decode image ({exc})") from exc
    if min(w, h) < 1:
        raise ImageDecodeError(f"example {example_id!r}: image is {w}x{h}")
    if min(w, h) < min_side:
        raise ImageShapeError(f"example {example_id!r}: image is {w}x{h}, its shorter side is below {min_side} pixels")
    if max_aspect and max(w, h) > max_aspect * min(w, h):
        raise ImageShapeError(f"example {example_id!r}: image is {w}x{h}, more elongated than {max_aspect}:1")
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.BILINEAR, reducing_gap=None)
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1) / 127.5 - 1.0)  # [H, W, C] -> [C, H, W]


def encode_png(image: np.ndarray) -> bytes:
    """``uint8 [H, W, C]`` (C = 1 or 3) or ``[H, W]`` -> PNG bytes (deterministic)."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """``float [C, H, W]`` in [-1, 1] -> ``uint8 [H, W, C]``."""
    return np.clip((pixels.transpose(1, 2, 0) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
