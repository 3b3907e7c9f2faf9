"""Knowledge distillation (Hinton et al. 2015): a student learns the teacher's temperature-softened
probabilities, plus a lower-weighted cross-entropy on the true labels.

loss = T^2 * KL(teacher_T || student_T) + alpha * CE(student, labels)

The T^2 factor keeps the soft term's gradients on the same scale as the hard term's when T changes
(soft-target gradients shrink as 1/T^2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_store import InputSpec

from .inputs import normalise
from .train import LossFn


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    return temperature**2 * soft + alpha * F.cross_entropy(student_logits, labels)


def teacher_loss(
    teacher: nn.Module, teacher_images: torch.Tensor, teacher_spec: InputSpec, temperature: float, alpha: float
) -> LossFn:
    """A training loss that asks the (frozen) teacher about the same images, by index, at the
    teacher's own resolution: teacher outputs are computed batch by batch, never cached to disk."""
    teacher.eval()

    def loss(student_logits: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher(normalise(teacher_images[idx], teacher_spec))
        return distillation_loss(student_logits, teacher_logits, labels, temperature, alpha)

    return loss
