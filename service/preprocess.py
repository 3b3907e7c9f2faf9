"""Image bytes -> model input rows, exactly as the manifest's ``InputSpec`` says.

Only real decoders are used (Pillow). Every failure is a client error that names the image and
what was wrong with it: not an image, a format we don't take, truncated data, too many pixels.

Memory stays bounded by one decoded image, whatever the request holds: every header is read
(``Image.open`` decodes no pixels) and checked against the pixel limits before any image is
decoded, then each image is decoded, resized and written into the batch array before the next one
is touched. JPEGs decode straight at a reduced scale (draft mode) when the model wants fewer pixels.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from model_store import InputSpec

from .errors import PayloadTooLarge, Unprocessable, UnsupportedMediaType

ACCEPTED_FORMATS = {"PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"}


@dataclass(frozen=True)
class PixelLimits:
    per_image: int
    per_request: int


def open_image(data: bytes, label: str) -> Image.Image:
    """Read the image's header only: format and size are known, no pixel is decoded yet."""
    if not data:
        raise Unprocessable(f"{label} is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnsupportedMediaType(f"{label} is not an image Pillow can identify (accepted: {', '.join(sorted(ACCEPTED_FORMATS))})") from None
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"{label} has too many pixels to decode: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise Unprocessable(f"{label} could not be read (truncated or corrupt header): {exc}") from None
    if image.format not in ACCEPTED_FORMATS:
        raise UnsupportedMediaType(f"{label} is {image.format}; accepted formats: {', '.join(sorted(ACCEPTED_FORMATS))}")
    return image


def check_pixels(images: Sequence[tuple[str, Image.Image]], limits: PixelLimits) -> None:
    total = 0
    for label, image in images:
        width, height = image.size
        if width * height > limits.per_image:
            raise PayloadTooLarge(
                f"{label} is {width}x{height} = {width * height:,} pixels; the limit is {limits.per_image:,} per image"
            )
        total += width * height
    if total > limits.per_request:
        raise PayloadTooLarge(f"the images hold {total:,} pixels together; the limit is {limits.per_request:,} per request")


def decode_into(image: Image.Image, label: str, spec: InputSpec, out: np.ndarray) -> None:
    """Decode ``image``, convert and resize it (bilinear) to the spec, and write C x H x W uint8 into ``out``."""
    try:
        if image.format == "JPEG":
            image.draft(spec.colour_mode, (spec.width, spec.height))  # decode at 1/2, 1/4 or 1/8 scale when it suffices
        image.load()  # decode now so truncated data fails here, not later
        converted = image if image.mode == spec.colour_mode else image.convert(spec.colour_mode)
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"{label} has too many pixels to decode: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise Unprocessable(f"{label} could not be decoded (truncated or corrupt): {exc}") from None
    if converted.size != (spec.width, spec.height):
        converted = converted.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    array = np.asarray(converted)
    out[:] = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def images_to_rows(images: Sequence[tuple[str, bytes]], spec: InputSpec, limits: PixelLimits) -> np.ndarray:
    """Labelled image files -> the model's normalised float32 N x C x H x W input (see module doc)."""
    opened: list = [(label, open_image(data, label)) for label, data in images]
    check_pixels(opened, limits)
    pixels = np.empty((len(opened), spec.channels, spec.height, spec.width), dtype=np.uint8)
    for i in range(len(opened)):
        label, image = opened[i]
        opened[i] = (label, None)  # a decoded image keeps its pixels while referenced: let go of each in turn
        with image:
            decode_into(image, label, spec, pixels[i])
        del image
    return normalise(pixels, spec)


def normalise(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """0-255 pixels (N x C x H x W, any numeric dtype) -> the model's float32 input: scale to
    [0, 1], then subtract ``mean`` and divide by ``std`` per channel, as the manifest says."""
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return (pixels.astype(np.float32) / 255.0 - mean) / std
