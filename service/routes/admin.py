"""Operator endpoints: reload the store, recalibrate, behind a bearer token (disabled when none is set)."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request

from ..errors import NotFound
from ..experiments.definition import Experiment
from .common import error_responses, plane, require_bearer
from .experiments import ExperimentRun, run_info

router = APIRouter(prefix="/v1/admin", tags=["Admin"])


def _authorise(request: Request) -> None:
    token = plane(request).settings.admin_token
    if token is None:
        raise NotFound("admin endpoints are disabled: set COMMITTEE_ADMIN_TOKEN to enable them")
    require_bearer(request, token)


@router.post("/reload", responses=error_responses(401, 404),
             summary="Load new versions from the store now (new versions take traffic once loaded)")
async def reload(request: Request) -> dict:
    _authorise(request)
    return asdict(await plane(request).reload())


@router.post("/calibrate", responses=error_responses(401, 404),
             summary="Measure every served runner again on its runtime (batch-1 latency, best-batch throughput)")
async def calibrate(request: Request) -> dict:
    _authorise(request)
    done = await plane(request).calibrate()
    return {key: asdict(c) for key, c in done.items()}


@router.post("/experiments", status_code=201, response_model=ExperimentRun, responses=error_responses(400, 401, 404, 503),
             summary="Create or replace an experiment: starts a new run (a replaced run is archived, never pooled); "
                     "kept in the state database, in force on every replica within COMMITTEE_EXPERIMENT_REFRESH_S")
async def create_experiment(request: Request, experiment: Experiment) -> ExperimentRun:
    _authorise(request)
    return run_info(await plane(request).experiments.create(experiment))


@router.delete("/experiments/{name}", status_code=204, responses=error_responses(401, 404, 503),
               summary="End an experiment's live run (its report stays readable until retention removes it)")
async def delete_experiment(request: Request, name: str) -> None:
    _authorise(request)
    await plane(request).experiments.delete(name)
