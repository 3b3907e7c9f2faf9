"""Accuracy × latency × cost per served variant: offline metrics from the manifest next to what the
variant costs on this server now (live latency window, calibration, cascade exit rates)."""

from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from pydantic import BaseModel, Field

from model_store import pareto_front

from .calibration import Calibrator
from .config import Settings
from .latency import LatencyWindow
from .runtime import CUDA
from .variants import Cascade, Variant

# Live exit rates replace the manifest's test-set ones once this many images went through a cascade.
MIN_LIVE_CASCADE_IMAGES = 200


class LiveStats:
    """Per served version (``name:version``): a latency window of successful requests; for
    cascades, how many images each stage answered; for routed requests, how far the expected
    latency was from the one measured (an exponential moving average of actual − expected, which
    starts from 0 and fades with a half-life once no routed request refreshes it, so one slow
    request cannot lock a variant out: it is tried again and measured again)."""

    def __init__(self, capacity: int, max_age_s: float, correction_weight: float = 0.1,
                 correction_half_life_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.max_age_s = max_age_s
        self.correction_weight = correction_weight
        self.correction_half_life_s = correction_half_life_s
        self.clock = clock
        self.windows: dict[str, LatencyWindow] = {}
        self.exits: dict[str, np.ndarray] = {}
        self.reach: dict[str, tuple[list[float], str]] = {}  # a cascade's reach at point 0, until its exits change
        self._corrections: dict[str, tuple[float, float]] = {}  # key -> (value, when it was last updated)

    def observe_routed(self, key: str, expected_s: float, actual_s: float) -> None:
        """What the estimate (``expected_s``, its correction included) missed (decoding, waits for the
        loop, cores shared with other variants): later estimates of ``key`` add it."""
        current = self.correction(key)
        miss = actual_s - (expected_s - current)
        self._corrections[key] = (current + self.correction_weight * (miss - current), self.clock())

    def correction(self, key: str) -> float:
        """The learnt correction of ``key`` now (seconds; faded since its last update)."""
        value, at = self._corrections.get(key, (0.0, 0.0))
        return value * 0.5 ** ((self.clock() - at) / self.correction_half_life_s) if value else 0.0

    def reset_corrections(self) -> None:
        """Forget what was learnt (a new calibration measured the runners afresh)."""
        self._corrections.clear()

    def window(self, key: str) -> LatencyWindow:
        window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = LatencyWindow(self.capacity, self.max_age_s)
        return window

    def observe_exits(self, key: str, exit_stage: np.ndarray, stages: int) -> None:
        counts = self.exits.setdefault(key, np.zeros(stages, dtype=np.int64))
        counts += np.bincount(exit_stage - 1, minlength=stages)[:stages]
        self.reach.pop(key, None)

    def forget_except(self, keys: set[str]) -> None:
        """Drop the numbers of versions no longer served (a reload replaced them)."""
        for table in (self.windows, self.exits, self.reach, self._corrections):
            for key in set(table) - keys:
                del table[key]


@dataclass(frozen=True)
class Cost:
    batch1_ms: float
    images_per_s: float


def stage_reach(cascade: Cascade, live: LiveStats) -> tuple[list[float], str]:
    """Share of images that reach each stage, and where the rates come from: ``live`` or ``test``
    exit rates at the default point, the ``validation`` rates training recorded for a cheaper one."""
    if cascade.point:
        return list(cascade.manifest.composition.operating_points[cascade.point].reach), "validation"
    cached = live.reach.get(cascade.key)
    if cached is None:
        cached = live.reach[cascade.key] = _reach_at_default(cascade, live)
    return cached


def _reach_at_default(cascade: Cascade, live: LiveStats) -> tuple[list[float], str]:
    n = len(cascade.stages)
    counts = live.exits.get(cascade.key)
    if counts is not None and counts.sum() >= MIN_LIVE_CASCADE_IMAGES:
        exits, source = counts / counts.sum(), "live"
    else:
        extra = cascade.manifest.metrics.extra if cascade.manifest.metrics else {}
        exits = np.array([extra.get(f"test_exit_fraction_stage_{k + 1}", 0.0) for k in range(n)])
        if exits.sum() <= 0:  # nothing known: assume the worst, every image runs every stage
            return [1.0] * n, "assumed"
        exits, source = exits / exits.sum(), "test"
    left = 1.0 - np.concatenate([[0.0], np.cumsum(exits)[:-1]])
    return [float(max(r, 0.0)) for r in left], source


def accuracy_of(variant: Variant) -> float | None:
    """Held-out test accuracy: the manifest's, or for a cascade at a lower point, that point's (at most
    the points' before it)."""
    if isinstance(variant, Cascade) and variant.point:
        # never above a point before it: lowering the thresholds must not look like a gain, whatever
        # the test set's noise between neighbouring points
        points = variant.manifest.composition.operating_points[: variant.point + 1]
        return min(p.accuracy for p in points)
    return variant.manifest.metrics.accuracy if variant.manifest.metrics else None


def variant_cost(variant: Variant, calibrator: Calibrator, live: LiveStats) -> Cost | None:
    """Calibrated cost per image; a cascade's is its stages' weighted by how many images reach them."""
    if isinstance(variant, Cascade):
        reach, _ = stage_reach(variant, live)
        parts = [calibrator.get(r) for r in variant.stages]
        if any(p is None for p in parts):
            return None
        return Cost(batch1_ms=sum(w * p.batch1_ms for w, p in zip(reach, parts)),  # type: ignore[union-attr]
                    images_per_s=1.0 / sum(w / p.images_per_s for w, p in zip(reach, parts)))  # type: ignore[union-attr]
    c = calibrator.get(variant.runners[0])
    return None if c is None else Cost(c.batch1_ms, c.images_per_s)


class PointTradeoff(BaseModel):
    """A cascade at one of its operating points (exit thresholds fit on validation by training)."""

    point: int = Field(description="0: the thresholds training fit; later points exit earlier")
    thresholds: list[float]
    accuracy: float = Field(description="held-out test accuracy at these thresholds")
    val_accuracy: float
    members_per_image: float = Field(description="on validation")
    batch1_ms: float | None = Field(description="calibrated stage costs weighted by the stages' reach")
    images_per_s: float | None


class Tradeoff(BaseModel):
    """One served variant: offline metrics (manifest, held-out test set), live latency of successful
    requests in the window, calibrated cost on this server, and its place on the Pareto fronts."""

    name: str
    version: int
    kind: str
    accuracy: float | None = Field(description="held-out test accuracy from the manifest")
    weighted_f1: float | None
    nll: float | None
    ece: float | None
    flops_per_image: float | None
    params: int | None
    members_per_image: float | None = Field(description="cascades: mean members evaluated per image")
    live_requests: int = Field(description="successful requests in the latency window")
    live_p50_ms: float | None
    live_p95_ms: float | None
    live_p99_ms: float | None
    live_requests_per_s: float
    batch1_ms: float | None = Field(description="calibrated: one image alone through the runtime")
    images_per_s: float | None = Field(description="calibrated: at the best batch size")
    cost_per_1000_images: float | None
    cost_unit: str = Field(description="core-seconds (CPU: intra-op threads x seconds) or GPU-seconds")
    exit_rates: str | None = Field(None, description="cascades: where stage reach comes from (live, test, assumed)")
    operating_points: list[PointTradeoff] | None = Field(
        None, description="cascades: the thresholds the SLO route may lower to under load, and what each costs")
    pareto_latency: bool = Field(description="no other variant is at least as accurate and faster")
    pareto_cost: bool = Field(description="no other variant is at least as accurate and cheaper")


def pareto(points: list[tuple[float | None, float | None]]) -> list[bool]:
    """For (accuracy, cost) pairs: True where no other point is at least as accurate and as cheap
    and better in one; a point with an unknown coordinate is never on the front."""
    known = [i for i, (a, c) in enumerate(points) if a is not None and c is not None]
    front = {known[k] for k in pareto_front([(points[i][1], points[i][0]) for i in known])}  # type: ignore[misc]
    return [i in front for i in range(len(points))]


def tradeoffs(variants: list[Variant], calibrator: Calibrator, live: LiveStats, settings: Settings) -> list[Tradeoff]:
    rows = []
    for variant in variants:
        m = variant.manifest
        stats = live.window(variant.key).stats()
        cost = variant_cost(variant, calibrator, live)
        on_gpu = variant.providers[:1] == [CUDA]
        units = 1 if on_gpu else (settings.intra_op_threads or os.cpu_count() or 1)
        metrics = m.metrics
        rows.append(Tradeoff(
            name=m.name, version=m.version, kind=m.kind.value,
            accuracy=metrics and metrics.accuracy, weighted_f1=metrics and metrics.weighted_f1,
            nll=metrics and metrics.nll, ece=metrics and metrics.ece,
            flops_per_image=metrics and metrics.flops_per_image, params=metrics and metrics.params,
            members_per_image=metrics and metrics.members_per_image,
            live_requests=stats.count, live_p50_ms=stats.p50_ms, live_p95_ms=stats.p95_ms, live_p99_ms=stats.p99_ms,
            live_requests_per_s=stats.requests_per_s,
            batch1_ms=cost and cost.batch1_ms, images_per_s=cost and cost.images_per_s,
            cost_per_1000_images=cost and 1000 * units / cost.images_per_s,
            cost_unit="GPU-seconds" if on_gpu else "core-seconds",
            exit_rates=stage_reach(variant, live)[1] if isinstance(variant, Cascade) else None,
            operating_points=point_tradeoffs(variant, calibrator, live) if isinstance(variant, Cascade) else None,
            pareto_latency=False, pareto_cost=False,
        ))
    by_latency = pareto([(r.accuracy, latency_of(r)) for r in rows])
    by_cost = pareto([(r.accuracy, r.cost_per_1000_images) for r in rows])
    return [r.model_copy(update={"pareto_latency": a, "pareto_cost": b}) for r, a, b in zip(rows, by_latency, by_cost)]


def point_tradeoffs(cascade: Cascade, calibrator: Calibrator, live: LiveStats) -> list[PointTradeoff] | None:
    rows = []
    for k, p in enumerate(cascade.manifest.composition.operating_points):
        cost = variant_cost(cascade.at(k), calibrator, live)
        rows.append(PointTradeoff(point=k, thresholds=p.thresholds, accuracy=p.accuracy, val_accuracy=p.val_accuracy,
                                  members_per_image=p.members_per_image, batch1_ms=cost and cost.batch1_ms,
                                  images_per_s=cost and cost.images_per_s))
    return rows or None


def latency_of(row: Tradeoff) -> float | None:
    """The latency a row is judged by: calibrated batch-1 when measured, else the live median."""
    return row.batch1_ms if row.batch1_ms is not None else row.live_p50_ms


def to_csv(rows: list[Tradeoff]) -> str:
    out = io.StringIO()
    fields = [f for f in Tradeoff.model_fields if f != "operating_points"]  # a table of its own: JSON only
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if v is None else v for k, v in r.model_dump(include=set(fields)).items()})
    return out.getvalue()
