"""Results of a run as a terminal table and a Markdown page (the page goes into docs/)."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from model_store import Kind, Manifest

from .claims import Claim
from .tradeoffs import on_front

COLUMNS = ("model", "kind", "accuracy", "weighted F1", "NLL", "ECE", "Brier", "MFLOPs/img", "members/img", "params", "Pareto")


def _row(m: Manifest, front: set[str]) -> tuple[str, ...]:
    x = m.metrics
    assert x is not None
    per_image = x.members_per_image or len(m.composition.members) or 1
    return (
        str(m.ref), m.kind.value, f"{x.accuracy:.4f}", f"{x.weighted_f1:.4f}", f"{x.nll:.4f}", f"{x.ece:.4f}",
        f"{x.brier:.4f}", f"{x.flops_per_image / 1e6:.1f}", f"{per_image:.2f}", f"{x.params:,}",
        "★" if str(m.ref) in front else "",
    )


def member_summary(manifests: list[Manifest]) -> tuple[str, ...] | None:
    """Mean +- std over the (first) ensemble's members, the baseline an ensemble must beat."""
    ensemble = next((m for m in manifests if m.kind is Kind.ENSEMBLE), None)
    refs = {str(r) for r in ensemble.composition.members} if ensemble else set()
    members = [m.metrics for m in manifests if str(m.ref) in refs and m.metrics]
    if len(members) < 2:
        return None

    def ms(values: list[float], fmt: str = ".4f") -> str:
        return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"

    return (
        f"members (n={len(members)})", "mean ± std", ms([m.accuracy for m in members]), ms([m.weighted_f1 for m in members]),
        ms([m.nll for m in members]), ms([m.ece for m in members]), ms([m.brier for m in members]),
        f"{statistics.mean(m.flops_per_image for m in members) / 1e6:.1f}", "1.00", f"{members[0].params:,}", "",
    )


def rows(manifests: list[Manifest]) -> list[tuple[str, ...]]:
    front = on_front(manifests)
    out = [_row(m, front) for m in manifests if m.metrics]
    summary = member_summary(manifests)
    return out + ([summary] if summary else [])


POINT_COLUMNS = ("cascade", "point", "tolerance", "val accuracy", "accuracy", "members/img (val)", "reach per stage (val)")


def operating_point_rows(manifests: list[Manifest]) -> list[tuple[str, ...]]:
    """Every cascade's operating points, default first: what a server gives up and saves by stepping
    down the list under load."""
    return [
        (str(m.ref), str(i), f"{p.tolerance:.3f}", f"{p.val_accuracy:.4f}", f"{p.accuracy:.4f}",
         f"{p.members_per_image:.2f}", " / ".join(f"{r:.2f}" for r in p.reach))
        for m in manifests for i, p in enumerate(m.composition.operating_points)
    ]


CLAIM_COLUMNS = ("paper", "claim", "measured on test", "evidence (paired, same test images)", "verdict")


def claim_rows(found: list[Claim]) -> list[tuple[str, ...]]:
    return [(c.paper, c.claim, c.measured, c.evidence, c.verdict) for c in found]


def print_table(manifests: list[Manifest], title: str, found: list[Claim]) -> None:
    table = Table(title=title)
    for c in COLUMNS:
        table.add_column(c, justify="left" if c in ("model", "kind") else "right")
    for r in rows(manifests):
        table.add_row(*r)
    claims_table = Table(title="the seed papers' claims on this run")
    for c in CLAIM_COLUMNS:
        claims_table.add_column(c)
    for r in claim_rows(found):
        claims_table.add_row(*r)
    # Pipes and CI logs get the full width instead of rich's 80-column default.
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(table)
    if found:
        console.print(claims_table)


def _markdown(columns: tuple[str, ...], body: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def markdown_table(manifests: list[Manifest]) -> str:
    return _markdown(COLUMNS, rows(manifests))


def write_markdown(manifests: list[Manifest], path: Path, command: str, seconds: float, found: list[Claim]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    points = operating_point_rows(manifests)
    first = manifests[0].provenance if manifests else None
    data = (
        f"{first.dataset}: train {first.train_size}, validation {first.val_size}, test {first.test_size} images"
        if first else "no models"
    )
    path.write_text(
        f"# Training results\n\nCommand: `{command}`  \nData: {data}  \nWall time: {seconds:.0f} s\n\n"
        "All metrics are measured on the held-out test split. FLOPs = 2 × multiply-adds per image "
        "(a cascade's are the expected FLOPs on test). ★ marks the accuracy-vs-FLOPs Pareto front.\n\n"
        + markdown_table(manifests)
        + ("\n## Cascade operating points\n\nThresholds fit on validation at each tolerance; point 0 is served by default. "
           "Accuracy is on test.\n\n" + _markdown(POINT_COLUMNS, points) if points else "")
        + ("\n## The seed papers' claims\n\n" + _markdown(CLAIM_COLUMNS, claim_rows(found)) if found else "")
        + "\n![accuracy vs FLOPs](tradeoffs.png)\n"
    )
