"""An experiment's report from its recorded outcomes: per arm, between arms, paired (shadow)."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field

from .definition import Experiment
from .state import Outcome
from .stats import always_valid, mcnemar_exact, two_proportion_z, wilson


class ArmReport(BaseModel):
    arm: str
    variant: str
    requests: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    labelled: int
    correct: int
    accuracy: float | None
    accuracy_ci95: tuple[float, float] | None = Field(description="Wilson score interval")


class Comparison(BaseModel):
    a: str
    b: str
    difference: float | None = Field(description="online accuracy of A minus B")
    z: float | None = Field(description="two-proportion z (pooled): valid for one look at a fixed sample size only")
    p_value: float | None
    verdict: str = Field(description="A better | B better | no difference yet (always valid: read it as often as you like)")
    always_valid_p: float | None
    confidence_sequence: tuple[float, float] | None = Field(description="for A - B at 1 - alpha, valid at every look")
    alpha: float
    method: str


class Paired(BaseModel):
    """Primary and shadow on the same requests."""

    shadow: str
    pairs: int
    agreement: float | None = Field(description="share of requests where both have the same top-1")
    mean_kl: float | None = Field(description="mean KL(primary || shadow) of the class probabilities")
    labelled_pairs: int
    primary_only_correct: int = Field(description="discordant: the primary right, the shadow wrong")
    shadow_only_correct: int = Field(description="discordant: the shadow right, the primary wrong")
    mcnemar_p: float | None = Field(description="McNemar's exact test on the discordant pairs")


class Report(BaseModel):
    experiment: Experiment
    arms: list[ArmReport]
    comparison: Comparison | None
    paired: Paired | None


def _quantiles(values: list[float]) -> tuple[float | None, float | None, float | None]:
    if not values:
        return None, None, None
    p50, p95, p99 = np.quantile(values, (0.5, 0.95, 0.99)).tolist()
    return p50, p95, p99


def build_report(experiment: Experiment, outcomes: list[Outcome]) -> Report:
    arms = []
    for arm in experiment.arms:
        mine = [o for o in outcomes if o.arm == arm.name]
        labelled = [o for o in mine if o.label is not None]
        correct = sum(o.top1 == o.label for o in labelled)
        arms.append(ArmReport(
            arm=arm.name, variant=arm.variant, requests=len(mine), labelled=len(labelled), correct=correct,
            accuracy=correct / len(labelled) if labelled else None, accuracy_ci95=wilson(correct, len(labelled)),
            **dict(zip(("p50_ms", "p95_ms", "p99_ms"), _quantiles([o.latency_ms for o in mine]))),
        ))
    return Report(experiment=experiment, arms=arms, comparison=_compare(experiment, arms, outcomes),
                  paired=_paired(experiment, outcomes))


def _compare(experiment: Experiment, arms: list[ArmReport], outcomes: list[Outcome]) -> Comparison | None:
    if len(arms) < 2:
        return None
    a, b = arms[0], arms[1]
    test = two_proportion_z(a.correct, a.labelled, b.correct, b.labelled)
    # the labelled outcomes of A and B in the order their labels arrived
    sequence = sorted((o for o in outcomes if o.label is not None and o.arm in (a.arm, b.arm)), key=lambda o: o.labelled_at or 0)
    verdict = always_valid(np.array([o.arm == a.arm for o in sequence]), np.array([o.top1 == o.label for o in sequence]),
                           experiment.alpha, experiment.tau, experiment.min_samples)
    return Comparison(
        a=a.arm, b=b.arm, difference=None if a.accuracy is None or b.accuracy is None else a.accuracy - b.accuracy,
        z=test and test[0], p_value=test and test[1], alpha=experiment.alpha,
        verdict=verdict.decision if verdict else f"no difference yet (fewer than {experiment.min_samples} labelled per arm)",
        always_valid_p=verdict and verdict.p_value, confidence_sequence=verdict and verdict.interval,
        method=f"mSPRT, normal mixture tau={experiment.tau} (Johari et al., Operations Research 2022)",
    )


def _paired(experiment: Experiment, outcomes: list[Outcome]) -> Paired | None:
    if experiment.shadow is None:
        return None
    pairs = [o for o in outcomes if o.shadow_top1 is not None]
    labelled = [o for o in pairs if o.label is not None]
    b = sum(o.top1 == o.label and o.shadow_top1 != o.label for o in labelled)
    c = sum(o.top1 != o.label and o.shadow_top1 == o.label for o in labelled)
    return Paired(
        shadow=experiment.shadow, pairs=len(pairs),
        agreement=float(np.mean([o.top1 == o.shadow_top1 for o in pairs])) if pairs else None,
        mean_kl=float(np.mean([o.shadow_kl for o in pairs])) if pairs else None,
        labelled_pairs=len(labelled), primary_only_correct=b, shadow_only_correct=c,
        mcnemar_p=mcnemar_exact(b, c) if labelled else None,
    )
