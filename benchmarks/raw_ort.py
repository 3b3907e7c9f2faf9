"""Raw ONNX Runtime on a published model: batch-1 latency and throughput at each batch size, as JSON.

Same session options as the server (``service.runtime``), so a ratio against it measures the server alone.
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
from service.runtime import Runtime, load_runtime


def images_per_s(runtime: Runtime, batch: np.ndarray, seconds: float) -> float:
    for _ in range(3):
        runtime.run(batch)
    images, t0 = 0, time.perf_counter()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        runtime.run(batch)
        images += len(batch)
    return images / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batches", default="1,2,4,8,16,32", help="batch sizes to time, comma-separated")
    parser.add_argument("--seconds", type=float, default=5.0, help="time spent per measurement")
    args = parser.parse_args()
    store = ModelStore(args.store)
    m = store.resolve(args.model)
    runtime = load_runtime(store.read_artifact(m), m.io.input_name, [m.io.output_name], Settings())
    rng = np.random.default_rng(0)
    shape = (m.input.channels, m.input.height, m.input.width)
    one = rng.normal(size=(1, *shape)).astype(np.float32)
    for _ in range(20):
        runtime.run(one)
    latencies = []
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        runtime.run(one)
        latencies.append(time.perf_counter() - t)
    per_batch = {int(b): images_per_s(runtime, rng.normal(size=(int(b), *shape)).astype(np.float32), args.seconds)
                 for b in args.batches.split(",")}
    best = max(per_batch, key=per_batch.__getitem__)
    print(json.dumps({
        "batch1_ms_p50": 1000 * statistics.median(latencies),
        "img_per_s": per_batch,
        "best_batch": best,
        "best_img_per_s": per_batch[best],
    }))


if __name__ == "__main__":
    main()
