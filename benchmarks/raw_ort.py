"""Raw ONNX Runtime on the published model: batch-1 latency and batch-N throughput, printed as JSON.

Same session options as the server (``service.runtime``), so the ratio measures the server alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from model_store import ModelStore
from service.config import Settings
from service.runtime import load_runtime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    store = ModelStore(args.store)
    m = store.resolve(args.model)
    runtime = load_runtime(store.verify(m), "input", ["logits"], Settings())
    shape = (m.input.channels, m.input.height, m.input.width)
    one = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
    many = np.random.default_rng(1).normal(size=(args.batch, *shape)).astype(np.float32)
    for _ in range(20):
        runtime.run(one)
        runtime.run(many)
    latencies = []
    end = time.monotonic() + args.seconds / 2
    while time.monotonic() < end:
        t = time.perf_counter()
        runtime.run(one)
        latencies.append(time.perf_counter() - t)
    images, t0 = 0, time.perf_counter()
    end = time.monotonic() + args.seconds / 2
    while time.monotonic() < end:
        runtime.run(many)
        images += args.batch
    print(json.dumps({
        "batch1_ms_p50": 1000 * statistics.median(latencies),
        "batch1_per_s": len(latencies) / sum(latencies),
        f"batch{args.batch}_img_per_s": images / (time.perf_counter() - t0),
    }))


if __name__ == "__main__":
    main()
