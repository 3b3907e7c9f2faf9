"""Seed spread: the headline numbers of repeated runs (their ``claims.json``) side by side, so a
reader can tell which differences between models are larger than run-to-run noise."""

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
    ("share of the teacher's gain kept", "distillation", "share_kept"),
    ("adaptive ensemble accuracy", "adaptive", "adaptive"),
    ("mean of the same weak learners", "adaptive", "weak_mean"),
)


def spread_table(report_dirs: list[Path]) -> str:
    runs = [json.loads((d / "claims.json").read_text()) for d in report_dirs]
    flat = [{c["key"]: c["values"] for c in r["claims"]} for r in runs]
    lines = [
        "| headline | " + " | ".join(d.name for d in report_dirs) + " | mean ± std |",
        "|---|" + "---|" * (len(report_dirs) + 1),
    ]
    for label, claim, key in HEADLINES:
        numbers = [f.get(claim, {}).get(key) for f in flat]
        if any(n is None for n in numbers):
            continue
        cells = [f"{n * 100:.2f}" for n in numbers]
        spread = f"{statistics.mean(numbers) * 100:.2f} ± {statistics.stdev(numbers) * 100:.2f} %" if len(numbers) > 1 else ""
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {spread} |")
    seconds = [r["seconds"] for r in runs]
    lines.append("| wall time (s) | " + " | ".join(f"{s:.0f}" for s in seconds) + f" | {statistics.mean(seconds):.0f} |")
    return "\n".join(lines) + "\n"
