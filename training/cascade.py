"""Confidence cascades (Wang et al., ICLR 2022): run member 1; an image exits at stage k when the
confidence of the first k members' mean probability reaches stage k's threshold; otherwise the
next member is added. Thresholds are fit on the validation split only.

Everything here works on precomputed probabilities (stages x images x classes), so fitting and
evaluating never touch a model, and the test split can only enter through ``simulate``.
``operating_points`` fits a staircase of looser settings below the served one, for a server that
trades accuracy for cost under load.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model_store import Confidence, OperatingPoint

NEVER = float("inf")  # a threshold no confidence reaches: the stage never lets an image exit


def confidence(probs: np.ndarray, kind: Confidence) -> np.ndarray:
    """Per-image confidence of ``probs`` (... x classes); higher means more sure."""
    if kind is Confidence.MAX_PROB:
        return probs.max(axis=-1)
    if kind is Confidence.MARGIN:
        top2 = np.sort(probs, axis=-1)[..., -2:]
        return top2[..., 1] - top2[..., 0]
    if kind is Confidence.NEG_ENTROPY:
        return (probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=-1)
    raise ValueError(f"unknown confidence {kind!r}")


def manifest_threshold(threshold: float, kind: Confidence) -> float:
    """``threshold`` as a manifest writes it: ``NEVER`` becomes a value above the score's ceiling,
    which no confidence reaches, because manifests hold standard JSON (no infinity)."""
    return threshold if np.isfinite(threshold) else kind.ceiling + 1.0


def stage_probs(member_probs: np.ndarray) -> np.ndarray:
    """Stage k's prediction is the mean probability of members 1..k (M x N x K -> M x N x K)."""
    return np.cumsum(member_probs, axis=0) / np.arange(1, len(member_probs) + 1)[:, None, None]


@dataclass(frozen=True)
class CascadeOutcome:
    probs: np.ndarray  # N x K: each image's prediction at the stage where it exited
    exit_stage: np.ndarray  # N, 0-based
    flops: np.ndarray  # N: FLOPs spent on each image

    def members_per_image(self) -> float:
        return float((self.exit_stage + 1).mean())

    def exit_fractions(self, stages: int) -> list[float]:
        return (np.bincount(self.exit_stage, minlength=stages) / len(self.exit_stage)).tolist()

    def reach(self, stages: int) -> list[float]:
        """Fraction of images that run each stage: 1.0 for the first, non-increasing after it."""
        return [float((self.exit_stage >= k).mean()) for k in range(stages)]


def simulate(
    member_probs: np.ndarray, member_flops: list[float], thresholds: list[float], kind: Confidence
) -> CascadeOutcome:
    """Run the cascade on precomputed member probabilities; the last stage takes every image left."""
    stages = stage_probs(member_probs)
    m, n, _ = stages.shape
    if len(thresholds) != m - 1:
        raise ValueError(f"{m} stages need {m - 1} thresholds, got {len(thresholds)}")
    conf = confidence(stages, kind)
    exit_stage = np.full(n, m - 1)
    pending = np.ones(n, dtype=bool)
    for k, t in enumerate(thresholds):
        leaving = pending & (conf[k] >= t)
        exit_stage[leaving] = k
        pending &= ~leaving
    cumulative = np.cumsum(member_flops)
    return CascadeOutcome(stages[exit_stage, np.arange(n)], exit_stage, cumulative[exit_stage])


def accuracy_drop_bound(cascade_correct: np.ndarray, ensemble_correct: np.ndarray, z: float) -> float:
    """One-sided upper bound on how much accuracy the cascade loses against the full ensemble.

    The two are paired on the same images, so only images where exactly one is right count
    (McNemar): drop = (ensemble-only - cascade-only) / n, with standard error sqrt(discordant) / n.
    Picking the cheapest thresholds that pass on validation favours thresholds that were lucky
    there; the ``z`` standard errors of margin keep that luck from passing for accuracy.
    """
    n = len(cascade_correct)
    ensemble_only = int((ensemble_correct & ~cascade_correct).sum())
    cascade_only = int((cascade_correct & ~ensemble_correct).sum())
    return (ensemble_only - cascade_only) / n + z * np.sqrt(ensemble_only + cascade_only) / n


