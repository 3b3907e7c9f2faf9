"""A small real model store built with the onnx helper API (no torch): linear classifiers over
4x4 grey images, an 'ensemble' with member outputs, a cascade over two members, and broken models.

The weights are chosen so predictions are known: member m's logits are ``x.flatten() @ W_m``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from model_store import ModelStore

SIZE, CLASSES = 4, 3
LABELS = ["circle", "square", "triangle"]
INPUT = {"channels": 1, "height": SIZE, "width": SIZE, "colour_mode": "L", "mean": [0.5], "std": [0.25]}
METRICS = {"samples": 100, "accuracy": 0.9, "weighted_f1": 0.9, "nll": 0.3, "ece": 0.02, "brier": 0.15,
           "params": 48, "flops_per_image": 96.0}


def weights(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(SIZE * SIZE, CLASSES)).astype(np.float32)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _input():
    return helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, SIZE, SIZE])


def linear_model(path: Path, w: np.ndarray, fixed_batch: int | None = None) -> Path:
    """logits = flatten(input) @ w. With ``fixed_batch`` the graph reshapes to that batch size, so
    it fails at run time on any other batch (a model that breaks under batching)."""
    shape = np.array([fixed_batch or -1, SIZE * SIZE], dtype=np.int64)
    nodes = [
        helper.make_node("Reshape", ["input", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "linear", [_input()],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(shape, "shape"), numpy_helper.from_array(w, "w")],
    )
    return _save(graph, path)


def poisonable_model(path: Path, w: np.ndarray) -> Path:
    """logits = flatten(input) @ w, but ONNX Runtime fails the whole batch when any input value is
    >= 2 or < -2 (it becomes an out-of-range Gather index): a model that breaks on some data."""
    nodes = [
        helper.make_node("Reshape", ["input", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["product"]),
        helper.make_node("ReduceMax", ["input"], ["peak"], keepdims=0),
        helper.make_node("Cast", ["peak"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["zeros", "index"], ["nothing"]),
        helper.make_node("Add", ["product", "nothing"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "poisonable", [_input()],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(np.array([-1, SIZE * SIZE], np.int64), "shape"), numpy_helper.from_array(w, "w"),
         numpy_helper.from_array(np.zeros(2, np.float32), "zeros")],
    )
    return _save(graph, path)


def slow_model(path: Path, w: np.ndarray, layers: int = 60, width: int = 1024) -> Path:
    """logits = flatten(input) @ w, after ``layers`` width x width matrix products that cost real
    compute per image (one shared weight, so the file stays small): a model whose capacity a
    Python client can exceed tenfold."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Reshape", ["input", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "up"], ["h0"])]
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "square"], [f"h{i + 1}"]))
    nodes += [helper.make_node("MatMul", [f"h{layers}", "down"], ["mixed"]),
              helper.make_node("Mul", ["mixed", "zero"], ["nothing"]),
              helper.make_node("MatMul", ["flat", "w"], ["product"]),
              helper.make_node("Add", ["product", "nothing"], ["logits"])]
    square = (np.linalg.qr(rng.normal(size=(width, width)))[0]).astype(np.float32)  # orthogonal: values stay finite
    graph = helper.make_graph(
        nodes, "slow", [_input()],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(np.array([-1, SIZE * SIZE], np.int64), "shape"), numpy_helper.from_array(w, "w"),
         numpy_helper.from_array(rng.normal(size=(SIZE * SIZE, width)).astype(np.float32), "up"),
         numpy_helper.from_array(square, "square"),
         numpy_helper.from_array(rng.normal(size=(width, CLASSES)).astype(np.float32), "down"),
         numpy_helper.from_array(np.zeros(1, np.float32), "zero")],
    )
    return _save(graph, path)


def ensemble_model(path: Path, ws: list[np.ndarray]) -> Path:
    """logits = mean of member logits; also outputs member_logits (batch x members x classes)."""
    stacked = np.concatenate(ws, axis=1)  # 16 x (M*K)
    m = len(ws)
    nodes = [
        helper.make_node("Reshape", ["input", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["all"]),
        helper.make_node("Reshape", ["all", "member_shape"], ["member_logits"]),
        helper.make_node("ReduceMean", ["member_logits"], ["logits"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "ensemble", [_input()],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES]),
         helper.make_tensor_value_info("member_logits", TensorProto.FLOAT, ["batch", m, CLASSES])],
        [numpy_helper.from_array(np.array([-1, SIZE * SIZE], np.int64), "flat_shape"),
         numpy_helper.from_array(np.array([-1, m, CLASSES], np.int64), "member_shape"),
         numpy_helper.from_array(stacked, "w")],
    )
    return _save(graph, path)


def fields(name: str, kind: str = "member", **extra) -> dict:
    return {"name": name, "kind": kind, "input": INPUT, "labels": LABELS, "metrics": METRICS,
            "io": {"input_name": "input", "output_name": "logits"}, **extra}


def point(threshold: float, accuracy: float, second_stage_reach: float) -> dict:
    """An operating point of a two-stage cascade."""
    return {"thresholds": [threshold], "tolerance": 0.0, "val_accuracy": accuracy, "accuracy": accuracy,
            "members_per_image": 1 + second_stage_reach, "reach": [1.0, second_stage_reach]}


def build_store(root: Path, work: Path) -> ModelStore:
    """member-a, member-b, ensemble (with member outputs), cascade over a then b, and 'flaky'
    (fails any batch holding a value >= 2: see ``poisonable_model``)."""
    store = ModelStore(root)
    work.mkdir(parents=True, exist_ok=True)
    a = store.publish(fields("member-a"), linear_model(work / "a.onnx", weights(0)))
    b = store.publish(fields("member-b"), linear_model(work / "b.onnx", weights(1)))
    store.publish(
        fields("ensemble", "ensemble", io={"input_name": "input", "output_name": "logits", "members_output_name": "member_logits"},
               composition={"members": [a.ref.model_dump(), b.ref.model_dump()], "combine": "mean_logit"}),
        ensemble_model(work / "e.onnx", [weights(0), weights(1)]),
    )
    store.publish({
        "name": "cascade", "kind": "cascade", "input": INPUT, "labels": LABELS, "metrics": {**METRICS, "members_per_image": 1.4},
        "composition": {"stages": [{"model": a.ref.model_dump(), "threshold": 0.9, "flops_per_image": 96},
                                   {"model": b.ref.model_dump(), "threshold": None, "flops_per_image": 96}],
                        "combine": "mean_prob", "confidence": "max_prob",
                        # the default, then two cheaper settings (made up, as these models' accuracy is)
                        "operating_points": [point(0.9, METRICS["accuracy"], 0.4), point(0.6, METRICS["accuracy"] - 0.02, 0.15),
                                             point(0.0, METRICS["accuracy"] - 0.05, 0.0)]},
    })
    store.publish(fields("flaky"), poisonable_model(work / "f.onnx", weights(2)))
    return store


def normalise(pixels: np.ndarray) -> np.ndarray:
    return ((pixels.astype(np.float32) / 255.0 - 0.5) / 0.25).astype(np.float32)
