"""Between HTTP and the variants: input checks against the manifest, deadlines, and metrics.

Routes stay thin: they decode the body and call this; this never sees HTTP.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from model_store import InputSpec

from .config import Settings
from .errors import BadRequest, DeadlineExceeded, ServiceError
from .metrics import ServiceMetrics
from .preprocess import normalise
from .registry import Registry
from .variants import Prediction, Variant

TIMEOUT_HEADER = "X-Request-Timeout"


@dataclass
class Served:
    variant: Variant
    prediction: Prediction
    total_s: float


def outcome_of(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    status = exc.status if isinstance(exc, ServiceError) else 500
    return {503: "unavailable", 504: "timeout"}.get(status, "client_error" if status < 500 else "error")


class DataPlane:
    def __init__(self, registry: Registry, metrics: ServiceMetrics, settings: Settings) -> None:
        self.registry = registry
        self.metrics = metrics
        self.settings = settings

    def deadline(self, header: str | None) -> float:
        """Monotonic deadline from the default timeout or the ``X-Request-Timeout`` header (seconds)."""
        timeout = self.settings.request_timeout_s
        if header is not None:
            try:
                timeout = float(header)
            except ValueError:
                raise BadRequest(f"{TIMEOUT_HEADER} must be a number of seconds, got {header!r}") from None
            if not 0 < timeout <= 3600:
                raise BadRequest(f"{TIMEOUT_HEADER} must be in (0, 3600] seconds, got {timeout}")
        return time.monotonic() + timeout

    def rows_from_tensor(self, spec: InputSpec, tensor: np.ndarray, datatype: str, input_name: str) -> np.ndarray:
        """Check a protocol tensor against the model's input; UINT8 means raw pixels (0-255) and is
        normalised here as the manifest says, float types are taken as already normalised."""
        expected = [spec.channels, spec.height, spec.width]
        if tensor.ndim != 4 or list(tensor.shape[1:]) != expected:
            raise BadRequest(f"input {input_name!r}: shape must be [N, {', '.join(map(str, expected))}], got {list(tensor.shape)}")
        self.check_count(len(tensor))
        if datatype == "UINT8":
            return normalise(tensor, spec)
        rows = tensor if tensor.dtype == np.float32 else tensor.astype(np.float32)
        if not np.isfinite(rows).all():
            raise BadRequest(f"input {input_name!r} contains NaN or infinite values")
        return rows

    def check_count(self, n: int) -> None:
        if n < 1:
            raise BadRequest("the request holds no images")
        if n > self.settings.max_images_per_request:
            raise BadRequest(f"{n} images in one request; the limit is {self.settings.max_images_per_request}")

    @contextmanager
    def observe(self, model: str, endpoint: str) -> Iterator[None]:
        """Count the request with its outcome and time it, whatever happens inside."""
        started = time.perf_counter()
        inflight = self.metrics.inflight.labels(model)
        inflight.inc()
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            inflight.dec()
            self.metrics.requests.labels(model, endpoint, outcome_of(error)).inc()
            self.metrics.request_duration.labels(model, endpoint).observe(time.perf_counter() - started)

    async def predict(self, variant: Variant, rows: np.ndarray, deadline: float) -> Served:
        started = time.perf_counter()
        if deadline <= time.monotonic():
            raise DeadlineExceeded("the request's deadline passed before inference started")
        prediction = await variant.predict(rows, deadline)
        name = variant.manifest.name
        self.metrics.queue_wait.labels(name).observe(prediction.queue_s)
        if prediction.exit_stage is not None:
            for stage, count in zip(*np.unique(prediction.exit_stage, return_counts=True)):
                self.metrics.cascade_exits.labels(name, str(stage)).inc(int(count))
        return Served(variant, prediction, time.perf_counter() - started)
