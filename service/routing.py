"""SLO-aware routing (after INFaaS, Romero et al., ATC 2021): the request states how long it may
take and how accurate the answer must be; the server picks the variant.

The expected latency of a variant *now* is the work ahead of a new image on its runners divided by
their measured throughput, plus the compute time of the batch the image would ride in (never less
than the calibrated batch-1 latency); a cascade adds its later stages weighted by how many images
reach them. Work ahead is the larger of the queued images and the requests holding the runner:
requests still decoding their images are already committed to it, and a burst decided before any
of them reached the queue would otherwise all see an empty one.

All runners of a server share its cores (or its GPU): a variant's estimate is multiplied by the
number of runners that would be busy with it (processor sharing), so that spreading requests over
several variants never looks cheaper than it is. What this model leaves out (image
decoding, waits for the event loop while the request is served, cores shared with the other
variants) is learnt per variant from routed requests: the moving average of measured − expected is
added to later estimates; it fades unless refreshed and is forgotten on recalibration.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .calibration import Calibrator
from .errors import Unprocessable
from .tradeoffs import LiveStats, accuracy_of, stage_reach, variant_cost
from .variants import Cascade, Runner, Variant


class Reason(str, Enum):
    FITS_BUDGET = "fits_budget"  # the most accurate variant whose expected latency fits with room to spare
    FITS_BUDGET_CHEAPEST = "fits_budget_cheapest"  # loaded: only fits without room; the cheapest of those
    OVER_BUDGET_CHEAPEST = "over_budget_cheapest"  # nothing fits: the cheapest per image that meets the floor
    MOST_ACCURATE = "most_accurate"  # no latency budget given


@dataclass(frozen=True)
class Candidate:
    variant: Variant
    accuracy: float
    expected_s: float
    cost_s: float  # device time per image at the best batch size (calibrated; else the expected latency)


@dataclass(frozen=True)
class Decision:
    """Variants in the order to try them (the next one is used when a variant refuses admission)."""

    order: list[Candidate]
    reasons: list[Reason]


def point_of(variant: Variant) -> int:
    return variant.point if isinstance(variant, Cascade) else 0


def busy(runner: Runner) -> bool:
    return runner.leases > 0 or runner.batcher.queued_images > 0


def runner_expected_s(runner: Runner, calibrator: Calibrator, images: int = 1) -> float:
    """Queue and compute time of ``images`` more on ``runner`` if it had the device to itself."""
    batcher = runner.batcher
    per_image = batcher.throughput.seconds_per_image
    calibration = calibrator.get(runner)
    alone_s = calibration.batch1_ms / 1000 if calibration else (per_image or 0.0)
    if per_image is None:
        return alone_s
    ahead = max(batcher.images_ahead, runner.leases)
    riding = min(ahead + images, batcher.max_batch_size)
    chunks = -(-images // batcher.max_batch_size)  # a request over max_batch_size rides in several batches
    return ahead * per_image / batcher.instances + chunks * max(alone_s, riding * per_image)


def expected_latency_s(variant: Variant, calibrator: Calibrator, live: LiveStats, busy_runners: set[str] | None = None,
                       images: int = 1) -> float:
    """``busy_runners``: keys of the server's runners with work now (None: count only this variant's)."""
    if isinstance(variant, Cascade):
        reach, _ = stage_reach(variant, live)
        # stage k: reached with probability w (one image), by about w x images of a larger request
        model = sum(w * runner_expected_s(r, calibrator, max(1, round(w * images))) for w, r in zip(reach, variant.stages) if w > 0)
    else:
        model = runner_expected_s(variant.runners[0], calibrator, images)
    sharing = len((busy_runners or set()) | {r.key for r in variant.runners[:1]})
    return max(0.0, sharing * model + live.correction(variant.key))


def settings_of(variant: Variant) -> list[Variant]:
    """The variant at each setting the route may choose: a cascade at each of its operating points."""
    return [variant.at(k) for k in range(variant.points)] if isinstance(variant, Cascade) else [variant]


def decide(pool: list[Variant], calibrator: Calibrator, live: LiveStats, max_latency_s: float | None,
           min_accuracy: float | None, runners: list[Runner] | None = None, images: int = 1, ahead_s: float = 0.0,
           headroom: float = 1.0) -> Decision:
    """Most accurate first among those expected to fit the budget with room to spare, then those that
    fit only without it cheapest first, then the rest cheapest first. A
    cascade enters once per operating point, so under load its thresholds come down (it exits
    earlier, costs less) before the route falls back to a cheaper variant.
    ``runners``: every runner of the server, for the processor-sharing factor; ``images``: in the request;
    ``ahead_s``: the wait for the server's requests ahead of this one (parsing, decoding: every
    candidate's share); ``headroom``: the share of the budget a candidate must fit in to be chosen
    for accuracy (the ``slo_headroom`` setting)."""
    busy_now = {r.key for r in runners or [] if busy(r)}
    scored = []
    for v in (setting for variant in pool if variant.manifest.metrics is not None for setting in settings_of(variant)):
        expected = ahead_s + expected_latency_s(v, calibrator, live, busy_now, images)
        cost = variant_cost(v, calibrator, live)
        scored.append(Candidate(v, accuracy_of(v) or 0.0, expected, 1 / cost.images_per_s if cost else expected))
    if not scored:
        raise Unprocessable("no served variant has measured accuracy to route by; name a model instead")
    floor = 0.0 if min_accuracy is None else min_accuracy
    eligible = [c for c in scored if c.accuracy >= floor]
    if not eligible:
        best = max(scored, key=lambda c: c.accuracy)
        raise Unprocessable(f"no variant reaches min_accuracy {floor:.4f}; the most accurate is "
                            f"{best.variant.manifest.name} at {best.accuracy:.4f}")
    # ties break by name: every replica makes the same choice
    by_accuracy = sorted(eligible, key=lambda c: (-c.accuracy, c.expected_s, c.variant.manifest.name, point_of(c.variant)))
    if max_latency_s is None:
        return Decision(by_accuracy, [Reason.MOST_ACCURATE] * len(by_accuracy))
    def cheapest_first(c: Candidate) -> tuple:
        return c.cost_s, c.expected_s, c.variant.manifest.name, point_of(c.variant)

    roomy = [c for c in by_accuracy if c.expected_s <= headroom * max_latency_s]
    # Fitting only without room to spare means the server is loaded: every answer now takes cores
    # from the next requests, so the cheapest that fits serves the most of them within budget.
    tight = sorted((c for c in eligible if headroom * max_latency_s < c.expected_s <= max_latency_s), key=cheapest_first)
    # Nothing fits: the device is the bottleneck, so the cheapest variant per image serves the most
    # requests (and, under load, the lowest latency); spreading over variants would only add contention.
    rest = sorted((c for c in eligible if c.expected_s > max_latency_s), key=cheapest_first)
    return Decision(roomy + tight + rest, [Reason.FITS_BUDGET] * len(roomy) + [Reason.FITS_BUDGET_CHEAPEST] * len(tight)
                    + [Reason.OVER_BUDGET_CHEAPEST] * len(rest))


def default_pool(variants: list[Variant], named: list[str]) -> list[Variant]:
    """Among the variants ``named`` (the ``slo_pool`` setting; empty: all) that have metrics, those
    sharing the most common label set: routing between them never changes what an answer means."""
    measured = [v for v in variants if v.manifest.metrics is not None and (not named or v.manifest.name in named)]
    if not measured:
        return []
    label_sets = [tuple(v.manifest.labels) for v in measured]
    common = max(sorted(set(label_sets)), key=label_sets.count)  # sorted: a tie breaks the same way on every replica
    return [v for v in measured if tuple(v.manifest.labels) == common]
