"""A sliding window of recent request latencies per variant: what a variant costs here, now.

Prometheus histograms answer "how slow since start" in fixed buckets; routing and ``/v1/tradeoffs``
need exact recent quantiles. The window keeps the last ``capacity`` observations no older than
``max_age_s`` in a preallocated ring: ``observe`` is O(1) on the hot path, quantiles cost a sort of
at most ``capacity`` values and are computed only when someone asks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WindowStats:
    count: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    requests_per_s: float


class LatencyWindow:
    def __init__(self, capacity: int = 2048, max_age_s: float = 300.0, started: float | None = None) -> None:
        if capacity < 1 or max_age_s <= 0:
            raise ValueError("capacity must be >= 1 and max_age_s > 0")
        self.capacity = capacity
        self.max_age_s = max_age_s
        self.started = time.monotonic() if started is None else started
        self._seconds = np.zeros(capacity)
        self._at = np.full(capacity, -np.inf)  # monotonic time of each observation; -inf: empty slot
        self._next = 0

    def observe(self, seconds: float, now: float | None = None) -> None:
        i = self._next
        self._seconds[i] = seconds
        self._at[i] = time.monotonic() if now is None else now
        self._next = (i + 1) % self.capacity

    def recent(self, now: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Latencies (seconds) and their times, for observations within ``max_age_s`` of ``now``."""
        now = time.monotonic() if now is None else now
        keep = self._at >= now - self.max_age_s
        return self._seconds[keep], self._at[keep]

    def stats(self, now: float | None = None) -> WindowStats:
        now = time.monotonic() if now is None else now
        seconds, at = self.recent(now)
        if not len(seconds):
            return WindowStats(0, None, None, None, 0.0)
        p50, p95, p99 = (1000 * np.quantile(seconds, (0.5, 0.95, 0.99))).tolist()
        # The rate over the span the window covers: the max age (or the time since start, if shorter)
        # while it is not full, else back to its oldest observation (a busy variant fills it sooner).
        span = min(self.max_age_s, now - self.started) if len(seconds) < self.capacity else now - float(at.min())
        return WindowStats(len(seconds), p50, p95, p99, len(seconds) / max(span, 1e-3))
