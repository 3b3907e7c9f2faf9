"""Where training runs: CUDA when asked for (or, with ``auto``, when present), else the CPU.

On a GPU the training images are copied to the device once per fit and batches are drawn there,
and forward passes run under bf16 autocast (no loss scaling needed, unlike fp16). Everything that
leaves training (metrics, ONNX export) goes back through the CPU.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

DeviceChoice = Literal["auto", "cpu", "cuda"]


def resolve_device(choice: DeviceChoice) -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if choice == "cuda":
        log.warning("device cuda was asked for but torch sees no CUDA device: training on the CPU")
    return torch.device("cpu")


def device_of(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision where it pays: bf16 on CUDA; nothing on the CPU (no bf16 units on this one)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
