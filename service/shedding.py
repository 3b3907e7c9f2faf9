"""Refuse overload before the app spends anything on it.

Under overload most requests are refused, and a refusal that first passes the middleware stack,
routing, parameter validation and the data plane costs a good share of an answer: the cores go to
refusing ("Overload collapse" in issue 17). This outermost middleware answers 503 for an inference
request that the server's backlog (``admission.ServerLoad``) would keep past its deadline, from the
path, the query string and two headers only: the body is never read, the connection stays open.
Anything it cannot judge cheaply (a malformed header, an SLO in the JSON body) goes on to the app,
which judges it again with everything known.
"""

from __future__ import annotations

import uuid
from typing import Callable
from urllib.parse import parse_qsl

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from .admission import ServerLoad

INFERENCE_PATHS = ("/infer", "/predict")  # every inference route ends so; nothing else does
REQUEST_ID = b"x-request-id"
ROUTED = "/v1/predict"  # the SLO route: its latency budget is its deadline


def _seconds(raw: bytes | str | None, scale: float = 1.0) -> float | None:
    try:
        value = float(raw) * scale if raw else None
    except ValueError:
        return None
    return value if value is not None and 0 < value < float("inf") else None  # NaN fails both


class EarlyShed:
    def __init__(self, app: ASGIApp, load: Callable[[], ServerLoad | None], default_timeout_s: float,
                 refused: Callable[[], None] = lambda: None) -> None:
        self.app = app
        self.load = load
        self.default_timeout_s = default_timeout_s
        self.refused = refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        load = self.load() if scope["type"] == "http" and scope["method"] == "POST" else None
        if load is None or not load.inflight or not scope["path"].endswith(INFERENCE_PATHS):
            return await self.app(scope, receive, send)
        refusal = load.judge(self._time_left_s(scope))
        if refusal is None:
            return await self.app(scope, receive, send)
        self.refused()
        rid = uuid.uuid4().hex
        body = orjson.dumps({"error": load.overloaded(refusal), "request_id": rid})
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(refusal.retry_after_s).encode()), (REQUEST_ID, rid.encode())]})
        await send({"type": "http.response.body", "body": body})

    def _time_left_s(self, scope: Scope) -> float:
        """The request's deadline as the data plane will set it, read as the app reads it (the first
        of repeated headers, the last of repeated query parameters); what does not parse counts as
        absent (the app then answers 4xx for it)."""
        timeout = _seconds(_first_header(scope, b"x-request-timeout")) or self.default_timeout_s
        if scope["path"] != ROUTED:
            return timeout
        budget = None
        if scope["query_string"]:
            query = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
            budget = _seconds(query.get("max_latency_ms"), 1e-3)
        if budget is None:
            budget = _seconds(_first_header(scope, b"x-max-latency-ms"), 1e-3)
        return min(timeout, budget) if budget is not None else timeout


def _first_header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope["headers"] if key == name), None)
