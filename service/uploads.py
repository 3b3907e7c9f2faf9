"""Bodies of the image API -> labelled image files, synchronously, so the data plane can run the
whole parse in a worker thread: multipart parsing, JSON parsing and base64 decoding of a 16 MB
body take long enough to stall every other request if they ran on the event loop.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import orjson
from pydantic import BaseModel, Field, ValidationError
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header

# Below a few milliseconds HTTP and decoding alone miss any latency budget.
MIN_BUDGET_MS = 5.0
MAX_BUDGET_MS = 3_600_000.0

from .errors import BadRequest, UnsupportedMediaType, first_problem

MULTIPART = "multipart/form-data"
JSON = "application/json"


class JSONImages(BaseModel):
    images: list[str] = Field(min_length=1, description="base64-encoded image files (PNG, JPEG, ...)")
    top_k: int | None = Field(None, ge=1)
    max_latency_ms: float | None = Field(None, ge=MIN_BUDGET_MS, le=MAX_BUDGET_MS,
                                         description="POST /v1/predict only: latency budget (admission judges against it)")
    min_accuracy: float | None = Field(None, ge=0, le=1, description="POST /v1/predict only: accuracy floor")


@dataclass
class ParsedImages:
    files: list[tuple[str, bytes]]  # (label for messages, file bytes)
    top_k: int | None = None
    # What a JSON body asked of the SLO route (query and headers are read by the route).
    max_latency_ms: float | None = None
    min_accuracy: float | None = None


def parse_images(body: bytes, content_type: str, max_files: int) -> ParsedImages:
    """Every image file in the body, with the JSON body's options if any. Raises
    ``BadRequest``/``UnsupportedMediaType`` naming what is wrong."""
    media, options = parse_options_header(content_type)
    if media == MULTIPART.encode():
        boundary = options.get(b"boundary")
        if not boundary:
            raise BadRequest("multipart body without a boundary in its Content-Type")
        return ParsedImages(_multipart_files(body, boundary, max_files))
    if media == JSON.encode():
        return _json_images(body)
    raise UnsupportedMediaType(
        f"content type {content_type or 'missing'!r} is not accepted: use {MULTIPART} (image files) or {JSON}"
    )


def _json_images(body: bytes) -> ParsedImages:
    try:
        request = JSONImages.model_validate(orjson.loads(body))
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    except ValidationError as exc:
        raise BadRequest(f"{first_problem(exc.errors())} (expected {{\"images\": [base64, ...]}})") from None
    images = []
    for i, text in enumerate(request.images):
        try:
            images.append((f"images[{i}]", base64.b64decode(text, validate=True)))
        except (binascii.Error, ValueError):
            raise BadRequest(f"images[{i}] is not valid base64") from None
    return ParsedImages(images, request.top_k, request.max_latency_ms, request.min_accuracy)


class _Part:
    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.chunks: list[bytes] = []


def _multipart_files(body: bytes, boundary: bytes, max_files: int) -> list[tuple[str, bytes]]:
    """Every part with a ``filename`` is an image; other fields are ignored."""
    parts: list[_Part] = []
    field, value = bytearray(), bytearray()

    def begin() -> None:
        if len(parts) >= max_files:
            raise BadRequest(f"Too many files: more than {max_files} parts in the form")
        parts.append(_Part())

    def header_end() -> None:
        parts[-1].headers[bytes(field).lower()] = bytes(value)
        field.clear()
        value.clear()

    parser = MultipartParser(boundary, {
        "on_part_begin": begin,
        "on_header_field": lambda data, start, end: field.extend(data[start:end]),
        "on_header_value": lambda data, start, end: value.extend(data[start:end]),
        "on_header_end": header_end,
        "on_part_data": lambda data, start, end: parts[-1].chunks.append(data[start:end]),
    })
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise BadRequest(f"multipart body could not be parsed: {exc}") from None
    files = []
    for part in parts:
        _, disposition = parse_options_header(part.headers.get(b"content-disposition", b""))
        filename = disposition.get(b"filename")
        if filename is not None:
            name = filename.decode("utf-8", "replace") or disposition.get(b"name", b"").decode("utf-8", "replace")
            files.append((f"file {name!r}", b"".join(part.chunks)))
    if not files:
        raise BadRequest("the form holds no files: send images as file fields (e.g. -F images=@cat.png)")
    return files
