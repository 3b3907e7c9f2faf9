"""A/B experiments: predict through an experiment, post labelled feedback, read the report."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field, StrictInt, StrictStr

from ..dataplane import TIMEOUT_HEADER
from ..experiments.definition import Experiment
from ..experiments.report import Report
from .common import error_responses, plane
from .v1 import PREDICT_BODY, PredictResponse, chosen_top_k, predict_response

router = APIRouter(prefix="/v1", tags=["Experiments"])
ERRORS = error_responses(400, 404, 413, 415, 422, 500, 503, 504)
ARM_HEADER = "X-Experiment-Arm"


class ExperimentResponse(PredictResponse):
    experiment: str
    arm: str
    request_id: str = Field(description="send it back with the true label to POST /v1/feedback")


class Label(BaseModel):
    request_id: str = Field(min_length=1, max_length=64)
    label: StrictStr | StrictInt = Field(description="class name or index")


class FeedbackRequest(BaseModel):
    feedback: list[Label] = Field(min_length=1, max_length=10_000)


class FeedbackStatus(BaseModel):
    request_id: str
    status: str = Field(description="recorded | unknown request id | unknown label ...")


class FeedbackResponse(BaseModel):
    recorded: int
    results: list[FeedbackStatus]


@router.get("/experiments", response_model=list[Experiment], summary="Every experiment's definition")
async def list_experiments(request: Request) -> list[Experiment]:
    return list(plane(request).experiments.defined.values())


@router.get("/experiments/{name}", response_model=Report, responses=ERRORS,
            summary="Per arm: requests, latency, online accuracy (Wilson 95 %); A vs B with an always-valid verdict; paired shadow comparison")
async def report(request: Request, name: str) -> Report:
    return await plane(request).experiments.report(name)


@router.post("/experiments/{name}/predict", response_model=ExperimentResponse, responses=ERRORS, openapi_extra=PREDICT_BODY,
             summary="Classify images through an experiment: the arm is sticky per X-Experiment-Key (or the experiment's key header)")
async def predict(request: Request, response: Response, name: str) -> ExperimentResponse:
    dp = plane(request)
    result = await dp.predict_experiment(name, request.headers.get, request.body,
                                         request.headers.get("content-type", ""), request.headers.get(TIMEOUT_HEADER))
    served = result.predicted.served
    body = predict_response(served, chosen_top_k(None, result.predicted.top_k, dp.settings.top_k, served))
    response.headers[ARM_HEADER] = result.arm.name
    return ExperimentResponse(**body.model_dump(), experiment=result.experiment.name, arm=result.arm.name,
                              request_id=result.request_id)


@router.post("/feedback", response_model=FeedbackResponse, responses=error_responses(400),
             summary="True labels for request ids answered through an experiment (many at once)")
async def feedback(request: Request, body: FeedbackRequest) -> FeedbackResponse:
    statuses = await plane(request).experiments.feedback([(f.request_id, f.label) for f in body.feedback])
    return FeedbackResponse(recorded=statuses.count("recorded"),
                            results=[FeedbackStatus(request_id=f.request_id, status=s) for f, s in zip(body.feedback, statuses)])
