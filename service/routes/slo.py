"""Trade-offs per variant and the SLO route: what each variant costs here now, and a predict
endpoint that picks the variant from the request's latency budget and accuracy floor."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, Field

from ..dataplane import TIMEOUT_HEADER, Slo, cascade_setting
from ..plot import tradeoff_png
from ..tradeoffs import Tradeoff, to_csv, tradeoffs
from .common import error_responses, plane
from .v1 import PREDICT_BODY, PredictResponse, chosen_top_k, predict_response

router = APIRouter(prefix="/v1", tags=["Trade-offs and SLO routing"])
ERRORS = error_responses(400, 413, 415, 422, 500, 503, 504)
VARIANT_HEADER = "X-Committee-Variant"


@router.get("/tradeoffs", response_model=list[Tradeoff], summary="Accuracy, live latency and cost of every served variant",
            responses={200: {"content": {"text/csv": {"schema": {"type": "string"}},
                                         "image/png": {"schema": {"type": "string", "format": "binary"}}}},
                       **error_responses(400)})
async def get_tradeoffs(request: Request, format: Literal["json", "csv", "png"] = "json") -> Response | list[Tradeoff]:
    dp = plane(request)
    rows = tradeoffs(dp.registry.served(), dp.calibrator, dp.live, dp.settings)
    if format == "csv":
        return PlainTextResponse(to_csv(rows), media_type="text/csv")
    if format == "png":
        return Response(await asyncio.to_thread(tradeoff_png, rows), media_type="image/png")
    return rows


class Routing(BaseModel):
    variant: str
    version: int
    reason: str = Field(description="fits_budget | over_budget_cheapest (nothing was expected to fit: the cheapest per image) | "
                                    "most_accurate (no budget given)")
    budget_met: bool | None = Field(description="the measured server-side latency (decode + queue + compute) was within "
                                                "max_latency_ms (None: no budget)")
    expected_latency_ms: float = Field(description="queue + compute expected at decision time")
    accuracy: float = Field(description="the variant's held-out test accuracy (a cascade's: at the thresholds that served)")
    cascade_point: int | None = Field(None, description="cascades: the operating point that served (0: the thresholds training "
                                                        "fit; higher: lowered under load, see /v1/tradeoffs)")
    thresholds: list[float] | None = Field(None, description="cascades: the exit thresholds of its early stages that served")
    max_latency_ms: float | None
    min_accuracy: float | None
    refused: list[str] = Field(description="more preferred variants that refused admission (overloaded) first")


class RoutedResponse(PredictResponse):
    routing: Routing


@router.post("/predict", response_model=RoutedResponse, responses=ERRORS, openapi_extra=PREDICT_BODY,
             summary="Classify images with the most accurate variant expected to meet a latency budget")
async def predict_routed(
    request: Request,
    response: Response,
    max_latency_ms: float | None = Query(None, gt=0, description="latency budget; also header X-Max-Latency-Ms or JSON field"),
    min_accuracy: float | None = Query(None, ge=0, le=1, description="accuracy floor; also header X-Min-Accuracy or JSON field"),
    top_k: int | None = Query(None, ge=1, le=1000),
    x_max_latency_ms: float | None = Header(None, gt=0),
    x_min_accuracy: float | None = Header(None, ge=0, le=1),
) -> RoutedResponse:
    dp = plane(request)
    budget_ms = max_latency_ms if max_latency_ms is not None else x_max_latency_ms
    floor = min_accuracy if min_accuracy is not None else x_min_accuracy
    slo = Slo(None if budget_ms is None else budget_ms / 1000, floor)
    routed = await dp.predict_routed(request.body, request.headers.get("content-type", ""),
                                     request.headers.get(TIMEOUT_HEADER), slo)
    served = routed.predicted.served
    body = predict_response(served, chosen_top_k(top_k, routed.predicted.top_k, dp.settings.top_k, served))
    m = served.variant.manifest
    budget = routed.slo.max_latency_s
    response.headers[VARIANT_HEADER] = m.name
    # the answer's fields are validated already: copied, not dumped and validated again
    return RoutedResponse.model_construct(**dict(body), routing=Routing(
        variant=m.name, version=m.version, reason=routed.reason,
        budget_met=None if budget is None else served.preprocess_s + served.total_s <= budget,
        expected_latency_ms=1000 * routed.chosen.expected_s, accuracy=routed.chosen.accuracy,
        **cascade_setting(served.variant),
        max_latency_ms=None if budget is None else 1000 * budget, min_accuracy=routed.slo.min_accuracy,
        refused=routed.refused,
    ))
