"""Calibration: what each runner costs on this machine's runtime, measured off the HTTP path.

For every ONNX session the server holds it times batch-1 latency and images per second at batch
sizes 1, 2, 4, ... up to the batcher's limit, within a time budget per runner, in a worker thread
(it shares the cores with live traffic, as the production numbers will). A cascade has no session
of its own: its cost is its stages' costs weighted by how many images reach each stage.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from dataclasses import dataclass

import numpy as np

from .variants import Runner

log = logging.getLogger("committee.calibration")


@dataclass(frozen=True)
class Calibration:
    batch1_ms: float
    best_batch: int
    images_per_s: float  # at best_batch
    measured_at: float  # wall-clock time (epoch seconds)


def batch_sizes(max_batch_size: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return [*sizes, max_batch_size]


def calibrate(runner: Runner, budget_s: float) -> Calibration:
    """Time ``runner``'s session for about ``budget_s`` (half on batch-1 latency, half on throughput by
    batch size); every measurement runs at least once, so a tiny budget still answers."""
    spec = runner.manifest.input
    rng = np.random.default_rng(0)

    def rows(n: int) -> np.ndarray:  # within the range of normalised pixels
        return rng.uniform(-1, 1, size=(n, spec.channels, spec.height, spec.width)).astype(np.float32)

    one = rows(1)
    runner.runtime.run(one)  # first-run allocations are not the model's cost
    latencies: list[float] = []
    end = time.monotonic() + budget_s / 2
    while not latencies or (time.monotonic() < end and len(latencies) < 200):
        t = time.perf_counter()
        runner.runtime.run(one)
        latencies.append(time.perf_counter() - t)
    sizes = batch_sizes(runner.batcher.max_batch_size)
    per_size = budget_s / 2 / len(sizes)
    rates: dict[int, float] = {}
    for size in sizes:
        batch = rows(size)
        images, started = 0, time.perf_counter()
        while not images or time.perf_counter() - started < per_size:
            runner.runtime.run(batch)
            images += size
        rates[size] = images / (time.perf_counter() - started)
    best = max(rates, key=rates.__getitem__)
    return Calibration(1000 * statistics.median(latencies), best, rates[best], time.time())


class Calibrator:
    """Calibrations by runner key (``name:version``); runs in the background, one runner at a time."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.results: dict[str, Calibration] = {}
        self._lock = asyncio.Lock()

    def get(self, runner: Runner) -> Calibration | None:
        return self.results.get(runner.key)

    async def run(self, runners: list[Runner], force: bool = False) -> dict[str, Calibration]:
        """Calibrate ``runners`` (those not yet measured unless ``force``), holding a lease on each."""
        async with self._lock:
            done = {}
            for runner in runners:
                if runner.key in self.results and not force:
                    continue
                if runner.batcher.closing:
                    continue
                runner.acquire()
                try:
                    started = time.monotonic()
                    result = await asyncio.to_thread(calibrate, runner, self.budget_s)
                except Exception:  # a model that fails here fails its requests too; that is reported there
                    log.exception("calibration of %s failed", runner.key)
                    continue
                finally:
                    runner.release()
                self.results[runner.key] = done[runner.key] = result
                log.info("calibrated %s in %.1f s: batch-1 %.2f ms, %.0f img/s at batch %d", runner.key,
                         time.monotonic() - started, result.batch1_ms, result.images_per_s, result.best_batch)
            return done
