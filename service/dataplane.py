"""The one place that turns a request into a prediction and its metrics (KServe's ``DataPlane``).

Routes translate HTTP and call one entry point per protocol operation (``infer``,
``predict_images``); this never sees HTTP. Every entry point does the same things in the same
order, cheapest first, so that a request the server will refuse costs it as little as possible:

1. bound the requests in the server (``max_inflight_requests``) → 503 at once;
2. resolve the model, and lease its runners until the answer is out (a reload never closes a
   runner under a request); an unknown name → 404 and never becomes a metric label;
3. the deadline, then admission: a full queue or an expected wait over budget → 503 at once,
   *before* the body is read or parsed;
4. read and parse the body (large bodies in a worker thread, off the event loop), check it
   against the manifest, predict, and record the outcome under the resolved model's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import numpy as np

from model_store import InputSpec

from .config import Settings
from .errors import BadRequest, DeadlineExceeded, QueueFull, ServiceError, check_image_count
from .metrics import ServiceMetrics
from .preprocess import PixelLimits, images_to_rows, normalise
from .protocol import DecodedRequest, decode_request
from .registry import Registry
from .uploads import parse_images
from .variants import Prediction, Variant, input_name

TIMEOUT_HEADER = "X-Request-Timeout"
# Bodies above this are parsed in a worker thread: below it the thread hop costs more than it saves.
OFF_LOOP_BYTES = 64 * 1024

ReadBody = Callable[[], Awaitable[bytes]]


@dataclass
class Served:
    variant: Variant
    prediction: Prediction
    total_s: float  # from inference start to answer
    preprocess_s: float = 0.0


@dataclass
class Inferred:
    """A v2 infer answer: the served prediction and the decoded request it answers."""

    served: Served
    request: DecodedRequest


@dataclass
class ImagesPredicted:
    served: Served
    top_k: int | None  # what the JSON body asked for, if it did


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
        self.pixel_limits = PixelLimits(settings.max_image_pixels, settings.max_request_pixels)
        self._inflight = 0

    # ---- entry points ---------------------------------------------------------------------------
    async def infer(self, name: str, version: int | None, read_body: ReadBody, header_length: str | None,
                    timeout: str | None) -> Inferred:
        """Open Inference Protocol ``infer``: a tensor body in, logits (and friends) out."""
        async with self._serving(name, version, "v2_infer", timeout) as (variant, deadline):
            body = await read_body()
            spec = variant.manifest.input
            decoded = await self._parse(len(body), decode_request, body, header_length,
                                        (spec.channels, spec.height, spec.width), self.settings.max_images_per_request)
            expected_input = input_name(variant)
            if decoded.input_name != expected_input:
                raise BadRequest(f"unknown input {decoded.input_name!r}; this model's input is {expected_input!r}")
            rows = self.rows_from_tensor(spec, decoded.tensor, decoded.datatype, expected_input)
            return Inferred(await self._predict(variant, rows, deadline), decoded)

    async def predict_images(self, name: str, read_body: ReadBody, content_type: str, timeout: str | None) -> ImagesPredicted:
        """Image API: image files (multipart or base64 JSON) in, one prediction per image out."""
        async with self._serving(name, None, "v1_predict", timeout) as (variant, deadline):
            body = await read_body()
            started = time.perf_counter()  # uvloop's loop.time() has only millisecond resolution
            # parsing, base64 and decoding all leave the event loop: they take long on big bodies
            rows, top_k = await asyncio.to_thread(self._image_rows, body, content_type, variant.manifest.input)
            preprocess_s = time.perf_counter() - started
            served = await self._predict(variant, rows, deadline)
            served.preprocess_s = preprocess_s
            return ImagesPredicted(served, top_k)

    # ---- the shared steps ----------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _serving(self, name: str, version: int | None, endpoint: str,
                       timeout: str | None) -> AsyncIterator[tuple[Variant, float]]:
        try:
            if self._inflight >= self.settings.max_inflight_requests:
                raise QueueFull(f"the server is at its limit of {self.settings.max_inflight_requests} requests in flight; retry shortly")
            lease = self.registry.lease(name, version)
        except ServiceError as exc:
            self.metrics.unrouted.labels(endpoint, str(exc.status)).inc()
            raise
        self._inflight += 1
        try:
            with lease as variant, self._observe(variant.manifest.name, endpoint):
                deadline = self.deadline(timeout)
                variant.runners[0].batcher.admit(1, deadline)
                yield variant, deadline
        finally:
            self._inflight -= 1

    def _image_rows(self, body: bytes, content_type: str, spec: InputSpec) -> tuple[np.ndarray, int | None]:
        images, top_k = parse_images(body, content_type, self.settings.max_images_per_request + 1)
        check_image_count(len(images), self.settings.max_images_per_request)
        return images_to_rows(images, spec, self.pixel_limits), top_k

    @staticmethod
    async def _parse(size: int, parse: Callable[..., Any], *args: Any) -> Any:
        if size > OFF_LOOP_BYTES:
            return await asyncio.to_thread(parse, *args)
        return parse(*args)

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
        """A protocol tensor (shape already checked) as model rows: UINT8 means raw pixels (0-255),
        normalised here as the manifest says; float types are taken as already normalised."""
        if datatype == "UINT8":
            return normalise(tensor, spec)
        rows = tensor if tensor.dtype == np.float32 else tensor.astype(np.float32)
        if not np.isfinite(rows).all():
            raise BadRequest(f"input {input_name!r} contains NaN or infinite values")
        return rows

    @contextlib.contextmanager
    def _observe(self, model: str, endpoint: str):
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

    async def _predict(self, variant: Variant, rows: np.ndarray, deadline: float) -> Served:
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
