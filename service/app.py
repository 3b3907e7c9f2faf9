"""The application factory: registry + data plane + routes + error handling + metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .config import Settings
from .context import request_id
from .dataplane import SERVER, DataPlane
from .shedding import EarlyShed
from .errors import PayloadTooLarge, QueueFull, ServiceError, first_problem
from .experiments.manager import Experiments
from .experiments.state import Database, ExperimentState
from .preprocess import PixelLimits
from .protocol import InferenceRequest
from .metrics import CONTENT_TYPE_LATEST, ServiceMetrics
from .registry import Registry
from .routes import admin, experiments, overview, slo, v1, v2
from .routes.experiments import FeedbackRequest

log = logging.getLogger("committee.app")

REQUEST_ID_HEADER = "X-Request-Id"
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class RequestContext:
    """Give every request an id (the client's ``X-Request-Id`` when it is sane, else a new one),
    echo it in the response, and turn any exception that escaped the app into a 500 whose body
    says only that the server failed, with the id that the log line carries. Nothing escapes to
    the server, so the connection stays usable for the next request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1")
        rid = given if _CLIENT_ID.match(given) else uuid.uuid4().hex
        request_id.set(rid)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.lower().encode(), rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s %s failed (request id %s)", scope.get("method"), scope.get("path"), rid)
            if not started:
                await send_with_id({"type": "http.response.start", "status": 500,
                                    "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body",
                            "body": JSONResponse.render(None, {"error": "internal server error", "request_id": rid})})


def error_body(message: str, status: int) -> dict[str, str]:
    """The ``{error}`` shape; server errors add the request id, so a report can be found in the log."""
    return {"error": message, "request_id": request_id.get()} if status >= 500 else {"error": message}


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with 413 before the app reads them (declared length) or
    as soon as the streamed bytes pass the limit (chunked uploads); and refuse with 503 a request
    whose body would take the bytes held by the requests in the server past ``inflight_limit``:
    before its body is read when it declares its length, else as its chunks arrive. Bytes count as
    they arrive (a connection that only declares a length holds nothing) until the answer is sent;
    a request alone in the server may always hold up to ``limit``. The budget is per process."""

    def __init__(self, app: ASGIApp, limit: int, inflight_limit: int, refused: Callable[[], None] = lambda: None) -> None:
        self.app = app
        self.limit = limit
        self.inflight_limit = inflight_limit
        self.refused = refused
        self.held = 0  # body bytes received by the requests in the server now

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        size = int(declared) if declared is not None and declared.isdigit() else 0
        if size > self.limit:
            return await self._refuse(send, 413, f"request body of {size}+ bytes is over the limit of {self.limit} bytes")
        if size and self.held and self.held + size > self.inflight_limit:
            self.refused()
            return await self._refuse(send, 503, self._full(), retry_after=True)
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                chunk = len(message.get("body", b""))
                seen += chunk
                self.held += chunk
                if seen > self.limit:  # surfaces in the route's body read, answered by the error handler
                    raise PayloadTooLarge(f"request body of {seen}+ bytes is over the limit of {self.limit} bytes")
                if not size and self.held > self.inflight_limit and self.held > seen:  # chunked, and not alone
                    self.refused()
                    raise QueueFull(self._full())
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except PayloadTooLarge:
            if not started:
                await self._refuse(send, 413, f"request body of {seen}+ bytes is over the limit of {self.limit} bytes")
        finally:
            self.held -= seen

    def _full(self) -> str:
        return f"the server holds {self.held} bytes of request bodies (limit {self.inflight_limit}); retry shortly"

    @staticmethod
    async def _refuse(send: Send, status: int, message: str, retry_after: bool = False) -> None:
        body = JSONResponse({"error": message}, status, headers={"Retry-After": "1"} if retry_after else None)
        await send({"type": "http.response.start", "status": status, "headers": body.raw_headers})
        await send({"type": "http.response.body", "body": body.body})


def openapi_components() -> dict[str, dict]:
    """Schemas of bodies the routes read themselves (FastAPI cannot see them): the v2 infer
    request and the feedback body."""
    components: dict[str, dict] = {}
    for model in (InferenceRequest, FeedbackRequest):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update({**schema.pop("$defs", {}), model.__name__: schema})
    return components


def add_components(schema: dict, extra: dict[str, dict]) -> None:
    """Add ``extra`` to the schema's components; a name FastAPI already gave another model is a bug
    (one would silently replace the other), so it fails loudly."""
    existing = schema.setdefault("components", {}).setdefault("schemas", {})
    clashes = [name for name in extra if name in existing and existing[name] != extra[name]]
    if clashes:
        raise RuntimeError(f"OpenAPI component names used twice: {clashes}")
    existing.update(extra)


def experiment_state(settings: Settings, metrics: ServiceMetrics) -> ExperimentState:
    """The experiment database (SQLite under the state folder, or PostgreSQL) behind its writer,
    with its gauges read at scrape time."""
    s = settings
    database = Database(s.database_url.get_secret_value() if s.database_url else None, s.state_dir / "experiments.sqlite3",
                        s.database_connect_timeout_s, s.database_statement_timeout_s)
    state = ExperimentState(database, s.experiment_retention_days * 86400, s.experiment_buffer_records,
                            on_drop=lambda reason, count: metrics.experiment_records_dropped.labels(reason).inc(count))
    metrics.experiment_state_up.set_function(lambda: int(state.up))
    metrics.experiment_records_pending.set_function(lambda: state.pending)
    return state


def create_app(settings: Settings | None = None) -> FastAPI:
    """The composition root: every long-lived part is built here once, started in ``lifespan`` and
    closed there once, in reverse order. Store polling reloads models only."""
    settings = settings or Settings()
    metrics = ServiceMetrics()
    registry = Registry(settings, metrics)
    experiment_runs = Experiments(
        experiment_state(settings, metrics), registry, metrics, PixelLimits(settings.max_image_pixels, settings.max_request_pixels),
        experiments_file=settings.experiments_file, refresh_s=settings.experiment_refresh_s,
        report_cache_s=settings.report_cache_s, flush_timeout_s=settings.database_connect_timeout_s,
        call_timeout_s=settings.database_statement_timeout_s,
        shadow_queue_size=settings.shadow_queue_size, shadow_max_bytes=settings.shadow_max_bytes,
        shadow_timeout_s=settings.shadow_timeout_s)
    plane = DataPlane(registry, metrics, settings, experiment_runs)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        report = await plane.reload()
        log.info("serving %d model(s) from %s; failed: %s", len(report.loaded), settings.store, report.failed or "none")
        await experiment_runs.start()  # connects in the background: a database that is down never blocks serving
        poller = asyncio.create_task(_poll(plane, settings.poll_interval_s)) if settings.poll_interval_s else None
        try:
            yield
        finally:
            if poller:
                poller.cancel()
                await asyncio.gather(poller, return_exceptions=True)
            await experiment_runs.close()
            await plane.close()

    app = FastAPI(
        title="Committee",
        version=__version__,
        description="Ensembles, cascades and distilled students behind ONNX Runtime with dynamic batching.",
        lifespan=lifespan,
    )
    app.state.plane = plane
    app.include_router(v2.router)
    app.include_router(v1.router)
    app.include_router(slo.router)
    app.include_router(experiments.router)
    app.include_router(overview.router)
    app.include_router(admin.router)

    @app.get("/metrics", tags=["Operations"], summary="Prometheus exposition", response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format 0.0.4 / 1.0.0"}})
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            add_components(schema, openapi_components())
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        if exc.status >= 500 and exc.status not in (503, 504):
            log.error("request %s: %s", request_id.get(), exc.message)
        return JSONResponse({**error_body(exc.message, exc.status), **exc.body}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own refusals (unknown route, wrong method) in our error shape.
        return JSONResponse(error_body(str(exc.detail), exc.status_code), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": first_problem(exc.errors())}, status_code=400)

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, inflight_limit=settings.max_inflight_body_bytes,
                       refused=metrics.shed.labels(SERVER, "body_bytes").inc)
    app.add_middleware(RequestContext)  # it also sees what BodyLimit raises
    # outermost: a refusal under overload costs nothing of the rest (see shedding)
    app.add_middleware(EarlyShed, load=lambda: plane.load, default_timeout_s=settings.request_timeout_s,
                       refused=metrics.shed.labels(SERVER, "server_backlog").inc)
    return app


async def _poll(plane: DataPlane, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            report = await plane.reload()
            if report.loaded or report.failed or report.removed:
                log.info("reload: loaded %s, failed %s, removed %s", report.loaded, report.failed, report.removed)
        except Exception:  # a bad poll must not stop polling
            log.exception("store poll failed")
