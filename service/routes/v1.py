"""Endpoints for people: upload images, get labels; list the variants with their measured metrics."""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile

from ..dataplane import TIMEOUT_HEADER, Served
from ..errors import BadRequest, UnsupportedMediaType, first_problem
from ..preprocess import decode_image, to_rows
from ..protocol import ErrorResponse
from ..registry import ModelStatus
from ..variants import softmax
from .common import plane

router = APIRouter(prefix="/v1", tags=["Images and models"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 422, 503, 504)}


class JSONImages(BaseModel):
    images: list[str] = Field(min_length=1, description="base64-encoded image files (PNG, JPEG, ...)")
    top_k: int | None = Field(None, ge=1)


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


async def _image_bytes(request: Request) -> tuple[list[tuple[str, bytes]], int | None]:
    content_type = request.headers.get("content-type", "")
    limit = plane(request).settings.max_images_per_request
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=limit + 1, max_fields=limit + 16)
        files = [(f"file {v.filename or k!r}", await v.read()) for k, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise BadRequest("the form holds no files: send images as file fields (e.g. -F images=@cat.png)")
        return files, None
    if content_type.startswith("application/json"):
        try:
            body = JSONImages.model_validate(orjson.loads(await request.body()))
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}") from None
        except ValidationError as exc:
            raise BadRequest(f"{first_problem(exc.errors())} (expected {{\"images\": [base64, ...]}})") from None
        images = []
        for i, text in enumerate(body.images):
            try:
                images.append((f"images[{i}]", base64.b64decode(text, validate=True)))
            except (binascii.Error, ValueError):
                raise BadRequest(f"images[{i}] is not valid base64") from None
        return images, body.top_k
    raise UnsupportedMediaType(
        f"content type {content_type or 'missing'!r} is not accepted: use multipart/form-data (image files) or application/json"
    )


@router.post("/models/{name}/predict", response_model=PredictResponse, responses=ERRORS,
             summary="Classify uploaded images (multipart files or JSON with base64 images)")
async def predict(request: Request, name: str, top_k: int | None = Query(None, ge=1)) -> PredictResponse:
    dp = plane(request)
    with dp.observe(name, "v1_predict"):
        variant = dp.registry.get(name)
        started = time.perf_counter()  # uvloop's loop.time() has only millisecond resolution
        images, json_top_k = await _image_bytes(request)
        dp.check_count(len(images))
        spec = variant.manifest.input
        rows = await asyncio.to_thread(lambda: to_rows([decode_image(data, label) for label, data in images], spec))
        preprocess_s = time.perf_counter() - started
        served = await dp.predict(variant, rows, dp.deadline(request.headers.get(TIMEOUT_HEADER)))
        k = min(top_k or json_top_k or dp.settings.top_k, len(variant.manifest.labels))
        return _response(served, k, preprocess_s)


def _response(served: Served, k: int, preprocess_s: float) -> PredictResponse:
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
        timings=Timings(preprocess_ms=1000 * preprocess_s, queue_ms=1000 * p.queue_s, compute_ms=1000 * p.compute_s,
                        total_ms=1000 * (preprocess_s + served.total_s)),
    )
