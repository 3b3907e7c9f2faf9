"""Seed spread: the headline numbers of repeated runs (their ``claims.json``) side by side, so a
reader can tell which differences between models are larger than run-to-run noise.

Ratios across runs are ratios of means, never means of ratios: the share of the teacher's gain a
student keeps is mean(student - twin) / mean(teacher - twin) over the runs, which stays defined and
stable when one run's teacher barely beats its twin (a per-run ratio then swings without bound).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

# (label, claim row, value), every value a share shown in per cent
HEADLINES = (
    ("ensemble accuracy", "members", "ensemble"),
    ("best member accuracy", "members", "best_member"),
    ("equal-FLOPs single model accuracy", "single", "single"),
    ("cascade accuracy", "cascade", "cascade"),
    ("cascade FLOPs / ensemble FLOPs", "cascade", "flops_share"),
    ("student accuracy", "distillation", "student"),
    ("undistilled twin accuracy", "distillation", "twin"),
    ("adaptive ensemble accuracy", "adaptive", "adaptive"),
    ("mean of the same weak learners", "adaptive", "weak_mean"),
)
# (label, claim row): the row's paired difference (A - B, per cent points) and its verdict per run
DIFFERENCES = (
    ("ensemble - best member (pt)", "members"),
    ("ensemble - equal-FLOPs single (pt)", "single"),
    ("cascade - ensemble (pt)", "cascade"),
    ("student - twin (pt)", "distillation"),
    ("adaptive - weak mean (pt)", "adaptive"),
)


def pooled_share_kept(runs: list[dict[str, dict]]) -> float | None:
    """mean(student - twin) / mean(teacher - twin) over the runs that have the row; None when the
    teacher is on average no better than the twin (or no run has the row)."""
    rows = [r["distillation"] for r in runs if "distillation" in r]
    if not rows:
        return None
    kept = statistics.mean(v["student"] - v["twin"] for v in rows)
    gain = statistics.mean(v["teacher"] - v["twin"] for v in rows)
    return kept / gain if gain > 0 else None


def _mean_std(numbers: list[float], scale: float = 100) -> str:
    if len(numbers) < 2:
        return ""
    return f"{statistics.mean(numbers) * scale:.2f} ± {statistics.stdev(numbers) * scale:.2f}"


def spread_table(report_dirs: list[Path]) -> str:
    runs = [json.loads((d / "claims.json").read_text()) for d in report_dirs]
    rows = [{c["key"]: c for c in r["claims"]} for r in runs]
    flat = [{k: c["values"] for k, c in r.items()} for r in rows]
    lines = [
        "| headline | " + " | ".join(d.name for d in report_dirs) + " | mean ± std |",
        "|---|" + "---|" * (len(report_dirs) + 1),
    ]
    for label, claim, key in HEADLINES:
        numbers = [f.get(claim, {}).get(key) for f in flat]
        if any(n is None for n in numbers):
            continue
        spread = _mean_std(numbers)
        lines.append(f"| {label} | " + " | ".join(f"{n * 100:.2f}" for n in numbers) + f" | {spread + ' %' if spread else ''} |")
    for label, claim in DIFFERENCES:
        found = [r.get(claim) for r in rows]
        if any(c is None or c["values"].get("difference") is None for c in found):
            continue
        diffs = [c["values"]["difference"] for c in found]
        cells = [f"{c['values']['difference'] * 100:+.2f} (p={c['values']['p_value']:.2g}, {c.get('verdict', '?')})" for c in found]
        held = sum(c.get("verdict") == "holds" for c in found)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_mean_std(diffs)} pt; holds in {held} of {len(found)} |")
    if all("distillation" in f for f in flat):
        kept = pooled_share_kept(flat)
        per_run = [f["distillation"].get("share_kept") for f in flat]
        cells = ["undefined" if k is None else f"{k * 100:.1f}" for k in per_run]
        pooled = "undefined: on average the teacher is no better than the twin" if kept is None else f"{kept * 100:.1f} % (ratio of mean differences)"
        lines.append("| share of the teacher's gain kept (%) | " + " | ".join(cells) + f" | {pooled} |")
    seconds = [r["seconds"] for r in runs]
    lines.append("| wall time (s) | " + " | ".join(f"{s:.0f}" for s in seconds) + f" | {statistics.mean(seconds):.0f} |")
    return "\n".join(lines) + "\n"
