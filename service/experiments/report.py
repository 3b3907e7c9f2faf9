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
    """One arm's primary and the shadow on the same requests."""

    arm: str
    primary: str
    shadow: str
    shadow_version: int | None
    pairs: int
    agreement: float | None = Field(description="share of requests where both have the same top-1")
    mean_kl: float | None = Field(description="mean KL(primary || shadow) of the class probabilities")
    labelled_pairs: int = Field(description="pairs whose label arrived after the shadow answered")
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
    paired: list[Paired] = Field(description="per arm whose variant is not the shadow's; empty without a shadow")
    notes: list[str] = Field(description="what the numbers leave out and why")


class _Columns:
    """The run's answers as arrays (in the order answered), and its labels in commit order as row
    indices; ``arm`` holds each answer's arm index in the definition."""

    def __init__(self, rows: RunRows) -> None:
        m = np.array(rows.rows, dtype=np.float64).reshape(-1, 12)
        self.arm = m[:, 0].astype(np.int64)
        self.version = m[:, 1].astype(np.int64)
        self.key = np.unique(m[:, 2], return_inverse=True)[1].astype(np.int64)
        self.latency = m[:, 3]
        self.top1 = m[:, 4].astype(np.int64)
        self.shadow_version = m[:, 5].astype(np.int64)
        self.shadow_top1 = m[:, 6].astype(np.int64)
        self.shadow_kl = m[:, 7]
        self.shadow_at = m[:, 8]
        self.label = m[:, 9].astype(np.int64)
        labelled = np.flatnonzero(self.label >= 0)
        self.labelled_rows = labelled[np.argsort(m[labelled, 10], kind="stable")]  # in label order
        self.labelled_at = m[:, 11]

    def ordered(self, rows: np.ndarray) -> np.ndarray:
        """The labelled rows among the boolean mask ``rows``, in the order their labels arrived."""
        return self.labelled_rows[rows[self.labelled_rows]]


def _compared(experiment: Experiment, c: _Columns) -> tuple[np.ndarray, dict[str, int | None], int]:
    """Rows the comparison uses: each arm on the version of its most recent answer, and, once an
    arm changed version, only from its first answer on that version after its last answer of any
    other version (so a rollback restarts the window too). A hot reload of one arm restarts the window of both, so the arms are always
    compared over the same period, and the verdict starts afresh like a new run's.
    Returns (mask, version per arm, first row)."""
    latest: dict[str, int | None] = {}
    start = 0
    for index, arm in enumerate(experiment.arms):
        mine = np.flatnonzero(c.arm == index)
        if not len(mine):
            latest[arm.name] = None
            continue
        latest[arm.name] = int(c.version[mine[-1]])
        other = mine[c.version[mine] != latest[arm.name]]
        if len(other):  # this arm changed version during the run (a rollback too): start at its first
            start = max(start, int(mine[mine > other[-1]][0]))  # answer on the latest version since the last other one
    mask = np.zeros(len(c.arm), dtype=bool)
    for index, version in enumerate(latest.values()):
        if version is not None:
            mask |= (c.arm == index) & (c.version == version)
    mask[:start] = False
    return mask, latest, start


