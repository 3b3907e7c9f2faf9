"""Errors a client can act on. Each carries its HTTP status; the app turns them into
``{"error": "..."}`` (the Open Inference Protocol's error shape) and never into a 500."""

from __future__ import annotations

from typing import Any, Sequence


def first_problem(errors: Sequence[dict[str, Any]]) -> str:
    """``field.path: message`` of the first of pydantic's validation errors (what to fix first)."""
    err = errors[0]
    where = ".".join(str(p) for p in err["loc"]) or "body"
    return f"{where}: {err['msg']}"


class ServiceError(Exception):
    status = 400
    headers: dict[str, str] = {}
    body: dict[str, object] = {}  # more fields of the error body, beside "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServiceError):
    status = 400


class NotFound(ServiceError):
    status = 404


class PayloadTooLarge(ServiceError):
    status = 413


class UnsupportedMediaType(ServiceError):
    status = 415


class Unprocessable(ServiceError):
    """Well-formed request whose content cannot be used (undecodable or truncated image, wrong shape)."""

    status = 422


class Unauthorized(ServiceError):
    status = 401
    headers = {"WWW-Authenticate": "Bearer"}


class ModelNotReady(ServiceError):
    status = 503


class QueueFull(ServiceError):
    """Load shedding: the model's queue is at ``max_queue_size``, its expected wait is over the
    budget, or the server holds ``max_inflight_requests``. Refused at once rather than left hanging."""

    status = 503

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}


class DeadlineExceeded(ServiceError):
    status = 504


class ShuttingDown(ServiceError):
    status = 503
    headers = {"Retry-After": "5"}


class InferenceFailed(ServiceError):
    """The runtime failed on a batch; only that batch's callers get this. The message names the
    model and batch only: the runtime's own text stays in the server log."""

    status = 500


def check_image_count(n: int, limit: int) -> None:
    """One wording of the per-request image bound for both protocols."""
    if n < 1:
        raise BadRequest("the request holds no images")
    if n > limit:
        raise BadRequest(f"{n} images in one request; the limit is {limit}")
