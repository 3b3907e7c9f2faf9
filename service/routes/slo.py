"""Trade-offs per variant and the SLO route: what each variant costs here now, and a predict
endpoint that picks the variant from the request's latency budget and accuracy floor."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, Field

from ..dataplane import TIMEOUT_HEADER, Slo, cascade_setting
from ..errors import Unprocessable
from ..uploads import MAX_BUDGET_MS, MIN_BUDGET_MS
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
    reason: str = Field(description="fits_budget (the most accurate expected within the headroom) | fits_budget_cheapest "
                                    "(loaded: the cheapest that fits) | over_budget_cheapest (nothing was expected to fit: the "
                                    "cheapest per image) | most_accurate (no budget given)")
    budget_met: bool | None = Field(description="the measured server-side latency (decode + queue + compute) was within "
                                                "max_latency_ms (None: no budget)")
    expected_latency_ms: float = Field(description="expected at decision time: the server's requests ahead, the "
                                                   "model's queue and the compute")
    accuracy: float = Field(description="the variant's held-out test accuracy (a cascade's: at the thresholds that served)")
    cascade_point: int | None = Field(None, description="cascades: the operating point that served (0: the thresholds training "
                                                        "fit; higher: lowered under load, see /v1/tradeoffs)")
    thresholds: list[float] | None = Field(None, description="cascades: the exit thresholds of its early stages that served")
    max_latency_ms: float | None
    min_accuracy: float | None
    refused: list[str] = Field(description="more preferred variants that refused admission (overloaded) first")


class RoutedResponse(PredictResponse):
    routing: Routing


def _bounded(raw: str | None, name: str, low: float, high: float, *, integer: bool = False) -> float | None:
    """A query or header number in [low, high], or 422 saying why."""
    if raw is None:
        return None
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise Unprocessable(f"{name} must be {'an integer' if integer else 'a number'}, got {raw!r}") from None
    if not low <= value <= high:
        raise Unprocessable(f"{name} must be in [{low:g}, {high:g}], got {raw}")
    return value


def _parameter(name: str, where: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": where, "required": False, "schema": schema, "description": description}


# Read by hand rather than declared (FastAPI's per-parameter validation was the largest part of what
# the routed path cost over the named one); documented here, checked in ``_bounded``.
LATENCY = {"type": "number", "minimum": MIN_BUDGET_MS, "maximum": MAX_BUDGET_MS}
ACCURACY = {"type": "number", "minimum": 0, "maximum": 1}
SLO_PARAMETERS = [
    _parameter("max_latency_ms", "query", LATENCY, "latency budget (admission judges against it); also header X-Max-Latency-Ms or JSON field"),
    _parameter("min_accuracy", "query", ACCURACY, "accuracy floor; also header X-Min-Accuracy or JSON field"),
    _parameter("top_k", "query", {"type": "integer", "minimum": 1, "maximum": 1000}, "labels per image"),
    _parameter("x-max-latency-ms", "header", LATENCY, "latency budget, when not in the query"),
    _parameter("x-min-accuracy", "header", ACCURACY, "accuracy floor, when not in the query"),
]


@router.post("/predict", response_model=RoutedResponse, responses=ERRORS, openapi_extra={**PREDICT_BODY, "parameters": SLO_PARAMETERS},
             summary="Classify images with the most accurate variant expected to meet a latency budget")
async def predict_routed(request: Request) -> Response:
    dp = plane(request)
    query, headers = request.query_params, request.headers
    budget_ms = _bounded(query.get("max_latency_ms"), "max_latency_ms", MIN_BUDGET_MS, MAX_BUDGET_MS)
    if budget_ms is None:
        budget_ms = _bounded(headers.get("x-max-latency-ms"), "X-Max-Latency-Ms", MIN_BUDGET_MS, MAX_BUDGET_MS)
    floor = _bounded(query.get("min_accuracy"), "min_accuracy", 0, 1)
    if floor is None:
        floor = _bounded(headers.get("x-min-accuracy"), "X-Min-Accuracy", 0, 1)
    top_k = _bounded(query.get("top_k"), "top_k", 1, 1000, integer=True)
    slo = Slo(None if budget_ms is None else budget_ms / 1000, floor)
    routed = await dp.predict_routed(request.body, headers.get("content-type", ""), headers.get(TIMEOUT_HEADER), slo)
    served = routed.predicted.served
    body = predict_response(served, chosen_top_k(top_k, routed.predicted.top_k, dp.settings.top_k, served))  # type: ignore[arg-type]
    m = served.variant.manifest
    budget = routed.slo.max_latency_s
    # the answer's fields are validated already: copied, not dumped and validated again, and
    # serialised once here (FastAPI would validate the returned model against response_model again)
    answer = RoutedResponse.model_construct(**dict(body), routing=Routing(
        variant=m.name, version=m.version, reason=routed.reason,
        budget_met=None if budget is None else served.preprocess_s + served.total_s <= budget,
        expected_latency_ms=1000 * routed.chosen.expected_s, accuracy=routed.chosen.accuracy,
        **cascade_setting(served.variant),
        max_latency_ms=None if budget is None else 1000 * budget, min_accuracy=routed.slo.min_accuracy,
        refused=routed.refused,
    ))
    return Response(answer.model_dump_json(), media_type="application/json", headers={VARIANT_HEADER: m.name})