def build_report(run: Run, rows: RunRows) -> Report:
    experiment = run.experiment
    c = _Columns(rows)
    notes: list[str] = []
    current, latest, start = _compared(experiment, c)
    arms = []
    for index, arm in enumerate(experiment.arms):
        mine = c.arm == index
        now = mine & current
        labelled = c.ordered(now)
        accuracy = stats.arm_accuracy(c.top1[labelled] == c.label[labelled], c.key[labelled])
        versions = sorted(set(c.version[mine].tolist()) - {latest[arm.name]})
        earlier = [_version_count(c, mine & (c.version == v), v) for v in versions]
        if earlier:
            notes.append(f"arm {arm.name}: compared on {arm.variant} version {latest[arm.name]}; "
                         f"{sum(e.labelled for e in earlier)} labelled outcomes of other versions {versions} are counted "
                         "apart, never pooled")
        p50, p95, p99 = np.quantile(c.latency[now], (0.5, 0.95, 0.99)).tolist() if now.any() else (None,) * 3
        arms.append(ArmReport(
            arm=arm.name, variant=arm.variant, version=latest[arm.name], requests=int(now.sum()),
            keys=len(np.unique(c.key[now])), p50_ms=p50, p95_ms=p95, p99_ms=p99, labelled=accuracy.labelled,
            correct=accuracy.correct, accuracy=accuracy.accuracy, accuracy_ci95=accuracy.ci95,
            design_effect=accuracy.design_effect, earlier_versions=earlier))
    if start:
        left_out = int(((c.label >= 0)[:start]).sum())
        notes.append(f"the comparison window starts at the first answer of the newest version ({start} earlier answers, "
                     f"{left_out} of them labelled, are left out), so both arms are compared over the same period")
    if experiment.record_rate < 1:
        notes.append(f"recording rate {experiment.record_rate}: the numbers cover the requests of a random "
                     f"{experiment.record_rate:.0%} of assignment keys (sampled independently of the arm)")
    sample_ratio = _sample_ratio(experiment, c)
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
    arm_of_new_keys = c.arm[np.sort(first)]
    arm_of_new_keys = arm_of_new_keys[arm_of_new_keys >= 0]  # answers of arms no longer in the definition: none
    result = stats.sample_ratio(arm_of_new_keys, [a.weight for a in experiment.arms], experiment.alpha)
    return SampleRatio(keys=list(result.observed), expected_share=list(result.expected_share), p_value=result.p_value,
                       mismatch=result.mismatch, method=result.method)


def _compare(experiment: Experiment, arms: list[ArmReport], c: _Columns, current: np.ndarray,
             sample_ratio: SampleRatio | None) -> Comparison | None:
    if len(arms) < 2:
        return None
    a, b = arms[0], arms[1]
    order = c.ordered(current & ((c.arm == 0) | (c.arm == 1)))
    result = stats.compare_arms(c.arm[order] == 0, c.top1[order] == c.label[order], c.key[order],
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


def _paired(experiment: Experiment, c: _Columns, current: np.ndarray) -> list[Paired]:
    """Per arm, its primary against the shadow on the same requests (arms are never pooled: each
    arm's primary is another model). A pair enters the sequence only if the shadow had answered
    before the label arrived, so a late shadow never rewrites the past."""
    if experiment.shadow is None:
        return []
    out = []
    for index, arm in enumerate(experiment.arms):
        if arm.variant == experiment.shadow:
            continue
        shadowed = current & (c.arm == index) & (c.shadow_top1 >= 0)
        version = int(c.shadow_version[np.flatnonzero(shadowed)[-1]]) if shadowed.any() else None  # the most recent
        pairs = shadowed & (c.shadow_version == version)
        labelled = c.ordered(pairs & (c.shadow_at <= c.labelled_at))
        primary_right = c.top1[labelled] == c.label[labelled]
        shadow_right = c.shadow_top1[labelled] == c.label[labelled]
        b, d = int((primary_right & ~shadow_right).sum()), int((~primary_right & shadow_right).sum())
        discordant = primary_right != shadow_right
        verdict = stats.paired_sequential(primary_right[discordant], experiment.alpha, key=c.key[labelled][discordant])
        out.append(Paired(
            arm=arm.name, primary=arm.variant, shadow=experiment.shadow, shadow_version=version, pairs=int(pairs.sum()),
            agreement=float(np.mean(c.top1[pairs] == c.shadow_top1[pairs])) if pairs.any() else None,
            mean_kl=float(np.mean(c.shadow_kl[pairs])) if pairs.any() else None,
            labelled_pairs=len(labelled), primary_only_correct=b, shadow_only_correct=d,
            mcnemar_p=stats.mcnemar_exact(b, d) if len(labelled) else None,
            verdict=verdict.decision if len(labelled) else None, always_valid_p=verdict.always_valid_p if len(labelled) else None,
            method=verdict.method))
    return out
