"""Endpoints for people: upload images, get labels; list the variants with their measured metrics."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from ..dataplane import TIMEOUT_HEADER, ModelStatus, Served, softmax
from ..uploads import JSON, MULTIPART, JSONImages
from .common import error_responses, plane

router = APIRouter(prefix="/v1", tags=["Images and models"])
ERRORS = error_responses(400, 404, 413, 415, 422, 500, 503, 504)
# The body is read by the data plane (after admission), so FastAPI cannot infer it: describe it here.
PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            MULTIPART: {"schema": {
                "type": "object", "required": ["images"],
                "properties": {"images": {"type": "array", "items": {"type": "string", "format": "binary"},
                                          "description": "image files (PNG, JPEG, BMP, GIF, TIFF, WEBP)"}},
            }},
            JSON: {"schema": JSONImages.model_json_schema()},
        },
    }
}


class Label(BaseModel):
    label: str
    probability: float


class ImagePrediction(BaseModel):
    label: str
    probability: float
    top_k: list[Label]
    exit_stage: int | None = Field(None, description="cascades: the stage (1-based) that answered")
    member_agreement: float | None = Field(None, description="ensembles: share of members whose top-1 is the answer")


class Timings(BaseModel):
    preprocess_ms: float
    queue_ms: float
    compute_ms: float
    total_ms: float


class PredictResponse(BaseModel):
    model: str
    version: int
    kind: str
    predictions: list[ImagePrediction]
    timings: Timings
    batch_sizes: list[int]


class ModelSummary(BaseModel):
    name: str
    version: int | None
    target_version: int | None
    kind: str | None
    ready: bool
    reason: str | None
    description: str | None = None
    providers: list[str] = []
    metrics: dict[str, Any] | None = None


def _summary(request: Request, status: ModelStatus, full: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"name": status.name, "version": status.version, "target_version": status.target,
                           "kind": status.kind, "ready": status.ready, "reason": status.reason}
    if status.version is not None:
        variant = plane(request).registry.get(status.name)
        m = variant.manifest
        out.update(description=m.description, providers=variant.providers,
                   metrics=m.metrics.model_dump() if m.metrics else None)
        if full:
            out["manifest"] = m.model_dump(mode="json")
    return out


@router.get("/models", response_model=list[ModelSummary], summary="Every model with its status and test-set metrics")
async def list_models(request: Request) -> list[dict[str, Any]]:
    return [_summary(request, s) for s in plane(request).registry.statuses()]


@router.get("/models/{name}", responses=ERRORS, summary="One model: status and its whole manifest")
async def get_model(request: Request, name: str) -> dict[str, Any]:
    return _summary(request, plane(request).registry.status(name), full=True)


@router.post("/models/{name}/predict", response_model=PredictResponse, responses=ERRORS,
             openapi_extra=PREDICT_BODY, summary="Classify uploaded images (multipart files or JSON with base64 images)")
async def predict(request: Request, name: str, top_k: int | None = Query(None, ge=1, le=1000)) -> PredictResponse:
    dp = plane(request)
    result = await dp.predict_images(name, request.body, request.headers.get("content-type", ""),
                                     request.headers.get(TIMEOUT_HEADER))
    k = chosen_top_k(top_k, result.top_k, dp.settings.top_k, result.served)
    return predict_response(result.served, k)


def chosen_top_k(query: int | None, body: int | None, default: int, served: Served) -> int:
    """The query's ``top_k``, else the JSON body's, else the setting; never more than the labels."""
    return min(query or body or default, len(served.variant.manifest.labels))


def predict_response(served: Served, k: int) -> PredictResponse:
    m = served.variant.manifest
    p = served.prediction
    probs = softmax(p.logits)
    order = np.argsort(-probs, axis=1)[:, :k]
    agreement = None
    if p.member_logits is not None:
        agreement = (p.member_logits.argmax(-1) == probs.argmax(-1)[:, None]).mean(axis=1)
    predictions = []
    for i in range(len(probs)):
        top = [Label(label=m.labels[j], probability=float(probs[i, j])) for j in order[i]]
        predictions.append(ImagePrediction(
            label=top[0].label, probability=top[0].probability, top_k=top,
            exit_stage=int(p.exit_stage[i]) if p.exit_stage is not None else None,
            member_agreement=float(agreement[i]) if agreement is not None else None,
        ))
    return PredictResponse(
        model=m.name, version=m.version, kind=m.kind.value, predictions=predictions, batch_sizes=p.batch_sizes,
        timings=Timings(preprocess_ms=1000 * served.preprocess_s, queue_ms=1000 * p.queue_s, compute_ms=1000 * p.compute_s,
                        total_ms=1000 * (served.preprocess_s + served.total_s)),
    )
