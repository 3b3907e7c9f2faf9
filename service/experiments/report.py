"""A run's report from its recorded rows: per arm, A against B, the sample ratio, paired (shadow).

Versions are never pooled: each arm is compared on the latest version of its variant that the run
recorded (a hot reload mid-run starts counting afresh); earlier versions are listed beside it with
their own counts, and a note says how many labelled outcomes that left out. The unit of analysis is
the assignment key (see ``stats``).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field

from . import stats
from .definition import Experiment
from .state import Run, RunRows


class RunInfo(BaseModel):
    run_id: str
    started_at: float = Field(description="unix time")
    ended_at: float | None = Field(description="unix time; null while the run is live")
    end_reason: str | None
    live: bool


class VersionCount(BaseModel):
    version: int
    requests: int
    labelled: int
    correct: int


class ArmReport(BaseModel):
    arm: str
    variant: str
    version: int | None = Field(description="the variant version this arm is compared on (the latest the run recorded)")
    requests: int
    keys: int = Field(description="distinct assignment keys (users) among the requests")
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    labelled: int
    correct: int
    accuracy: float | None = Field(description="per-request online accuracy of the labelled answers")
    accuracy_ci95: tuple[float, float] | None = Field(description="cluster-robust 95 % interval (keys are the unit)")
    design_effect: float | None = Field(description="variance over what independent requests would give (1: no clustering)")
    earlier_versions: list[VersionCount] = Field(description="versions served earlier in this run: counted apart, never pooled")


class Comparison(BaseModel):
    a: str
    b: str
    difference: float | None = Field(description="online accuracy of A minus B")
    z: float | None = Field(description="cluster-robust z: valid for one look at a fixed sample size only")
    p_value: float | None = Field(description="of that z (fixed-n)")
    verdict: str = Field(description="A better | B better | no difference yet | no verdict: ... (always valid: read it as often as you like)")
    always_valid_p: float | None
    confidence_sequence: tuple[float, float] | None = Field(
        description="for A - B at 1 - alpha: the running intersection over every look, valid at all of them at once")
    alpha: float
    method: str


class SampleRatio(BaseModel):
    keys: list[int] = Field(description="assignment keys per arm, in the order of the experiment's arms")
    expected_share: list[float]
    p_value: float = Field(description="always valid")
    mismatch: bool = Field(description="true: the split is not what the weights say; no verdict is given")
    method: str


class Paired(BaseModel):
    """Primary and shadow on the same requests."""

    shadow: str
    shadow_version: int | None
    pairs: int
    agreement: float | None = Field(description="share of requests where both have the same top-1")
    mean_kl: float | None = Field(description="mean KL(primary || shadow) of the class probabilities")
    labelled_pairs: int
    primary_only_correct: int = Field(description="discordant: the primary right, the shadow wrong")
    shadow_only_correct: int = Field(description="discordant: the shadow right, the primary wrong")
    mcnemar_p: float | None = Field(description="McNemar's exact test on the discordant pairs: fixed-n, one look only")
    verdict: str | None = Field(description="primary better | shadow better | no difference yet (always valid)")
    always_valid_p: float | None
    method: str | None


class Report(BaseModel):
    experiment: Experiment
    run: RunInfo
    arms: list[ArmReport]
    comparison: Comparison | None
    sample_ratio: SampleRatio | None
    paired: Paired | None
    notes: list[str] = Field(description="what the numbers leave out and why")


class _Columns:
    """The run's predictions as arrays, and its labels in commit order as row indices."""

    def __init__(self, rows: RunRows) -> None:
        columns = list(zip(*rows.predictions)) if rows.predictions else [()] * 9
        rid, arm, version, key, latency, top1, shadow_version, shadow_top1, shadow_kl = columns
        self.arm = np.asarray(arm, dtype=object)
        self.version = np.asarray(version, dtype=np.int64)
        self.key = np.unique(np.asarray(key, dtype=object), return_inverse=True)[1].astype(np.int64)
        self.latency = np.asarray(latency, dtype=np.float64)
        self.top1 = np.asarray(top1, dtype=np.int64)
        self.shadow_version = np.asarray([-1 if v is None else v for v in shadow_version], dtype=np.int64)
        self.shadow_top1 = np.asarray([-1 if v is None else v for v in shadow_top1], dtype=np.int64)
        self.shadow_kl = np.asarray([np.nan if v is None else v for v in shadow_kl], dtype=np.float64)
        index = {r: i for i, r in enumerate(rid)}
        labelled = [(index[r], label) for r, label in rows.labels if r in index]
        self.labelled_rows = np.asarray([i for i, _ in labelled], dtype=np.int64)  # in label order
        self.label = np.full(len(rid), -1, dtype=np.int64)
        self.label[self.labelled_rows] = [label for _, label in labelled]


