"""The one definition of "on the Pareto front", shared by training's plots and the server's
``/v1/tradeoffs``, so both mark the same variants."""

from __future__ import annotations


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of (cost, accuracy) points no other point beats: nothing at most as costly is at
    least as accurate and strictly better in one of the two."""
    front = []
    for i, (cost, acc) in enumerate(points):
        dominated = any(
            c <= cost and a >= acc and (c < cost or a > acc) for j, (c, a) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return front