def fit_thresholds(
    member_probs: np.ndarray,
    labels: np.ndarray,
    member_flops: list[float],
    kind: Confidence = Confidence.MAX_PROB,
    tolerance: float = 0.002,
    z: float = 1.645,
    candidates: int = 64,
    max_rounds: int = 10,
) -> list[float]:
    """Thresholds that minimise mean FLOPs per image subject to losing at most ``tolerance``
    accuracy against the full ensemble, with ``z`` standard errors of margin (see
    ``accuracy_drop_bound``; z=0 asks only for the plain measured drop), all measured on the data
    given (the validation split).

    Coordinate descent over per-stage candidate thresholds (quantiles of that stage's confidence),
    starting from "never exit early", which is feasible by definition (the cascade then is the
    ensemble); so the result always meets the constraint on the data it was fit on.
    """
    m = len(member_probs)
    if m < 2:
        return []
    stages = stage_probs(member_probs)
    ensemble_correct = stages[-1].argmax(-1) == labels
    conf = confidence(stages, kind)
    grids = [np.unique(np.quantile(conf[k], np.linspace(0, 1, candidates))).tolist() + [NEVER] for k in range(m - 1)]

    def score(ts: list[float]) -> tuple[bool, float]:
        out = simulate(member_probs, member_flops, ts, kind)
        drop = accuracy_drop_bound(out.probs.argmax(-1) == labels, ensemble_correct, z)
        return drop <= tolerance + 1e-12, float(out.flops.mean())

    thresholds = [NEVER] * (m - 1)
    best_cost = score(thresholds)[1]
    for _ in range(max_rounds):
        improved = False
        for k in range(m - 1):
            for t in grids[k]:
                trial = thresholds[:k] + [t] + thresholds[k + 1 :]
                feasible, cost = score(trial)
                if feasible and cost < best_cost - 1e-9:
                    thresholds, best_cost, improved = trial, cost, True
        if not improved:
            break
    return thresholds


def operating_points(
    val_probs: np.ndarray,
    val_labels: np.ndarray,
    test_probs: np.ndarray,
    test_labels: np.ndarray,
    member_flops: list[float],
    kind: Confidence,
    tolerance: float,
    looser: list[float],
    z: float = 1.645,
) -> list[OperatingPoint]:
    """The cascade's accuracy-for-cost staircase, every choice made on validation.

    Point 0 is fit at ``tolerance`` (the thresholds served by default); then one point per value of
    ``looser`` (increasing) above ``tolerance``, kept only when it runs strictly fewer members per
    image on validation than the last point kept (coordinate descent does not promise that a looser
    tolerance is cheaper). A looser value of 1.0 ends the list at "every image exits at stage 1".
    Thresholds are written as the manifest holds them (``manifest_threshold``); test accuracy is
    measured for each point and never used to choose one.
    """
    stages = len(val_probs)
    points: list[OperatingPoint] = []
    for t in [tolerance, *(x for x in looser if x > tolerance)]:
        fitted = [manifest_threshold(x, kind) for x in fit_thresholds(val_probs, val_labels, member_flops, kind, t, z)]
        on_val = simulate(val_probs, member_flops, fitted, kind)
        if points and on_val.members_per_image() >= points[-1].members_per_image:
            continue
        on_test = simulate(test_probs, member_flops, fitted, kind)
        points.append(OperatingPoint(
            thresholds=fitted, tolerance=t,
            val_accuracy=float((on_val.probs.argmax(-1) == val_labels).mean()),
            accuracy=float((on_test.probs.argmax(-1) == test_labels).mean()),
            members_per_image=on_val.members_per_image(), reach=on_val.reach(stages),
        ))
    return points
