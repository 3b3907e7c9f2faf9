"""Export a randomly initialised timm model to ONNX and publish it as a member (the benchmark's model).

Runs in its own process: torch never shares a process with ONNX Runtime compute here.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import timm
import torch

from model_store import ModelStore


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.arch, pretrained=False, num_classes=10).eval()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is chosen on purpose
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(model, (torch.zeros(1, 3, args.size, args.size),), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
        ModelStore(args.store).publish({
            "name": args.arch, "kind": "member", "architecture": args.arch,
            "description": "random weights, for benchmarks only",
            "input": {"channels": 3, "height": args.size, "width": args.size, "colour_mode": "RGB",
                      "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
            "labels": [f"class-{i}" for i in range(10)],
            "io": {"input_name": "input", "output_name": "logits"},
        }, path)


if __name__ == "__main__":
    main()
