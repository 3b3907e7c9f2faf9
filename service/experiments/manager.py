"""Running experiments: definitions (file + admin routes, kept in the state database so replicas
share them), sticky assignment, the shadow arm, records, feedback and reports.

The shadow runs off the response path (on requests whose arm is another variant): after the
primary answer is computed its images go into
the experiment's bounded shadow queue, and one worker per experiment runs the shadow variant
through the same batchers as live traffic. When the queue is full the work is dropped and
counted; it never delays or fails the primary answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from ..errors import BadRequest, NotFound, first_problem
from ..metrics import ServiceMetrics
from ..preprocess import PixelLimits, images_to_rows
from ..registry import Registry
from ..variants import leased, log_softmax
from .definition import Arm, Experiment, load_experiments
from .report import Report, build_report
from .state import ExperimentState, Prediction, ShadowResult

log = logging.getLogger("committee.experiments")
TOP_K_STORED = 5


@dataclass
class ShadowJob:
    experiment: Experiment
    request_id: str
    files: list[tuple[str, bytes]]
    primary_log_probs: np.ndarray  # images x classes; the first image is the one compared
    deadline: float


def top_k(log_probs: np.ndarray, k: int = TOP_K_STORED) -> list[tuple[int, float]]:
    probs = np.exp(log_probs)
    order = np.argsort(-probs)[:k]
    return [(int(i), round(float(probs[i]), 6)) for i in order]


class Experiments:
    def __init__(self, state: ExperimentState, registry: Registry, metrics: ServiceMetrics, pixel_limits: PixelLimits,
                 shadow_queue_size: int, shadow_timeout_s: float) -> None:
        self.state = state
        self.registry = registry
        self.metrics = metrics
        self.pixel_limits = pixel_limits
        self.shadow_queue_size = shadow_queue_size
        self.shadow_timeout_s = shadow_timeout_s
        self.defined: dict[str, Experiment] = {}
        self._queues: dict[str, asyncio.Queue[ShadowJob]] = {}
        self._workers: dict[str, asyncio.Task] = {}

    # ---- definitions ----------------------------------------------------------------------------
    async def load(self, path: Path | None) -> None:
        """The file's experiments (they win over saved ones of the same name), then the saved ones."""
        saved = await asyncio.to_thread(self.state.saved_experiments)
        for name, raw in saved.items():
            try:
                self._define(Experiment.model_validate(raw))
            except ValidationError as exc:
                log.error("saved experiment %s is invalid and skipped: %s", name, first_problem(exc.errors()))
        for experiment in load_experiments(path) if path else []:
            self._define(experiment)
        log.info("experiments: %s", ", ".join(self.defined) or "none")

    async def create(self, experiment: Experiment) -> Experiment:
        self.check_labels(experiment)
        self._define(experiment)
        self.state.save_experiment(experiment.name, experiment.model_dump(mode="json"))
        return experiment

    async def delete(self, name: str) -> None:
        await self.get(name)
        self.defined.pop(name)
        worker = self._workers.pop(name, None)
        if worker:
            worker.cancel()
        self._queues.pop(name, None)
        self.state.delete_experiment(name)

    async def get(self, name: str) -> Experiment:
        """Defined here, or created through another replica since (looked up in the shared state)."""
        experiment = self.defined.get(name)
        if experiment is None:
            saved = (await asyncio.to_thread(self.state.saved_experiments)).get(name)
            if saved is None:
                raise NotFound(f"experiment {name!r} does not exist; GET /v1/experiments lists them")
            experiment = self._define(Experiment.model_validate(saved))
        return experiment

    def check_labels(self, experiment: Experiment) -> None:
        """Every served variant of the experiment answers in the same label set (else the
        comparison would compare different questions)."""
        label_sets = {}
        for name in experiment.variants():
            try:
                label_sets[name] = tuple(self.registry.get(name).manifest.labels)
            except Exception:
                continue  # not served (yet): its requests answer 404/503 until it is
        if len(set(label_sets.values())) > 1:
            raise BadRequest(f"experiment {experiment.name!r}: its variants do not share one label set: {sorted(label_sets)}")

    def _define(self, experiment: Experiment) -> Experiment:
        self.defined[experiment.name] = experiment
        # series exist from the start (at 0), so ratios and rates are defined before the first event
        for arm in experiment.arms:
            self.metrics.experiment_assignments.labels(experiment.name, arm.name)
        if experiment.shadow:
            self.metrics.shadow_agreements.labels(experiment.name)
            for outcome in ("done", "dropped", "failed"):
                self.metrics.shadow_runs.labels(experiment.name, outcome)
        if experiment.shadow and experiment.name not in self._workers:
            self._queues[experiment.name] = asyncio.Queue(self.shadow_queue_size)
            self._workers[experiment.name] = asyncio.create_task(self._shadow_worker(experiment.name))
        return experiment

    # ---- serving ------------------------------------------------------------------------------
    def assign(self, experiment: Experiment, key: str) -> Arm:
        arm = experiment.assign(key)
        self.metrics.experiment_assignments.labels(experiment.name, arm.name).inc()
        return arm

    def record(self, experiment: Experiment, arm: Arm, key: str, request_id: str, logits: np.ndarray, latency_s: float,
               files: list[tuple[str, bytes]]) -> None:
        """Store the primary answer (its first image) and hand the images to the shadow, if any."""
        log_probs = log_softmax(logits.astype(np.float64))
        self.state.record_prediction(Prediction(
            request_id, experiment.name, arm.name, arm.variant, key, 1000 * latency_s,
            int(log_probs[0].argmax()), top_k(log_probs[0]), time.time()))
        if experiment.shadow is None or experiment.shadow == arm.variant:  # nothing to compare with itself
            return
        job = ShadowJob(experiment, request_id, files[:1], log_probs[:1], time.monotonic() + self.shadow_timeout_s)
        try:
            self._queues[experiment.name].put_nowait(job)
        except asyncio.QueueFull:
            self.metrics.shadow_runs.labels(experiment.name, "dropped").inc()

    async def _shadow_worker(self, name: str) -> None:
        queue = self._queues[name]
        while True:
            job = await queue.get()
            try:
                await self._run_shadow(job)
                self.metrics.shadow_runs.labels(name, "done").inc()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failed shadow is counted and logged; the primary already answered
                self.metrics.shadow_runs.labels(name, "failed").inc()
                log.warning("shadow %s of experiment %s failed: %s", job.experiment.shadow, name, exc)

    async def _run_shadow(self, job: ShadowJob) -> None:
        started = time.perf_counter()
        with leased(self.registry.get(job.experiment.shadow)) as variant:  # type: ignore[arg-type]
            rows = await asyncio.to_thread(images_to_rows, job.files, variant.manifest.input, self.pixel_limits)
            prediction = await variant.predict(rows, job.deadline)
        shadow = log_softmax(prediction.logits.astype(np.float64))[0]
        primary = job.primary_log_probs[0]
        kl = float((np.exp(primary) * (primary - shadow)).sum())
        agree = int(shadow.argmax()) == int(primary.argmax())
        if agree:
            self.metrics.shadow_agreements.labels(job.experiment.name).inc()
        self.state.record_shadow(ShadowResult(job.request_id, variant.manifest.name, int(shadow.argmax()), top_k(shadow),
                                              kl, 1000 * (time.perf_counter() - started)))

    # ---- feedback and reports --------------------------------------------------------------------
    async def feedback(self, items: list[tuple[str, str | int]]) -> list[str]:
        """Record true labels (name or index) for request ids; one status per item:
        ``recorded``, ``unknown request id``, or ``unknown label ...``."""
        await asyncio.to_thread(self.state.flush)  # predictions answered just now are in the database
        known = await asyncio.to_thread(self.state.predictions_of, [rid for rid, _ in items])
        statuses = []
        for rid, label in items:
            if rid not in known:
                statuses.append("unknown request id")
                continue
            experiment, arm, variant, top1 = known[rid]
            index = self._label_index(variant, label)
            if isinstance(index, str):
                statuses.append(index)
                continue
            self.state.record_feedback(rid, index)
            self.metrics.feedback.labels(experiment, arm, "correct" if top1 == index else "wrong").inc()
            statuses.append("recorded")
        return statuses

    def _label_index(self, variant: str, label: str | int) -> int | str:
        try:
            labels = self.registry.get(variant).manifest.labels
        except Exception:
            labels = None
        if isinstance(label, int):
            if labels is not None and not 0 <= label < len(labels):
                return f"unknown label index {label} (the model has {len(labels)} classes)"
            return label
        if labels is None or label not in labels:
            return f"unknown label {label!r}" + (f"; labels are {labels}" if labels else " (the variant is not served: send the index)")
        return labels.index(label)

    async def report(self, name: str) -> Report:
        experiment = await self.get(name)
        await asyncio.to_thread(self.state.flush)
        outcomes = await asyncio.to_thread(self.state.outcomes, name)
        return await asyncio.to_thread(build_report, experiment, outcomes)

    async def close(self) -> None:
        for task in self._workers.values():
            task.cancel()
        await asyncio.gather(*self._workers.values(), return_exceptions=True)
        await asyncio.to_thread(self.state.close)
