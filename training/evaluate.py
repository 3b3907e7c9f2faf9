"""Metrics on held-out data (accuracy, weighted F1, NLL, ECE, Brier), FLOPs and parameter counts.

The metric functions take probabilities, not models, so ensembles, cascades (whose per-image
prediction mixes stages) and single models are all scored by the same code.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from model_store import InputSpec

from .device import autocast, device_of
from .inputs import normalise

ECE_BINS = 15


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Confidence-vs-accuracy gap averaged over equal-width confidence bins, weighted by bin size."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    probs = probs.astype(np.float64)
    n, k = probs.shape
    onehot = np.eye(k)[labels]
    predicted = probs.argmax(axis=1)
    return {
        "accuracy": float((predicted == labels).mean()),
        "weighted_f1": float(f1_score(labels, predicted, average="weighted", labels=np.arange(k), zero_division=0)),
        "nll": float(-np.log(np.clip(probs[np.arange(n), labels], 1e-12, None)).mean()),
        "ece": expected_calibration_error(probs, labels),
        "brier": float(((probs - onehot) ** 2).sum(axis=1).mean()),
    }


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


@torch.inference_mode()
def forward_batched(model: nn.Module, images: torch.Tensor, spec: InputSpec, batch_size: int = 256) -> torch.Tensor:
    """A model's outputs for uint8 images, batch by batch on the model's device, gathered on the CPU."""
    model.eval()
    device = device_of(model)
    with autocast(device):
        out = [model(normalise(chunk.to(device), spec)).float().cpu() for chunk in images.split(batch_size)]
    return torch.cat(out)


def predict_logits(model: nn.Module, images: torch.Tensor, spec: InputSpec, batch_size: int = 256) -> np.ndarray:
    return forward_batched(model, images, spec, batch_size).numpy()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def flops_per_image(model: nn.Module, spec: InputSpec) -> float:
    """FLOPs for one image as torch counts them: 2 x multiply-adds of convs and matmuls."""
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, spec.channels, spec.height, spec.width, device=device_of(model)))
    return float(counter.get_total_flops())
