"""Per-request context that code below the HTTP layer may read (the data plane records it with
experiment predictions): the request id that responses and log lines carry."""

from __future__ import annotations

import contextvars

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
