"""Open Inference Protocol (KServe v2) REST shapes, and the codec between its bodies and numpy.

The pydantic models are the documented schema (they appear in the OpenAPI document). Tensor
``data`` is typed ``Any`` on purpose: it is never walked by pydantic but handed to numpy in one
call, and responses are written by orjson straight from numpy arrays.

Binary tensor extension: with the ``Inference-Header-Content-Length: N`` header, the first N bytes
of the body are the JSON header and each input with ``parameters.binary_data_size`` takes its bytes,
in order, from what follows. Outputs asked for with ``parameters.binary_data: true`` (or every
output when the request sets ``parameters.binary_data_output: true``) come back the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, Field, ValidationError

from .errors import BadRequest, check_image_count, first_problem

HEADER_LENGTH = "Inference-Header-Content-Length"

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype(np.int8), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
ACCEPTED_INPUT_TYPES = ("FP32", "FP64", "FP16", "UINT8")


# ---- documented shapes -------------------------------------------------------------------------
class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = {}


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = {}
    data: Any = Field(None, description="row-major flattened (or nested) values; omitted for binary tensors")


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] = {}


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] = {}
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] = []


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = {}
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] = {}
    outputs: list[ResponseOutput]


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong, and what to do about it")
    request_id: str | None = Field(None, description="server errors (5xx): the id the server log carries")


# ---- request decoding --------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodedRequest:
    id: str | None
    input_name: str
    tensor: np.ndarray  # the one input, as sent (dtype from its datatype)
    datatype: str
    outputs: list[str] | None  # None: every output
    binary_outputs: set[str]
    binary_all: bool


def decode_request(body: bytes, header_length: str | None, input_shape: tuple[int, ...], max_images: int) -> DecodedRequest:
    """Parse an infer body for a model whose one input is N x ``input_shape`` with N <= ``max_images``.
    The declared shape is checked before any data is touched, so no shape reaches numpy unchecked."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise BadRequest(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < n <= len(body):
            raise BadRequest(f"{HEADER_LENGTH} is {n} but the body has {len(body)} bytes")
        header, binary = body[:n], memoryview(body)[n:]
    else:
        header, binary = body, memoryview(b"")
    try:
        raw = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    try:
        request = InferenceRequest.model_validate(raw)
    except ValidationError as exc:
        raise BadRequest(f"request does not follow the inference protocol: {first_problem(exc.errors())}") from None
    if len(request.inputs) != 1:
        raise BadRequest(f"this model takes exactly one input tensor, got {len(request.inputs)}")
    spec = request.inputs[0]
    _check_shape(spec, input_shape, max_images)
    tensor = _input_tensor(spec, binary)
    if binary.nbytes and spec.parameters.get("binary_data_size") is None:
        raise BadRequest("body has bytes after the JSON header but no input declares parameters.binary_data_size")
    return DecodedRequest(
        id=request.id,
        input_name=spec.name,
        tensor=tensor,
        datatype=spec.datatype,
        outputs=[o.name for o in request.outputs] or None,
        binary_outputs={o.name for o in request.outputs if o.parameters.get("binary_data")},
        binary_all=bool(request.parameters.get("binary_data_output")),
    )


def _check_shape(spec: RequestInput, input_shape: tuple[int, ...], max_images: int) -> None:
    if len(spec.shape) != len(input_shape) + 1 or tuple(spec.shape[1:]) != input_shape:
        expected = ", ".join(map(str, input_shape))
        raise BadRequest(f"input {spec.name!r}: shape must be [N, {expected}], got {spec.shape[:8]}{' ...' if len(spec.shape) > 8 else ''}")
    check_image_count(spec.shape[0], max_images)


def _input_tensor(spec: RequestInput, binary: memoryview) -> np.ndarray:
    if spec.datatype not in ACCEPTED_INPUT_TYPES:
        raise BadRequest(f"input {spec.name!r}: datatype {spec.datatype} is not accepted; use one of {', '.join(ACCEPTED_INPUT_TYPES)}")
    dtype = DATATYPES[spec.datatype]
    count = math.prod(spec.shape)
    size = spec.parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != binary.nbytes:
            raise BadRequest(f"input {spec.name!r}: binary_data_size is {size} but {binary.nbytes} bytes follow the JSON header")
        if size != count * dtype.itemsize:
            raise BadRequest(
                f"input {spec.name!r}: shape {spec.shape} of {spec.datatype} needs {count * dtype.itemsize} bytes, got {size}"
            )
        return np.frombuffer(binary, dtype=dtype).reshape(spec.shape)
    if spec.data is None:
        raise BadRequest(f"input {spec.name!r} has neither data nor parameters.binary_data_size")
    try:
        array = np.asarray(spec.data, dtype=dtype)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise BadRequest(f"input {spec.name!r}: data is not a flat or nested list of {spec.datatype} numbers ({type(exc).__name__})") from None
    if array.size != count:
        raise BadRequest(f"input {spec.name!r}: shape {spec.shape} needs {count} elements, data has {array.size}")
    return array.reshape(spec.shape)


# ---- response encoding -------------------------------------------------------------------------
def encode_response(
    model_name: str, model_version: str, request_id: str | None, outputs: dict[str, tuple[str, np.ndarray]],
    binary: set[str], parameters: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Body and extra headers. ``outputs`` maps name -> (datatype, array); names in ``binary`` go
    after the JSON header as raw little-endian bytes."""
    entries = []
    tail = []
    for name, (datatype, array) in outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if name in binary:
            raw = np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            entry["data"] = array.ravel()
        entries.append(entry)
    header = {"model_name": model_name, "model_version": model_version, "outputs": entries}
    if request_id is not None:
        header["id"] = request_id
    if parameters:
        header["parameters"] = parameters
    json_bytes = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not tail:
        return json_bytes, {}
    return json_bytes + b"".join(tail), {HEADER_LENGTH: str(len(json_bytes))}
