"""Open Inference Protocol (KServe v2) REST endpoints, so KServe and Triton clients work unchanged."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from model_store import Kind

from .. import __version__
from ..dataplane import TIMEOUT_HEADER
from ..protocol import (
    HEADER_LENGTH, InferenceRequest, InferenceResponse, ModelMetadata, ServerMetadata, TensorMetadata,
    encode_response,
)
from .common import Version, error_responses, input_name, output_metadata, output_tensors, plane

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])
ERRORS = error_responses(400, 404, 413, 500, 503, 504)


@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="committee", version=__version__, extensions=["binary_tensor_data"])


class Liveness(BaseModel):
    live: bool


class Readiness(BaseModel):
    ready: bool
    models: dict[str, str] = Field({}, description="model -> why it does not serve, or why its newest version does not")


@router.get("/health/live", response_model=Liveness, summary="Liveness: the process answers")
async def live() -> Liveness:
    return Liveness(live=True)


@router.get("/health/ready", response_model=Readiness, responses={503: {"model": Readiness}},
            summary="Readiness: every model serves (strict_readiness) or at least one does; problems are listed either way")
async def ready(request: Request) -> JSONResponse:
    registry = plane(request).registry
    statuses = registry.statuses()
    problems = {s.name: s.reason or "not loaded" for s in statuses if s.reason or not s.ready}
    body = Readiness(ready=registry.ready, models=problems if statuses else {"*": "no models in the store"})
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get("/models/{name}", response_model=ModelMetadata, responses=ERRORS, summary="Model metadata")
async def model_metadata(request: Request, name: str) -> ModelMetadata:
    return _metadata(request, name, None)


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, responses=ERRORS, summary="Model metadata (version)")
async def version_metadata(request: Request, name: str, version: Version) -> ModelMetadata:
    return _metadata(request, name, version)


def _metadata(request: Request, name: str, version: int | None) -> ModelMetadata:
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


class ModelReady(BaseModel):
    name: str
    ready: bool


@router.get("/models/{name}/ready", response_model=ModelReady, responses=ERRORS, summary="Model readiness")
async def model_ready(request: Request, name: str) -> ModelReady:
    plane(request).registry.get(name)  # raises 404 / 503 with the reason
    return ModelReady(name=name, ready=True)


@router.get("/models/{name}/versions/{version}/ready", response_model=ModelReady, responses=ERRORS, summary="Model readiness (version)")
async def version_ready(request: Request, name: str, version: Version) -> ModelReady:
    plane(request).registry.get(name, version)
    return ModelReady(name=name, ready=True)


def _infer_doc() -> dict:
    """The infer body, which the data plane reads itself (after admission): JSON, or the binary
    tensor extension (a JSON header of ``Inference-Header-Content-Length`` bytes, then raw tensors).
    The request models go into the document's components (see ``app.openapi_components``)."""
    json_schema = {"$ref": "#/components/schemas/InferenceRequest"}
    return {
        "parameters": [{"name": HEADER_LENGTH, "in": "header", "required": False,
                        "description": "binary tensor extension: length in bytes of the JSON header that starts the body",
                        "schema": {"type": "integer", "minimum": 1}}],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": json_schema},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                    "description": f"JSON header of {HEADER_LENGTH} bytes, then raw tensors"}},
        }},
    }


_INFER_DOC = _infer_doc()


@router.post("/models/{name}/infer", response_model=InferenceResponse, responses=ERRORS, openapi_extra=_INFER_DOC, summary="Inference")
async def infer(request: Request, name: str) -> Response:
    return await _infer(request, name, None)


@router.post("/models/{name}/versions/{version}/infer", response_model=InferenceResponse, responses=ERRORS,
             openapi_extra=_INFER_DOC, summary="Inference (version)")
async def version_infer(request: Request, name: str, version: Version) -> Response:
    return await _infer(request, name, version)


async def _infer(request: Request, name: str, version: int | None) -> Response:
    result = await plane(request).infer(name, version, request.body, request.headers.get(HEADER_LENGTH),
                                        request.headers.get(TIMEOUT_HEADER))
    decoded, served = result.request, result.served
    tensors = output_tensors(served.prediction, decoded.outputs)
    binary = set(tensors) if decoded.binary_all else decoded.binary_outputs & set(tensors)
    m = served.variant.manifest
    body, headers = encode_response(m.name, str(m.version), decoded.id, tensors, binary)
    return Response(body, media_type="application/octet-stream" if binary else "application/json", headers=headers)
