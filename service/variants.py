"""What the routes call: a variant turns normalised input rows into logits.

``Runner`` is one ONNX model behind its batcher. ``SingleModel`` serves one runner (member,
ensemble, adaptive ensemble, student). ``Cascade`` runs its stages through the members' runners,
sending on only the images whose confidence is still under the stage's threshold; its logits are
log mean-probabilities of the stages that ran (the ensemble ``mean_prob`` rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from model_store import Confidence, Manifest

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

    @property
    def key(self) -> str:
        return str(self.manifest.ref)


class Variant(Protocol):
    manifest: Manifest

    @property
    def providers(self) -> list[str]: ...

    async def predict(self, rows: np.ndarray, deadline: float) -> Prediction: ...


class SingleModel:
    def __init__(self, runner: Runner) -> None:
        self.manifest = runner.manifest
        self.runner = runner

    @property
    def providers(self) -> list[str]:
        return self.runner.runtime.providers

    async def predict(self, rows: np.ndarray, deadline: float) -> Prediction:
        result = await self.runner.batcher.submit(rows, deadline)
        return Prediction(
            logits=result.outputs[0], queue_s=result.queue_s, compute_s=result.compute_s,
            batch_sizes=list(result.batch_sizes), member_logits=result.outputs[1] if len(result.outputs) > 1 else None,
        )


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def confidence(probs: np.ndarray, kind: Confidence) -> np.ndarray:
    """The score a stage compares with its threshold, as the manifest's ``Confidence`` defines it."""
    if kind is Confidence.MAX_PROB:
        return probs.max(axis=-1)
    top2 = np.partition(probs, -2, axis=-1)[..., -2:]
    if kind is Confidence.MARGIN:
        return np.abs(top2[..., 1] - top2[..., 0])
    return (probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=-1)


class Cascade:
    def __init__(self, manifest: Manifest, stages: list[Runner]) -> None:
        self.manifest = manifest
        self.stages = stages
        self.thresholds = [s.threshold for s in manifest.composition.stages]
        self.kind = manifest.composition.confidence or Confidence.MAX_PROB

    @property
    def providers(self) -> list[str]:
        return self.stages[0].runtime.providers

    async def predict(self, rows: np.ndarray, deadline: float) -> Prediction:
        n = len(rows)
        summed = np.zeros((n, len(self.manifest.labels)), dtype=np.float64)
        final = np.zeros_like(summed)
        exit_stage = np.zeros(n, dtype=np.int32)
        pending = np.arange(n)
        out = Prediction(logits=np.empty(0))
        for k, (runner, threshold) in enumerate(zip(self.stages, self.thresholds), start=1):
            result = await runner.batcher.submit(rows[pending], deadline)
            out.queue_s += result.queue_s
            out.compute_s += result.compute_s
            out.batch_sizes.extend(result.batch_sizes)
            summed[pending] += softmax(result.outputs[0].astype(np.float64))
            stage_probs = summed[pending] / k
            leaving = np.ones(len(pending), bool) if threshold is None else confidence(stage_probs, self.kind) >= threshold
            final[pending[leaving]] = stage_probs[leaving]
            exit_stage[pending[leaving]] = k
            pending = pending[~leaving]
            if not len(pending):
                break
        out.logits = np.log(np.clip(final, 1e-12, None)).astype(np.float32)
        out.exit_stage = exit_stage
        return out
