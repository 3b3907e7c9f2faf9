"""The one place that turns a request into a prediction and its metrics (KServe's ``DataPlane``).

Routes translate HTTP and call one entry point per operation (``infer``, ``predict_images``,
``predict_routed``, ``predict_experiment``); this never sees HTTP. Every entry point does the same
things in the same order, cheapest first, so that a request the server will refuse costs it as
little as possible:

1. bound the requests in the server (``max_inflight_requests``) → 503 at once;
2. the deadline; then the candidate variants: the named model, the experiment's arm, or the SLO
   route's choices (which read the body first: it may carry the SLO). An unknown name → 404 that
   never becomes a metric label;
3. admission: the first candidate whose queue admits the request is leased until the answer is out
   (a reload never closes a runner under a request); none → 503 at once, before the body is read;
4. read and parse the body (large bodies in a worker thread, off the event loop), check it
   against the manifest, predict, and record the outcome under the variant's name (and its
   latency in the variant's live window).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import numpy as np

from model_store import InputSpec

from .calibration import Calibrator
from .config import Settings
from .context import request_id
from .experiments.definition import Arm, Experiment
from .experiments.manager import Experiments
from .experiments.state import Database, ExperimentState
from .errors import BadRequest, DeadlineExceeded, QueueFull, ServiceError, check_image_count
from .metrics import ServiceMetrics
from .preprocess import PixelLimits, images_to_rows, normalise
from .protocol import DecodedRequest, decode_request
from .registry import Registry, ReloadReport
from .routing import Candidate, Decision, decide, default_pool
from .tradeoffs import LiveStats
from .uploads import ParsedImages, parse_images
from .variants import Cascade, Prediction, Runner, Variant, input_name, leased

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


@dataclass
class ExperimentPredicted:
    predicted: ImagesPredicted
    experiment: Experiment
    arm: Arm
    request_id: str


@dataclass(frozen=True)
class Slo:
    max_latency_s: float | None = None
    min_accuracy: float | None = None


@dataclass
class Routed:
    """An SLO-routed answer: the prediction, the candidate that served it and why."""

    predicted: ImagesPredicted
    chosen: Candidate
    reason: str
    refused: list[str]  # more accurate candidates that refused admission (overloaded) first
    slo: Slo  # what was asked, from query, headers or the JSON body


def outcome_of(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    status = exc.status if isinstance(exc, ServiceError) else 500
    return {503: "unavailable", 504: "timeout"}.get(status, "client_error" if status < 500 else "error")


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


class DataPlane:
    def __init__(self, registry: Registry, metrics: ServiceMetrics, settings: Settings) -> None:
        self.registry = registry
        self.metrics = metrics
        self.settings = settings
        self.pixel_limits = PixelLimits(settings.max_image_pixels, settings.max_request_pixels)
        self.calibrator = Calibrator(settings.calibration_seconds)
        self.live = LiveStats(settings.latency_window, settings.latency_window_s)
        self._inflight = 0
        self._calibrating: asyncio.Task | None = None
        self._experiments: Experiments | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> ReloadReport:
        """Load the models, then open the experiment state and load the experiments."""
        report = await self.reload()
        s = self.settings
        database = Database(s.database_url.get_secret_value() if s.database_url else None, s.state_dir / "experiments.sqlite3")
        state = await asyncio.to_thread(ExperimentState, database, s.experiment_retention_days * 86400)
        self._experiments = Experiments(state, self.registry, self.metrics, self.pixel_limits,
                                        s.shadow_queue_size, s.shadow_timeout_s)
        await self._experiments.load(s.experiments_file)
        return report

    @property
    def experiments(self) -> Experiments:
        if self._experiments is None:
            raise RuntimeError("the data plane has not started")
        return self._experiments

    async def reload(self) -> ReloadReport:
        """Load what changed in the store; forget the live numbers of replaced versions and
        calibrate new runners in the background (``calibrate`` setting)."""
        report = await self.registry.reload()
        served = self.registry.served()
        self.live.forget_except({str(v.manifest.ref) for v in served})
        if self.settings.calibrate and (self._calibrating is None or self._calibrating.done()):
            self._calibrating = asyncio.create_task(self.calibrator.run(self.runners()))
        return report

    @property
    def inflight(self) -> int:
        return self._inflight

    def runners(self) -> list[Runner]:
        """Every runner of the served variants, once each."""
        return list({r.key: r for v in self.registry.served() for r in v.runners}.values())

    async def close(self) -> None:
        if self._experiments is not None:
            await self._experiments.close()
        if self._calibrating is not None:
            self._calibrating.cancel()
            await asyncio.gather(self._calibrating, return_exceptions=True)
        await self.registry.close()

    # ---- entry points ---------------------------------------------------------------------------
    async def infer(self, name: str, version: int | None, read_body: ReadBody, header_length: str | None,
                    timeout: str | None) -> Inferred:
        """Open Inference Protocol ``infer``: a tensor body in, logits (and friends) out."""
        async with self._serving("v2_infer", timeout, self._named(name, version)) as (variant, deadline):
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
        async with self._serving("v1_predict", timeout, self._named(name)) as (variant, deadline):
            body = await read_body()
            started = time.perf_counter()  # uvloop's loop.time() has only millisecond resolution
            # parsing, base64 and decoding all leave the event loop: they take long on big bodies
            parsed, rows = await asyncio.to_thread(self._parse_and_decode, body, content_type, variant.manifest.input)
            return await self._predict_rows(variant, rows, parsed.top_k, deadline, time.perf_counter() - started)

    async def predict_routed(self, read_body: ReadBody, content_type: str, timeout: str | None, slo: Slo) -> Routed:
        """Image API without a model name: the most accurate variant of the pool expected to meet the
        SLO now (see ``routing``); a variant whose queue refuses admission passes to the next. The
        body is read first: a JSON body may carry the SLO. Query and headers (``slo``) win over it."""
        decision: Decision | None = None
        parsed: ParsedImages | None = None
        wanted = slo
        parse_s = 0.0

        async def candidates() -> list[Variant]:
            nonlocal decision, parsed, parse_s, wanted
            body = await read_body()
            started = time.perf_counter()
            parsed = await self._parse(len(body), self._parse_upload, body, content_type)
            parse_s = time.perf_counter() - started
            wanted = Slo(slo.max_latency_s if slo.max_latency_s is not None else _seconds(parsed.max_latency_ms),
                         slo.min_accuracy if slo.min_accuracy is not None else parsed.min_accuracy)
            pool = default_pool(self.registry.served(), self.settings.slo_pool)
            decision = decide(pool, self.calibrator, self.live, wanted.max_latency_s, wanted.min_accuracy, self.runners())
            return [c.variant for c in decision.order]

        async with self._serving("v1_predict_routed", timeout, candidates) as (variant, deadline):
            assert decision is not None and parsed is not None
            i = next(i for i, c in enumerate(decision.order) if c.variant is variant)
            reason = decision.reasons[i].value
            self.metrics.routing_decisions.labels(variant.manifest.name, reason).inc()
            started = time.perf_counter()
            rows = await asyncio.to_thread(images_to_rows, parsed.files, variant.manifest.input, self.pixel_limits)
            predicted = await self._predict_rows(variant, rows, parsed.top_k, deadline, parse_s + time.perf_counter() - started)
            served = predicted.served
            self.live.observe_routed(str(variant.manifest.ref), decision.order[i].expected_s, served.preprocess_s + served.total_s)
            return Routed(predicted, decision.order[i], reason, [c.variant.manifest.name for c in decision.order[:i]], wanted)

    async def predict_experiment(self, name: str, header: Callable[[str], str | None], read_body: ReadBody,
                                 content_type: str, timeout: str | None) -> ExperimentPredicted:
        """Image API through an experiment: the arm is a sticky function of the key in the
        experiment's key header (a random key when there is none); the answer is recorded under the
        request id, and the shadow (if any) gets the same images off the response path."""
        experiments = self.experiments
        chosen: tuple[Experiment, Arm, str] | None = None

        async def candidates() -> list[Variant]:
            nonlocal chosen
            experiment = await experiments.get(name)
            assignment_key = header(experiment.key_header) or uuid.uuid4().hex
            arm = experiments.assign(experiment, assignment_key)
            chosen = (experiment, arm, assignment_key)
            return [self.registry.get(arm.variant)]

        async with self._serving("v1_experiment", timeout, candidates) as (variant, deadline):
            assert chosen is not None
            experiment, arm, assignment_key = chosen
            body = await read_body()
            started = time.perf_counter()
            parsed, rows = await asyncio.to_thread(self._parse_and_decode, body, content_type, variant.manifest.input)
            predicted = await self._predict_rows(variant, rows, parsed.top_k, deadline, time.perf_counter() - started)
            served = predicted.served
            rid = request_id.get()
            experiments.record(experiment, arm, assignment_key, rid, served.prediction.logits,
                               served.preprocess_s + served.total_s, parsed.files)
            return ExperimentPredicted(predicted, experiment, arm, rid)

    # ---- the shared steps ----------------------------------------------------------------------
    def _named(self, name: str, version: int | None = None) -> Callable[[], Awaitable[list[Variant]]]:
        async def lookup() -> list[Variant]:
            return [self.registry.get(name, version)]
        return lookup

    @contextlib.asynccontextmanager
    async def _serving(self, endpoint: str, timeout: str | None,
                       candidates: Callable[[], Awaitable[list[Variant]]]) -> AsyncIterator[tuple[Variant, float]]:
        """Steps 1-3 of the module docstring for the first of ``candidates`` that admits the request."""
        if self._inflight >= self.settings.max_inflight_requests:
            self.metrics.unrouted.labels(endpoint, "503").inc()
            raise QueueFull(f"the server is at its limit of {self.settings.max_inflight_requests} requests in flight; retry shortly")
        self._inflight += 1
        try:
            try:
                deadline = self.deadline(timeout)
                variants = await candidates()
            except ServiceError as exc:
                self.metrics.unrouted.labels(endpoint, str(exc.status)).inc()
                raise
            # no await from here to the lease: a reload cannot close these runners in between
            variant, refusal = self._admitted(variants, deadline)
            with leased(variant), self._observe(variant, endpoint):
                if refusal is not None:
                    raise refusal
                yield variant, deadline
        finally:
            self._inflight -= 1

    @staticmethod
    def _admitted(variants: list[Variant], deadline: float) -> tuple[Variant, ServiceError | None]:
        """The first variant whose queue admits one more image now; else the first, with its refusal."""
        first_refusal: ServiceError | None = None
        for variant in variants:
            try:
                variant.runners[0].batcher.admit(1, deadline)
                return variant, None
            except ServiceError as exc:
                first_refusal = first_refusal or exc
        return variants[0], first_refusal

    async def _predict_rows(self, variant: Variant, rows: np.ndarray, top_k: int | None, deadline: float,
                            preprocess_s: float) -> ImagesPredicted:
        served = await self._predict(variant, rows, deadline)
        served.preprocess_s = preprocess_s
        return ImagesPredicted(served, top_k)

    def _parse_upload(self, body: bytes, content_type: str) -> ParsedImages:
        parsed = parse_images(body, content_type, self.settings.max_images_per_request + 1)
        check_image_count(len(parsed.files), self.settings.max_images_per_request)
        return parsed

    def _parse_and_decode(self, body: bytes, content_type: str, spec: InputSpec) -> tuple[ParsedImages, np.ndarray]:
        parsed = self._parse_upload(body, content_type)
        return parsed, images_to_rows(parsed.files, spec, self.pixel_limits)

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
    def _observe(self, variant: Variant, endpoint: str):
        """Count the request with its outcome and time it, whatever happens inside; a success also
        enters the variant's live latency window."""
        model = variant.manifest.name
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
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(model, endpoint, outcome_of(error)).inc()
            self.metrics.request_duration.labels(model, endpoint).observe(elapsed)
            if error is None:
                self.live.window(str(variant.manifest.ref)).observe(elapsed)

    async def _predict(self, variant: Variant, rows: np.ndarray, deadline: float) -> Served:
        started = time.perf_counter()
        if deadline <= time.monotonic():
            raise DeadlineExceeded("the request's deadline passed before inference started")
        prediction = await variant.predict(rows, deadline)
        name = variant.manifest.name
        self.metrics.queue_wait.labels(name).observe(prediction.queue_s)
        if prediction.exit_stage is not None and isinstance(variant, Cascade):
            for stage, count in zip(*np.unique(prediction.exit_stage, return_counts=True)):
                self.metrics.cascade_exits.labels(name, str(stage)).inc(int(count))
            self.live.observe_exits(str(variant.manifest.ref), prediction.exit_stage, len(variant.stages))
        return Served(variant, prediction, time.perf_counter() - started)
