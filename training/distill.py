"""Knowledge distillation (Hinton et al. 2015): a student learns the teacher's temperature-softened
probabilities, plus a lower-weighted cross-entropy on the true labels.

loss = T^2 * KL(teacher_T || student_T) + alpha * CE(student, labels)

The T^2 factor keeps the soft term's gradients on the same scale as the hard term's when T changes
(soft-target gradients shrink as 1/T^2).

A mean-prob ensemble teaches as Hinton et al. describe for an ensemble: its soft targets are the mean
of each member's temperature-softened probabilities, mean_i softmax(z_i / T), not the ensemble's
averaged probability softened again (softmax(log mean_i softmax(z_i) / T), which is the averaged
probability raised to 1/T and renormalised; the two agree only at T = 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model_store import CombineRule, InputSpec

from .combine import Ensemble
from .device import device_of
from .inputs import normalise
from .train import Batch, LossFn, to_model_size


def soft_targets(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log of the teacher's temperature-softened probabilities (B x K). ``teacher_logits`` B x K: one
    model, log_softmax(z / T); M x B x K: a mean-prob ensemble's members, log mean_i softmax(z_i / T)."""
    if teacher_logits.dim() == 3:
        return torch.logsumexp(F.log_softmax(teacher_logits / temperature, dim=-1), dim=0) - math.log(teacher_logits.shape[0])
    return F.log_softmax(teacher_logits / temperature, dim=-1)


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    """``teacher_logits``: B x K, or M x B x K for a mean-prob ensemble's members (``soft_targets``)."""
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        soft_targets(teacher_logits, temperature),
        log_target=True,
        reduction="batchmean",
    )
    return temperature**2 * soft + alpha * F.cross_entropy(student_logits, labels)


def teaching_logits(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a teacher hands ``soft_targets``: a mean-prob ensemble's member logits (M x B x K), any
    other model's logits (B x K)."""
    if isinstance(teacher, Ensemble) and teacher.rule is CombineRule.MEAN_PROB:
        return teacher.member_logits(x)
    return teacher(x)


def teacher_loss(
    teacher: nn.Module, teacher_images: torch.Tensor, teacher_spec: InputSpec, temperature: float, alpha: float,
    consistent: bool = False, cached: torch.Tensor | None = None,
) -> LossFn:
    """A training loss against a frozen teacher.

    Fixed teaching (default): the teacher's logits for each un-augmented training image are computed
    once, at the teacher's resolution, the first time a batch needs them, and looked up by index
    afterwards: at most one teacher pass in all instead of one per epoch. Consistent teaching (Beyer et al. 2022): the teacher sees the very view the student
    sees, augmentation included, so its logits are computed batch by batch; the student's training
    images must then be at the teacher's resolution (the student gets them downscaled).

    ``cached``: the teacher's ``teaching_logits`` on ``teacher_images`` when the caller already has
    them (the pipeline keeps every member's logits per split), so fixed teaching runs no teacher pass."""
    teacher.eval()
    if consistent:

        def loss(student_logits: torch.Tensor, labels: torch.Tensor, batch: Batch) -> torch.Tensor:
            with torch.no_grad():
                teacher_logits = teaching_logits(teacher, normalise(to_model_size(batch.view, teacher_spec), teacher_spec)).float()
            return distillation_loss(student_logits, teacher_logits, labels, temperature, alpha)

        return loss
    if cached is not None:
        table: torch.Tensor | None = cached
        known = torch.ones(len(teacher_images), dtype=torch.bool)
    else:  # filled batch by batch: a student trained for a fraction of an epoch costs that fraction of a teacher pass
        table, known = None, torch.zeros(len(teacher_images), dtype=torch.bool)

    def cached_loss(student_logits: torch.Tensor, labels: torch.Tensor, batch: Batch) -> torch.Tensor:
        nonlocal table
        idx = batch.idx.cpu()
        missing = idx[~known[idx]]
        if len(missing):
            with torch.no_grad():
                fresh = teaching_logits(teacher, normalise(teacher_images[missing].to(device_of(teacher)), teacher_spec)).float().cpu()
            if table is None:
                table = torch.empty((*fresh.shape[:-2], len(teacher_images), fresh.shape[-1]))
            table[..., missing, :] = fresh
            known[missing] = True
        picked = table[..., idx, :]
        return distillation_loss(student_logits, picked.to(student_logits.device), labels, temperature, alpha)

    return cached_loss
