"""The trade-off scatter as PNG: accuracy against latency and against cost, Pareto fronts marked,
every point labelled where its label overlaps no other label and no point."""

from __future__ import annotations

import io
from typing import Callable

from .tradeoffs import Tradeoff, latency_of

# Label positions tried in order (points of offset from the marker): right, left, above, below, diagonals, further out.
_OFFSETS = [(dx * r, dy * r) for r in (1, 2, 3)
            for dx, dy in ((6, 4), (-6, 4), (0, 9), (0, -12), (6, -10), (-6, -10), (6, 12), (-6, 12))]


def _place_labels(ax, fig, points: list[tuple[float, float, str]]) -> None:
    """Greedy placement: each label takes the first offset whose box is clear of labels placed so
    far and of every marker; if none is clear it takes the least-overlapping one."""
    renderer = fig.canvas.get_renderer()
    markers = [ax.transData.transform((x, y)) for x, y, _ in points]
    placed = []

    def overlap(box) -> float:
        grown = box.expanded(1.05, 1.15)
        area = sum(max(0.0, min(grown.x1, b.x1) - max(grown.x0, b.x0)) * max(0.0, min(grown.y1, b.y1) - max(grown.y0, b.y0))
                   for b in placed)
        return area + sum(1e4 for mx, my in markers if grown.x0 - 4 <= mx <= grown.x1 + 4 and grown.y0 - 4 <= my <= grown.y1 + 4)

    for x, y, text in points:
        best = None
        for dx, dy in _OFFSETS:
            ha = "left" if dx > 0 else "right" if dx < 0 else "center"
            note = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8, ha=ha,
                               va="bottom" if dy >= 0 else "top")
            box = note.get_window_extent(renderer)
            score = overlap(box)
            if best is None or score < best[0]:
                if best is not None:
                    best[1].remove()
                best = (score, note, box)
            else:
                note.remove()
            if score == 0:
                break
        assert best is not None
        placed.append(best[2])


def _panel(ax, fig, rows: list[Tradeoff], x_of: Callable[[Tradeoff], float | None], front_flag: str, xlabel: str) -> None:
    shown = [(r, x_of(r)) for r in rows if r.accuracy is not None and x_of(r) is not None]
    for r, x in shown:
        on_front = getattr(r, front_flag)
        ax.scatter(x, 100 * r.accuracy, s=70, zorder=3, color="tab:red" if on_front else "tab:blue",
                   edgecolors="black" if on_front else "none", linewidths=1.2)
    front = sorted((x, 100 * r.accuracy) for r, x in shown if getattr(r, front_flag))
    if len(front) > 1:
        ax.step(*zip(*front), where="post", color="tab:red", linestyle="--", linewidth=1, zorder=2)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    if shown:
        xs = [x for _, x in shown]
        ax.set_xlim(min(xs) / 1.6, max(xs) * 1.6)
        ys = [100 * r.accuracy for r, _ in shown]
        pad = max(0.5, (max(ys) - min(ys)) * 0.15)
        ax.set_ylim(min(ys) - pad, max(ys) + pad)
        fig.canvas.draw()
        _place_labels(ax, fig, [(x, 100 * r.accuracy, r.name) for r, x in shown])
    else:
        ax.text(0.5, 0.5, "nothing measured yet", transform=ax.transAxes, ha="center")


def tradeoff_png(rows: list[Tradeoff]) -> bytes:
    """Drawn on a figure of its own (no pyplot state), so requests in worker threads never share one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    unit = next((r.cost_unit for r in rows), "core-seconds")
    fig = Figure(figsize=(13, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    _panel(left, fig, rows, latency_of, "pareto_latency", "latency per image, ms (calibrated batch-1; else live p50)")
    _panel(right, fig, rows, lambda r: r.cost_per_1000_images, "pareto_cost", f"cost per 1,000 images ({unit}, at best batch)")
    fig.suptitle("Accuracy × latency and accuracy × cost per served variant (red: Pareto front)")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()
