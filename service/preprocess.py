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


def normalise(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """0-255 pixels (N x C x H x W, any numeric dtype) -> the model's float32 input: scale to
    [0, 1], then subtract ``mean`` and divide by ``std`` per channel, as the manifest says."""
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return (pixels.astype(np.float32) / 255.0 - mean) / std


def to_rows(images: list[Image.Image], spec: InputSpec) -> np.ndarray:
    """Convert and resize (bilinear) decoded images, then normalise them into one float32 NCHW array."""
    pixels = np.empty((len(images), spec.channels, spec.height, spec.width), dtype=np.uint8)
    for i, image in enumerate(images):
        converted = image.convert(spec.colour_mode)
        if converted.size != (spec.width, spec.height):
            converted = converted.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
        array = np.asarray(converted)
        pixels[i] = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return normalise(pixels, spec)
