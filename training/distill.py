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

from .evaluate import predict_logits
from .inputs import normalise
from .train import Batch, LossFn, to_model_size


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
    teacher: nn.Module, teacher_images: torch.Tensor, teacher_spec: InputSpec, temperature: float, alpha: float,
    consistent: bool = False,
) -> LossFn:
    """A training loss against a frozen teacher.

    Fixed teaching (default): the teacher's logits for every un-augmented training image are computed
    once, at the teacher's resolution, and looked up by index: one teacher pass in all instead of one
    per epoch. Consistent teaching (Beyer et al. 2022): the teacher sees the very view the student
    sees, augmentation included, so its logits are computed batch by batch; the student's training
    images must then be at the teacher's resolution (the student gets them downscaled)."""
    teacher.eval()
    if consistent:

        def loss(student_logits: torch.Tensor, labels: torch.Tensor, batch: Batch) -> torch.Tensor:
            with torch.no_grad():
                teacher_logits = teacher(normalise(to_model_size(batch.view, teacher_spec), teacher_spec)).float()
            return distillation_loss(student_logits, teacher_logits, labels, temperature, alpha)

        return loss
    cached = torch.from_numpy(predict_logits(teacher, teacher_images, teacher_spec))

    def cached_loss(student_logits: torch.Tensor, labels: torch.Tensor, batch: Batch) -> torch.Tensor:
        return distillation_loss(student_logits, cached[batch.idx].to(student_logits.device), labels, temperature, alpha)

    return cached_loss
