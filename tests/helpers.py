"""Small real inputs shared by the tests: IDX files, PNG folders, manifest fields."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_mnist_like(directory: Path, n_train: int = 60, n_test: int = 20, compress: bool = True, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), compress)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, compress)


def member_fields(name: str = "m", **overrides) -> dict:
    fields = {
        "name": name,
        "kind": "member",
        "input": {"channels": 1, "height": 8, "width": 8, "colour_mode": "L", "mean": [0.5], "std": [0.25]},
        "labels": ["a", "b", "c"],
        "io": {"input_name": "input", "output_name": "logits"},
    }
    return {**fields, **overrides}
