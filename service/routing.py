"""SLO-aware routing (after INFaaS, Romero et al., ATC 2021): the request states how long it may
take and how accurate the answer must be; the server picks the variant.

The expected latency of a variant *now* is the work ahead of a new image on its runners divided by
their measured throughput, plus the compute time of the batch the image would ride in (never less
than the calibrated batch-1 latency); a cascade adds its later stages weighted by how many images
reach them. Work ahead is the larger of the queued images and the requests holding the runner:
requests still decoding their images are already committed to it, and a burst decided before any
of them reached the queue would otherwise all see an empty one. It covers queueing and compute,
not HTTP or image decoding, which every variant shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .calibration import Calibrator
from .errors import Unprocessable
from .tradeoffs import LiveStats, stage_reach
from .variants import Cascade, Runner, Variant


class Reason(str, Enum):
    FITS_BUDGET = "fits_budget"  # the most accurate variant whose expected latency fits
    OVER_BUDGET_FASTEST = "over_budget_fastest"  # nothing fits: the fastest that meets the accuracy floor
    MOST_ACCURATE = "most_accurate"  # no latency budget given


@dataclass(frozen=True)
class Candidate:
    variant: Variant
    accuracy: float
    expected_s: float


@dataclass(frozen=True)
class Decision:
    """Variants in the order to try them (the next one is used when a variant refuses admission)."""

    order: list[Candidate]
    reasons: list[Reason]


def runner_expected_s(runner: Runner, calibrator: Calibrator) -> float:
    batcher = runner.batcher
    per_image = batcher.throughput.seconds_per_image
    calibration = calibrator.get(runner)
    alone_s = calibration.batch1_ms / 1000 if calibration else (per_image or 0.0)
    if per_image is None:
        return alone_s
    ahead = max(batcher.queued_images, runner.leases)
    riding = min(ahead + 1, batcher.max_batch_size)
    return ahead * per_image / batcher.instances + max(alone_s, riding * per_image)


def expected_latency_s(variant: Variant, calibrator: Calibrator, live: LiveStats) -> float:
    if isinstance(variant, Cascade):
        reach, _ = stage_reach(variant, live)
        return sum(w * runner_expected_s(r, calibrator) for w, r in zip(reach, variant.stages))
    return runner_expected_s(variant.runners[0], calibrator)


def decide(pool: list[Variant], calibrator: Calibrator, live: LiveStats,
           max_latency_s: float | None, min_accuracy: float | None) -> Decision:
    """Most accurate first among those expected to fit the budget, then the rest fastest first."""
    scored = [Candidate(v, v.manifest.metrics.accuracy, expected_latency_s(v, calibrator, live))
              for v in pool if v.manifest.metrics is not None]
    if not scored:
        raise Unprocessable("no served variant has measured accuracy to route by; name a model instead")
    floor = 0.0 if min_accuracy is None else min_accuracy
    eligible = [c for c in scored if c.accuracy >= floor]
    if not eligible:
        best = max(scored, key=lambda c: c.accuracy)
        raise Unprocessable(f"no variant reaches min_accuracy {floor:.4f}; the most accurate is "
                            f"{best.variant.manifest.name} at {best.accuracy:.4f}")
    by_accuracy = sorted(eligible, key=lambda c: (-c.accuracy, c.expected_s))
    if max_latency_s is None:
        return Decision(by_accuracy, [Reason.MOST_ACCURATE] * len(by_accuracy))
    fits = [c for c in by_accuracy if c.expected_s <= max_latency_s]
    rest = sorted((c for c in eligible if c.expected_s > max_latency_s), key=lambda c: c.expected_s)
    return Decision(fits + rest, [Reason.FITS_BUDGET] * len(fits) + [Reason.OVER_BUDGET_FASTEST] * len(rest))


def default_pool(variants: list[Variant], named: list[str]) -> list[Variant]:
    """Among the variants ``named`` (the ``slo_pool`` setting; empty: all) that have metrics, those
    sharing the most common label set: routing between them never changes what an answer means."""
    measured = [v for v in variants if v.manifest.metrics is not None and (not named or v.manifest.name in named)]
    if not measured:
        return []
    label_sets = [tuple(v.manifest.labels) for v in measured]
    common = max(set(label_sets), key=label_sets.count)
    return [v for v in measured if tuple(v.manifest.labels) == common]
