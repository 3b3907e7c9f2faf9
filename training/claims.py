"""The seed papers' claims as rows measured on this run's test split.

Each row names the models it compares, what was measured and whether the claim held here, so the
results table answers "did the paper's effect show up?" without arithmetic by the reader.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from model_store import Manifest

CASCADE_TOLERANCE = 0.002  # accuracy the cascade may lose against the ensemble (Wang et al.: "matches")
CASCADE_FLOPS_SHARE = 0.5


@dataclass(frozen=True)
class Claim:
    key: str  # stable name of the row: members, single, cascade, distillation, adaptive
    paper: str
    claim: str
    measured: str
    holds: bool
    values: dict[str, float]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _acc(m: Manifest) -> float:
    assert m.metrics is not None
    return m.metrics.accuracy


def _flops(m: Manifest) -> float:
    assert m.metrics is not None
    return m.metrics.flops_per_image


def claims(manifests: list[Manifest], run_name: str) -> list[Claim]:
    """Rows for whichever of the compared models this run published (a disabled part has no row)."""
    by = {m.name.removeprefix(f"{run_name}-"): m for m in manifests}
    members = [m for name, m in by.items() if name.startswith("member-")]
    ensemble = by.get("ensemble-mean-prob")
    out: list[Claim] = []
    if ensemble and members:
        best = max(members, key=_acc)
        gain = _acc(ensemble) - _acc(best)
        out.append(Claim(
            "members", "Wang et al. 2022", f"the ensemble of {len(members)} beats its best member",
            f"{_acc(ensemble):.2%} vs {_acc(best):.2%} ({best.name}): {gain * 100:+.2f} pt", gain > 0,
            {"ensemble": _acc(ensemble), "best_member": _acc(best)},
        ))
    single = by.get("single-large")
    if ensemble and single:
        gain = _acc(ensemble) - _acc(single)
        out.append(Claim(
            "single", "Wang et al. 2022", "the ensemble beats one compound-scaled model of about its FLOPs",
            f"{_acc(ensemble):.2%} vs {_acc(single):.2%} at {_flops(single) / _flops(ensemble):.2f}x the ensemble's FLOPs: "
            f"{gain * 100:+.2f} pt", gain > 0,
            {"ensemble": _acc(ensemble), "single": _acc(single), "flops_ratio": _flops(single) / _flops(ensemble)},
        ))
    cascade = by.get("cascade")
    if ensemble and cascade:
        gap, share = _acc(ensemble) - _acc(cascade), _flops(cascade) / _flops(ensemble)
        out.append(Claim(
            "cascade", "Wang et al. 2022", f"the cascade is within {CASCADE_TOLERANCE * 100:.1f} pt of the ensemble at "
            f"<= {CASCADE_FLOPS_SHARE:.0%} of its FLOPs",
            f"{_acc(cascade):.2%} ({-gap * 100:+.2f} pt) at {share:.0%} of the FLOPs",
            gap <= CASCADE_TOLERANCE + 1e-9 and share <= CASCADE_FLOPS_SHARE,
            {"cascade": _acc(cascade), "ensemble": _acc(ensemble), "flops_share": share},
        ))
    student, twin = by.get("student"), by.get("student-undistilled")
    teacher = next((m for m in manifests if student and m.ref == student.composition.teacher), None)
    if student and twin and teacher:
        gain = _acc(teacher) - _acc(twin)
        kept = (_acc(student) - _acc(twin)) / gain if gain > 0 else float("nan")
        out.append(Claim(
            "distillation", "Hinton et al. 2015", "the distilled student beats its undistilled twin",
            f"{_acc(student):.2%} vs {_acc(twin):.2%}: {(_acc(student) - _acc(twin)) * 100:+.2f} pt; keeps {kept:.0%} of the "
            f"teacher's {gain * 100:+.2f} pt gain over the twin", _acc(student) > _acc(twin),
            {"student": _acc(student), "twin": _acc(twin), "teacher": _acc(teacher), "share_kept": kept},
        ))
    adaptive, mean = by.get("adaptive"), by.get("weak-mean")
    if adaptive and mean:
        gain = _acc(adaptive) - _acc(mean)
        out.append(Claim(
            "adaptive", "Bruno et al. 2023", "the learned head beats the plain mean of the same weak learners",
            f"{_acc(adaptive):.2%} vs {_acc(mean):.2%}: {gain * 100:+.2f} pt", gain > 0,
            {"adaptive": _acc(adaptive), "weak_mean": _acc(mean)},
        ))
    return out
