"""Operator endpoints: reload the store, recalibrate, behind a bearer token (disabled when none is set)."""

from __future__ import annotations

import hmac
from dataclasses import asdict

from fastapi import APIRouter, Request

from ..errors import NotFound, Unauthorized
from ..experiments.definition import Experiment
from .common import error_responses, plane

router = APIRouter(prefix="/v1/admin", tags=["Admin"])


def _authorise(request: Request) -> None:
    token = plane(request).settings.admin_token
    if token is None:
        raise NotFound("admin endpoints are disabled: set COMMITTEE_ADMIN_TOKEN to enable them")
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token.get_secret_value()}".encode()):
        raise Unauthorized("missing or wrong bearer token")


@router.post("/reload", responses=error_responses(401, 404),
             summary="Load new versions from the store now (new versions take traffic once loaded)")
async def reload(request: Request) -> dict:
    _authorise(request)
    return asdict(await plane(request).reload())


@router.post("/calibrate", responses=error_responses(401, 404),
             summary="Measure every served runner again on its runtime (batch-1 latency, best-batch throughput)")
async def calibrate(request: Request) -> dict:
    _authorise(request)
    dp = plane(request)
    done = await dp.calibrator.run(dp.runners(), force=True)
    return {key: asdict(c) for key, c in done.items()}


@router.post("/experiments", status_code=201, response_model=Experiment, responses=error_responses(400, 401, 404),
             summary="Create or replace an experiment (kept in the state database, so every replica sees it)")
async def create_experiment(request: Request, experiment: Experiment) -> Experiment:
    _authorise(request)
    return await plane(request).experiments.create(experiment)


@router.delete("/experiments/{name}", status_code=204, responses=error_responses(401, 404),
               summary="Stop an experiment (its records stay until retention removes them)")
async def delete_experiment(request: Request, name: str) -> None:
    _authorise(request)
    await plane(request).experiments.delete(name)
