"""Image bytes -> model input rows, exactly as the manifest's ``InputSpec`` says.

Only real decoders are used (Pillow). Every failure is a client error that names the image and
what was wrong with it: not an image, a format we don't take, truncated data, too many pixels.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from model_store import InputSpec

from .errors import Unprocessable, UnsupportedMediaType

ACCEPTED_FORMATS = {"PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"}
MAX_PIXELS = 40_000_000  # decompression-bomb guard: well above any real photo

Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def decode_image(data: bytes, label: str) -> Image.Image:
    if not data:
        raise Unprocessable(f"{label} is empty")
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in ACCEPTED_FORMATS:
            raise UnsupportedMediaType(f"{label} is {image.format}; accepted formats: {', '.join(sorted(ACCEPTED_FORMATS))}")
        image.load()  # decode now so truncated data fails here, not later
    except UnidentifiedImageError:
        raise UnsupportedMediaType(f"{label} is not an image Pillow can identify (accepted: {', '.join(sorted(ACCEPTED_FORMATS))})") from None
    except Image.DecompressionBombError as exc:
        raise Unprocessable(f"{label} is too large to decode: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise Unprocessable(f"{label} could not be decoded (truncated or corrupt): {exc}") from None
    return image


def to_rows(images: list[Image.Image], spec: InputSpec) -> np.ndarray:
    """Convert, resize (bilinear) and normalise decoded images into one float32 NCHW array."""
    out = np.empty((len(images), spec.channels, spec.height, spec.width), dtype=np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    for i, image in enumerate(images):
        converted = image.convert(spec.colour_mode)
        if converted.size != (spec.width, spec.height):
            converted = converted.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
        pixels = np.asarray(converted, dtype=np.float32)
        chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        out[i] = (chw / 255.0 - mean) / std
    return out
