"""Accuracy against compute over every published variant, with the Pareto front marked."""

from __future__ import annotations

from pathlib import Path

from model_store import Kind, Manifest, pareto_front

KIND_STYLE = {
    Kind.MEMBER: ("o", "tab:blue"),
    Kind.ENSEMBLE: ("s", "tab:orange"),
    Kind.ADAPTIVE_ENSEMBLE: ("D", "tab:green"),
    Kind.CASCADE: ("^", "tab:red"),
    Kind.STUDENT: ("*", "tab:purple"),
}


def on_front(manifests: list[Manifest]) -> set[str]:
    scored = [m for m in manifests if m.metrics]
    points = [(m.metrics.flops_per_image, m.metrics.accuracy) for m in scored]  # type: ignore[union-attr]
    return {str(scored[i].ref) for i in pareto_front(points)}


def plot_tradeoffs(manifests: list[Manifest], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [m for m in manifests if m.metrics]
    front = on_front(scored)
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    seen: set[Kind] = set()
    for m in scored:
        marker, colour = KIND_STYLE[m.kind]
        x, y = m.metrics.flops_per_image / 1e6, 100 * m.metrics.accuracy  # type: ignore[union-attr]
        ax.scatter(x, y, marker=marker, color=colour, s=80, label=None if m.kind in seen else m.kind.value,
                   edgecolors="black" if str(m.ref) in front else "none", linewidths=1.5, zorder=3)
        seen.add(m.kind)
        ax.annotate(m.name.split("-", 1)[-1], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    front_pts = sorted((m.metrics.flops_per_image / 1e6, 100 * m.metrics.accuracy) for m in scored if str(m.ref) in front)  # type: ignore[union-attr]
    if front_pts:
        ax.step(*zip(*front_pts), where="post", color="grey", linestyle="--", zorder=2, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("MFLOPs per image (2 × multiply-adds; cascade: expected)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