def build_report(run: Run, rows: RunRows) -> Report:
    experiment = run.experiment
    c = _Columns(rows)
    notes: list[str] = []
    current = np.zeros(len(c.arm), dtype=bool)  # rows of the version each arm is compared on
    arms = []
    for arm in experiment.arms:
        mine = c.arm == arm.name
        versions = sorted(set(c.version[mine].tolist()))
        latest = versions[-1] if versions else None
        now = mine & (c.version == latest)
        current |= now
        labelled = c.labelled_rows[now[c.labelled_rows]]
        accuracy = stats.arm_accuracy(c.top1[labelled] == c.label[labelled], c.key[labelled])
        earlier = [_version_count(c, mine & (c.version == v), v) for v in versions[:-1]]
        if earlier:
            left_out = sum(e.labelled for e in earlier)
            notes.append(f"arm {arm.name}: compared on {arm.variant} version {latest}; {left_out} labelled outcomes of "
                         f"earlier versions {[e.version for e in earlier]} are counted apart, never pooled")
        p50, p95, p99 = np.quantile(c.latency[now], (0.5, 0.95, 0.99)).tolist() if now.any() else (None,) * 3
        arms.append(ArmReport(
            arm=arm.name, variant=arm.variant, version=latest, requests=int(now.sum()), keys=len(np.unique(c.key[now])),
            p50_ms=p50, p95_ms=p95, p99_ms=p99, labelled=accuracy.labelled, correct=accuracy.correct,
            accuracy=accuracy.accuracy, accuracy_ci95=accuracy.ci95, design_effect=accuracy.design_effect,
            earlier_versions=earlier))
    sample_ratio = _sample_ratio(experiment, c)
    if experiment.record_rate < 1:
        notes.append(f"recording rate {experiment.record_rate}: the numbers cover the requests of a random "
                     f"{experiment.record_rate:.0%} of assignment keys (sampled independently of the arm)")
    return Report(experiment=experiment, run=RunInfo(run_id=run.run_id, started_at=run.started_at, ended_at=run.ended_at,
                                                     end_reason=run.end_reason, live=run.live),
                  arms=arms, comparison=_compare(experiment, arms, c, current, sample_ratio),
                  sample_ratio=sample_ratio, paired=_paired(experiment, c, current), notes=notes)


def _version_count(c: _Columns, rows: np.ndarray, version: int) -> VersionCount:
    labelled = rows & (c.label >= 0)
    return VersionCount(version=version, requests=int(rows.sum()), labelled=int(labelled.sum()),
                        correct=int((labelled & (c.top1 == c.label)).sum()))


def _sample_ratio(experiment: Experiment, c: _Columns) -> SampleRatio | None:
    """Arms of the run's keys in the order each key first appeared (every version: assignment
    does not depend on it), against the weights."""
    if len(experiment.arms) < 2 or not len(c.key):
        return None
    _, first = np.unique(c.key, return_index=True)
    arm_index = {arm.name: i for i, arm in enumerate(experiment.arms)}
    arm_of_new_keys = np.asarray([arm_index[a] for a in c.arm[np.sort(first)]], dtype=np.int64)
    result = stats.sample_ratio(arm_of_new_keys, [a.weight for a in experiment.arms], experiment.alpha)
    return SampleRatio(keys=list(result.observed), expected_share=list(result.expected_share), p_value=result.p_value,
                       mismatch=result.mismatch, method=result.method)


def _compare(experiment: Experiment, arms: list[ArmReport], c: _Columns, current: np.ndarray,
             sample_ratio: SampleRatio | None) -> Comparison | None:
    if len(arms) < 2:
        return None
    a, b = arms[0], arms[1]
    order = c.labelled_rows[current[c.labelled_rows] & np.isin(c.arm[c.labelled_rows], [a.arm, b.arm])]
    result = stats.compare_arms(c.arm[order] == a.arm, c.top1[order] == c.label[order], c.key[order],
                                experiment.alpha, experiment.min_samples, experiment.min_keys, experiment.tau)
    if result is None:
        verdict = (f"no difference yet (fewer than {experiment.min_samples} labelled requests or "
                   f"{experiment.min_keys} keys per arm)")
    elif sample_ratio is not None and sample_ratio.mismatch:
        verdict = (f"no verdict: sample ratio mismatch (keys {sample_ratio.keys} against shares "
                   f"{[round(s, 3) for s in sample_ratio.expected_share]}, p = {sample_ratio.p_value:.2g}); "
                   "find why one arm loses or gains users before reading any difference")
    else:
        verdict = result.decision
    return Comparison(
        a=a.arm, b=b.arm, difference=None if a.accuracy is None or b.accuracy is None else a.accuracy - b.accuracy,
        z=result and result.z, p_value=result and result.p_value, verdict=verdict,
        always_valid_p=result and result.always_valid_p, confidence_sequence=result and result.confidence_sequence,
        alpha=experiment.alpha, method=result.method if result else "not computed yet")


def _paired(experiment: Experiment, c: _Columns, current: np.ndarray) -> Paired | None:
    if experiment.shadow is None:
        return None
    shadowed = current & (c.shadow_top1 >= 0)
    version = int(c.shadow_version[shadowed].max()) if shadowed.any() else None
    pairs = shadowed & (c.shadow_version == version) if version is not None else shadowed
    labelled = c.labelled_rows[pairs[c.labelled_rows]]  # in label order
    primary_right = c.top1[labelled] == c.label[labelled]
    shadow_right = c.shadow_top1[labelled] == c.label[labelled]
    discordant = primary_right != shadow_right
    b, d = int((primary_right & ~shadow_right).sum()), int((~primary_right & shadow_right).sum())
    verdict = stats.paired_sequential(primary_right[discordant], experiment.alpha) if len(labelled) else None
    return Paired(
        shadow=experiment.shadow, shadow_version=version, pairs=int(pairs.sum()),
        agreement=float(np.mean(c.top1[pairs] == c.shadow_top1[pairs])) if pairs.any() else None,
        mean_kl=float(np.mean(c.shadow_kl[pairs])) if pairs.any() else None,
        labelled_pairs=len(labelled), primary_only_correct=b, shadow_only_correct=d,
        mcnemar_p=stats.mcnemar_exact(b, d) if len(labelled) else None,
        verdict=verdict and verdict.decision, always_valid_p=verdict and verdict.always_valid_p,
        method=verdict and verdict.method)
