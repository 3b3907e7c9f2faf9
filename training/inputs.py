"""From uint8 images to model inputs, exactly as the manifest's ``InputSpec`` tells the service to.

Training, evaluation and the export parity check all go through ``normalise`` so that what the
service computes from a manifest is what the model saw in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from model_store import InputSpec


@dataclass(frozen=True)
class Images:
    """uint8 images (N x C x H x W, already at the model's resolution) and their labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: np.ndarray) -> Images:
        idx = torch.from_numpy(indices)
        return Images(self.x[idx], self.y[idx])


def resize_uint8(images: np.ndarray, size: int) -> torch.Tensor:
    """Bilinear resize (antialiased when shrinking, like PIL), rounded back to uint8."""
    tensor = torch.from_numpy(images)
    if images.shape[-1] == size and images.shape[-2] == size:
        return tensor.clone()
    out = []
    for chunk in tensor.split(4096):
        resized = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(resized.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def as_images(images: np.ndarray, labels: np.ndarray, size: int) -> Images:
    return Images(resize_uint8(images, size), torch.from_numpy(labels))


def input_spec(channels: int, size: int, mean: list[float], std: list[float]) -> InputSpec:
    return InputSpec(channels=channels, height=size, width=size, colour_mode="L" if channels == 1 else "RGB", mean=mean, std=std)


def normalise(batch: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 (or float 0-255) pixels -> the model's normalised float input."""
    mean = torch.tensor(spec.mean, device=batch.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=batch.device).view(1, -1, 1, 1)
    return (batch.float() / 255.0 - mean) / std
