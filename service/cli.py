"""``committee-serve``: serve a model store over HTTP (uvicorn underneath, or granian with ``--server granian``).

Every flag is also an environment variable (``COMMITTEE_<FLAG>``); flags win.
"""

from __future__ import annotations

import logging
import math
import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

if TYPE_CHECKING:
    from .config import Settings

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    store: Annotated[Optional[Path], typer.Option(help="model store folder [COMMITTEE_STORE]")] = None,
    host: Annotated[Optional[str], typer.Option(help="bind address [COMMITTEE_HOST]")] = None,
    port: Annotated[Optional[int], typer.Option(help="port [COMMITTEE_PORT]")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (CUDA provider first, CPU fallback) [COMMITTEE_DEVICE]")] = None,
    max_batch_size: Annotated[Optional[int], typer.Option(help="images per batch at most [COMMITTEE_MAX_BATCH_SIZE]")] = None,
    max_queue_delay_ms: Annotated[Optional[float], typer.Option(help="wait for a batch to fill at most this long [COMMITTEE_MAX_QUEUE_DELAY_MS]")] = None,
    max_queue_size: Annotated[Optional[int], typer.Option(help="queued images per model before 503 [COMMITTEE_MAX_QUEUE_SIZE]")] = None,
    max_queue_wait_ms: Annotated[Optional[float], typer.Option(help="cap on the expected queue wait (503 beyond it); 0 = the request deadline only [COMMITTEE_MAX_QUEUE_WAIT_MS]")] = None,
    max_inflight_requests: Annotated[Optional[int], typer.Option(help="inference requests in the server at once before 503 [COMMITTEE_MAX_INFLIGHT_REQUESTS]")] = None,
    instances: Annotated[Optional[int], typer.Option(help="batches of one model in flight at once [COMMITTEE_INSTANCES]")] = None,
    thread_pool: Annotated[Optional[str], typer.Option(help="per_session or shared ORT intra-op pool [COMMITTEE_THREAD_POOL]")] = None,
    workers: Annotated[Optional[int], typer.Option(help="server processes sharing the port [COMMITTEE_WORKERS]")] = None,
    server: Annotated[Optional[str], typer.Option(help="uvicorn or granian (the `granian` extra) [COMMITTEE_SERVER]")] = None,
    strict_readiness: Annotated[Optional[bool], typer.Option(help="ready only when every model serves [COMMITTEE_STRICT_READINESS]")] = None,
    request_timeout_s: Annotated[Optional[float], typer.Option(help="default request deadline [COMMITTEE_REQUEST_TIMEOUT_S]")] = None,
    intra_op_threads: Annotated[Optional[int], typer.Option(help="ONNX Runtime threads per session, 0 = default [COMMITTEE_INTRA_OP_THREADS]")] = None,
    models: Annotated[Optional[str], typer.Option(help="comma-separated model names to serve (default: all) [COMMITTEE_MODELS]")] = None,
    poll_interval_s: Annotated[Optional[float], typer.Option(help="check the store for new versions every N s, 0 = never [COMMITTEE_POLL_INTERVAL_S]")] = None,
    calibrate: Annotated[Optional[bool], typer.Option(help="time every runner in the background after loading [COMMITTEE_CALIBRATE]")] = None,
    calibration_seconds: Annotated[Optional[float], typer.Option(help="calibration time budget per runner [COMMITTEE_CALIBRATION_SECONDS]")] = None,
    slo_pool: Annotated[Optional[str], typer.Option(help="comma-separated variants POST /v1/predict may pick [COMMITTEE_SLO_POOL]")] = None,
    slo_headroom: Annotated[Optional[float], typer.Option(help="pick for accuracy within this share of the budget [COMMITTEE_SLO_HEADROOM]")] = None,
    log_level: Annotated[Optional[str], typer.Option(help="debug, info, warning, error [COMMITTEE_LOG_LEVEL]")] = None,
) -> None:
    """Serve every model in STORE: Open Inference Protocol under /v2, image upload under /v1,
    Prometheus metrics at /metrics. Admin token, pins and limits come from the environment (see README)."""
    given = {name: value for name, value in locals().items() if value is not None}  # the flags only, taken first
    from .config import Settings

    settings = Settings(**given)
    _configure_logging(settings)
    if settings.server == "granian":
        serve_with_granian(settings)
    else:
        serve_with_uvicorn(settings, given)


def serve_with_uvicorn(settings: Settings, given: dict[str, object]) -> None:
    """The app under uvicorn (uvloop, httptools); several workers rebuild it from the environment,
    where ``given`` (the flags) is written for them. SIGTERM: stop accepting, drain, then exit."""
    import uvicorn

    from .app import create_app

    common = dict(host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False,
                  loop="uvloop", http="httptools", timeout_graceful_shutdown=_drain_s(settings))
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **common)
        return
    # Several processes share the port; each builds its app from the environment, so hand it the flags there.
    for name, value in given.items():
        os.environ[f"COMMITTEE_{name.upper()}"] = str(value)
    uvicorn.run("service.app:create_app", factory=True, workers=settings.workers, **common)


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _drain_s(settings: Settings) -> float:
    """How long a stopping server waits for requests in flight: the longest deadline one may hold, and a margin."""
    return settings.request_timeout_s + 5


def _granian_worker_app(settings: Settings):
    """The app of one granian worker, built in that worker's process (as each of uvicorn's workers
    builds its own): the models, batchers and metrics of a process are its own. A worker that was
    spawned rather than forked starts with no logging set up, hence the call."""
    from .app import create_app

    _configure_logging(settings)
    return create_app(settings)


def serve_with_granian(settings: Settings) -> None:
    """Serve the same ASGI app under granian (a Rust HTTP server): a main process that owns the socket
    and ``settings.workers`` worker processes, each running the app's lifespan (models loaded before
    it accepts; closed after its last request). SIGTERM stops accepting, lets requests in flight
    finish and kills a worker still busy after the drain time. Exits non-zero when a worker fails to
    start (a lifespan error) or dies."""
    try:
        from granian import Granian, loops
        from granian.constants import HTTPModes, Interfaces, Loops
        from granian.log import LogLevels
    except ImportError as exc:
        raise SystemExit(f"--server granian needs granian ({exc}): pip install 'committee[granian]'") from exc
    server = Granian(
        "service.app:create_app",  # named for logs and the process title; the loader below builds the app
        address=settings.host, port=settings.port, interface=Interfaces.ASGI, workers=settings.workers,
        loop=Loops.uvloop if "uvloop" in loops else Loops.asyncio,
        http=HTTPModes.http1,  # what uvicorn speaks (h11/httptools): the two differ in the server only
        log_level=LogLevels(settings.log_level), log_access=False,
        # No backpressure below max_inflight_requests (granian's default: 1024 per worker): the app
        # itself answers overload with a prompt 503, where granian would hold requests unanswered.
        workers_kill_timeout=math.ceil(_drain_s(settings)),
    )
    server.serve(target_loader=partial(_granian_worker_app, settings), wrap_loader=False)
