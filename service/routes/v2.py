"""Open Inference Protocol (KServe v2) REST endpoints, so KServe and Triton clients work unchanged."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from model_store import Kind

from .. import __version__
from ..dataplane import TIMEOUT_HEADER
from ..errors import BadRequest
from ..protocol import (
    HEADER_LENGTH, ErrorResponse, InferenceRequest, InferenceResponse, ModelMetadata, ServerMetadata, TensorMetadata,
    decode_request, encode_response,
)
from .common import input_name, output_metadata, output_tensors, plane

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 503, 504)}


@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="committee", version=__version__, extensions=["binary_tensor_data"])


@router.get("/health/live", summary="Liveness: the process answers")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="Readiness: every model that should load has loaded",
            responses={503: {"description": "some model is not ready"}})
async def ready(request: Request) -> JSONResponse:
    registry = plane(request).registry
    if registry.ready:
        return JSONResponse({"ready": True})
    problems = {s.name: s.reason or "not loaded" for s in registry.statuses() if not s.ready}
    return JSONResponse({"ready": False, "models": problems or {"*": "no models in the store"}}, status_code=503)


@router.get("/models/{name}", response_model=ModelMetadata, responses=ERRORS, summary="Model metadata")
@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, responses=ERRORS, summary="Model metadata (version)")
async def model_metadata(request: Request, name: str, version: int | None = None) -> ModelMetadata:
    variant = plane(request).registry.get(name, version)
    m = variant.manifest
    return ModelMetadata(
        name=m.name, versions=[str(m.version)],
        platform="committee_cascade" if m.kind is Kind.CASCADE else "onnxruntime_onnx",
        inputs=[TensorMetadata(name=input_name(variant), datatype="FP32", shape=[-1, m.input.channels, m.input.height, m.input.width])],
        outputs=output_metadata(variant),
        parameters={"kind": m.kind.value, "providers": variant.providers, "labels": m.labels,
                    "accepted_input_datatypes": ["FP32", "FP64", "FP16", "UINT8 (raw 0-255 pixels, normalised by the server)"]},
    )


@router.get("/models/{name}/ready", responses=ERRORS, summary="Model readiness")
@router.get("/models/{name}/versions/{version}/ready", responses=ERRORS, summary="Model readiness (version)")
async def model_ready(request: Request, name: str, version: int | None = None) -> dict:
    plane(request).registry.get(name, version)  # raises 404 / 503 with the reason
    return {"name": name, "ready": True}


_INFER_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                    "description": f"JSON header of {HEADER_LENGTH} bytes, then raw tensors"}},
        },
    }
}


@router.post("/models/{name}/infer", response_model=InferenceResponse, responses=ERRORS, openapi_extra=_INFER_DOC, summary="Inference")
@router.post("/models/{name}/versions/{version}/infer", response_model=InferenceResponse, responses=ERRORS,
             openapi_extra=_INFER_DOC, summary="Inference (version)")
async def infer(request: Request, name: str, version: int | None = None) -> Response:
    dp = plane(request)
    with dp.observe(name, "v2_infer"):
        variant = dp.registry.get(name, version)
        decoded = decode_request(await request.body(), request.headers.get(HEADER_LENGTH))
        expected_input = input_name(variant)
        if decoded.input_name != expected_input:
            raise BadRequest(f"unknown input {decoded.input_name!r}; this model's input is {expected_input!r}")
        rows = dp.rows_from_tensor(variant.manifest.input, decoded.tensor, decoded.datatype, expected_input)
        served = await dp.predict(variant, rows, dp.deadline(request.headers.get(TIMEOUT_HEADER)))
        tensors = output_tensors(served.prediction, decoded.outputs)
        binary = set(tensors) if decoded.binary_all else decoded.binary_outputs & set(tensors)
        m = variant.manifest
        body, headers = encode_response(m.name, str(m.version), decoded.id, tensors, binary)
        media = "application/octet-stream" if binary else "application/json"
        return Response(body, media_type=media, headers=headers)
