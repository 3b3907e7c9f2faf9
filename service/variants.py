"""What the data plane calls: a variant turns normalised input rows into logits.

``Runner`` is one ONNX model behind its batcher. ``SingleModel`` serves one runner (member,
ensemble, adaptive ensemble, student). ``Cascade`` runs its stages through the members' runners,
sending on only the images whose confidence is still under the stage's threshold; its logits are
the stages that ran combined by the manifest's rule (``mean_prob`` by default), in log space.

A request holds a *lease* on every runner its variant uses, from lookup to answer: a runner
replaced by a reload is closed only when its last lease is returned, so a long request, or a
cascade's later stage, never meets a closed batcher.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import numpy as np

from model_store import CombineRule, Confidence, Manifest

from .batcher import DynamicBatcher
from .runtime import Runtime


@dataclass
class Prediction:
    logits: np.ndarray  # images x classes, float32
    queue_s: float = 0.0
    compute_s: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)
    exit_stage: np.ndarray | None = None  # cascades: 1-based stage that answered each image
    member_logits: np.ndarray | None = None  # ensembles: images x members x classes


@dataclass
class Runner:
    manifest: Manifest
    runtime: Runtime
    batcher: DynamicBatcher
    leases: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    key: str = field(init=False)  # name:version, the runner's identity in metrics and caches

    def __post_init__(self) -> None:
        self.key = str(self.manifest.ref)
        self._idle.set()

    def acquire(self) -> None:
        self.leases += 1
        self._idle.clear()

    def release(self) -> None:
        self.leases -= 1
        if self.leases == 0:
            self._idle.set()

    async def idle(self) -> None:
        """Return once no request holds this runner."""
        await self._idle.wait()


class Variant(Protocol):
    manifest: Manifest
    key: str  # name:version, what live numbers are kept under (made once: requests look it up)

    @property
    def providers(self) -> list[str]: ...

    @property
    def runners(self) -> list[Runner]: ...

    async def predict(self, rows: np.ndarray, deadline: float) -> Prediction: ...


def input_name(variant: Variant) -> str:
    """The name of the variant's input tensor (a cascade takes its stages' common input)."""
    io = variant.manifest.io
    return io.input_name if io else "input"


@contextlib.contextmanager
def leased(variant: Variant) -> Iterator[Variant]:
    """Hold every runner of ``variant`` for the duration of a request."""
    runners = variant.runners
    for r in runners:
        r.acquire()
    try:
        yield variant
    finally:
        for r in runners:
            r.release()


class SingleModel:
    def __init__(self, runner: Runner) -> None:
        self.manifest = runner.manifest
        self.key = runner.key
        self.runner = runner

    @property
    def providers(self) -> list[str]:
        return self.runner.runtime.providers

    @property
    def runners(self) -> list[Runner]:
        return [self.runner]

    async def predict(self, rows: np.ndarray, deadline: float) -> Prediction:
        result = await self.runner.batcher.submit(rows, deadline)
        return Prediction(
            logits=result.outputs[0], queue_s=result.queue_s, compute_s=result.compute_s,
            batch_sizes=list(result.batch_sizes), member_logits=result.outputs[1] if len(result.outputs) > 1 else None,
        )


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def combine(log_probs: np.ndarray, rule: CombineRule) -> np.ndarray:
    """Merge stages' log-probabilities (stages x images x classes) into log-probabilities
    (images x classes) by ``rule``, as training's ensembles do; finite wherever the inputs are."""
    k = len(log_probs)
    if rule is CombineRule.MEAN_PROB:  # log(mean(p)) without leaving log space
        top = log_probs.max(axis=0)
        return top + np.log(np.exp(log_probs - top).sum(axis=0)) - np.log(k)
    if rule is CombineRule.MEAN_LOGIT:  # normalised geometric mean
        return log_softmax(log_probs.mean(axis=0))
    votes = (log_probs == log_probs.max(axis=-1, keepdims=True)).astype(np.float64)
    share = (votes / votes.sum(axis=-1, keepdims=True)).mean(axis=0)
    return np.log(np.clip(share, 1e-6, None))


def confidence(probs: np.ndarray, kind: Confidence) -> np.ndarray:
    """The score a stage compares with its threshold, as the manifest's ``Confidence`` defines it."""
    if kind is Confidence.MAX_PROB:
        return probs.max(axis=-1)
    top2 = np.partition(probs, -2, axis=-1)[..., -2:]
    if kind is Confidence.MARGIN:
        return np.abs(top2[..., 1] - top2[..., 0])
    return (probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=-1)


class Cascade:
    """``point``: which of the manifest's operating points sets the exit thresholds (0, the one fit
    by training, by default; later ones are cheaper and less accurate). ``at`` gives the same
    cascade at another point: the SLO route turns this knob per request under load."""

    def __init__(self, manifest: Manifest, stages: list[Runner], point: int = 0) -> None:
        self.manifest = manifest
        self.key = str(manifest.ref)
        self.stages = stages
        points = manifest.composition.operating_points
        if not 0 <= point < max(1, len(points)):
            raise ValueError(f"{manifest.ref} has no operating point {point}")
        self.point = point
        self._views: dict[int, Cascade] = {point: self}  # shared by every view: the route asks for them per request
        self.thresholds: list[float | None] = (
            [*points[point].thresholds, None] if points else [s.threshold for s in manifest.composition.stages])
        self.kind = manifest.composition.confidence or Confidence.MAX_PROB
        self.rule = manifest.composition.combine or CombineRule.MEAN_PROB

    @property
    def points(self) -> int:
        return max(1, len(self.manifest.composition.operating_points))

    def at(self, point: int) -> Cascade:
        view = self._views.get(point)
        if view is None:
            view = self._views[point] = Cascade(self.manifest, self.stages, point)
            view._views = self._views
        return view

    @property
    def providers(self) -> list[str]:
        return self.stages[0].runtime.providers

    @property
    def runners(self) -> list[Runner]:
        return list(self.stages)

    async def predict(self, rows: np.ndarray, deadline: float) -> Prediction:
        n = len(rows)
        stage_log_probs = np.zeros((len(self.stages), n, len(self.manifest.labels)), dtype=np.float64)
        final = np.zeros((n, len(self.manifest.labels)), dtype=np.float64)
        exit_stage = np.zeros(n, dtype=np.int32)
        pending = np.arange(n)
        out = Prediction(logits=np.empty(0))
        for k, (runner, threshold) in enumerate(zip(self.stages, self.thresholds), start=1):
            # admitted at its first stage: a later one spends no second judgement on it
            result = await runner.batcher.submit(rows[pending], deadline, admit=k == 1)
            out.queue_s += result.queue_s
            out.compute_s += result.compute_s
            out.batch_sizes.extend(result.batch_sizes)
            stage_log_probs[k - 1, pending] = log_softmax(result.outputs[0].astype(np.float64))
            combined = combine(stage_log_probs[:k, pending], self.rule)
            leaving = (np.ones(len(pending), bool) if threshold is None
                       else confidence(np.exp(combined), self.kind) >= threshold)
            final[pending[leaving]] = combined[leaving]
            exit_stage[pending[leaving]] = k
            pending = pending[~leaving]
            if not len(pending):
                break
        out.logits = final.astype(np.float32)
        out.exit_stage = exit_stage
        return out
