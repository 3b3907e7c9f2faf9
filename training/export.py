"""ONNX export with a dynamic batch axis, the ONNX checker, and a parity check against PyTorch.

The parity check runs ONNX Runtime on real test images and fails the export when any logit differs
from PyTorch's by more than ``PARITY_TOLERANCE``: a graph that silently computes something else
must never reach the store.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from model_store import ExportInfo, InputSpec, TensorIO

from .combine import Ensemble, WithMemberLogits
from .device import device_of
from .evaluate import predict_logits
from .inputs import normalise

OPSET = 17
PARITY_TOLERANCE = 1e-3
IO = TensorIO(input_name="input", output_name="logits")
ENSEMBLE_IO = TensorIO(input_name="input", output_name="logits", members_output_name="member_logits")


class ExportParityError(RuntimeError):
    pass


@dataclass(frozen=True)
class Exported:
    path: Path
    info: ExportInfo
    io: TensorIO


def graph_view(model: nn.Module) -> tuple[nn.Module, TensorIO]:
    """What to trace, and the io names it will have: ensembles also expose member logits."""
    if isinstance(model, Ensemble):
        return WithMemberLogits(model), ENSEMBLE_IO
    return model, IO


def export_onnx(model: nn.Module, spec: InputSpec, path: Path, parity_images: torch.Tensor) -> Exported:
    if device_of(model).type != "cpu":
        model = copy.deepcopy(model).cpu()  # the graph is traced, and checked against ONNX Runtime, on the CPU
    model.eval()
    graph, io = graph_view(model)
    dummy = torch.zeros(2, spec.channels, spec.height, spec.width)
    with warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose: < 1 s per model and no onnxscript dependency.
        warnings.simplefilter("ignore", DeprecationWarning)
        _export(graph, dummy, path, io)
    onnx.checker.check_model(str(path), full_check=True)
    diff = parity_max_abs_diff(model, spec, path, parity_images)
    if not diff <= PARITY_TOLERANCE:
        raise ExportParityError(f"{path}: ONNX Runtime differs from PyTorch by {diff:.3g} > {PARITY_TOLERANCE} in some logit")
    return Exported(path, ExportInfo(opset=OPSET, parity_max_abs_diff=diff, parity_samples=len(parity_images)), io)


def _export(model: nn.Module, dummy: torch.Tensor, path: Path, io: TensorIO) -> None:
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=[io.input_name],
        output_names=io.output_names,
        dynamic_axes={name: {0: "batch"} for name in (io.input_name, *io.output_names)},
        opset_version=OPSET,
        dynamo=False,
    )


def parity_max_abs_diff(model: nn.Module, spec: InputSpec, path: Path, images: torch.Tensor) -> float:
    import onnxruntime as ort

    expected = predict_logits(model, images, spec)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # torch's pool is busy in this process; don't make them fight
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    actual = session.run([IO.output_name], {IO.input_name: normalise(images, spec).numpy()})[0]
    return float(np.abs(actual - expected).max())
