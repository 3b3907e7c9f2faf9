"""One training loop for members, weak learners, students and their twins.

Batches are drawn by index from in-memory uint8 tensors, so a loss that needs more about the same
images (a distillation teacher's cached outputs) can look it up by the same indices; the loss also
gets the augmented view itself, so a teacher can see exactly what the student sees. Training
images may be larger than the model's input: each (augmented) batch is then resized to the model's
size, which lets a small student learn from downscaled copies of its teacher's views. The best
epoch on validation is restored at the end (early stopping with patience).
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from timm.optim import create_optimizer_v2
from torch import nn
from tqdm.auto import tqdm

from model_store import InputSpec

from .device import autocast, device_of
from .evaluate import classification_metrics, predict_logits, softmax
from .inputs import Images, normalise



@dataclass(frozen=True)
class Batch:
    """One training batch as the loss sees it: indices into the training images, and the augmented
    view (float pixels 0-255, at the training images' resolution, before any resize to the model)."""

    idx: torch.Tensor
    view: torch.Tensor


# (logits, labels, batch) -> scalar loss
LossFn = Callable[[torch.Tensor, torch.Tensor, Batch], torch.Tensor]


class TrainConfig(BaseModel):
    epochs: float = Field(
        6, gt=0, description="maximum epochs; a fraction trains the last epoch on that share of a fresh shuffle "
        "(0.5: half the images, each seen at most once)",
    )
    # 256 with a sqrt(2)-scaled peak rate: 2-7 % more images/s than 128 on this CPU (docs/benchmarks.md);
    # short runs learn more per epoch at 128 (the quick preset uses it, docs/experiments.md).
    batch_size: int = Field(256, ge=1)
    lr: float = Field(4e-3, gt=0, description="peak learning rate (one-cycle schedule)")
    weight_decay: float = Field(5e-4, ge=0)
    optimizer: str = Field("adamw", description="any timm optimizer name")
    patience: int = Field(2, ge=1, description="epochs without validation improvement before stopping")
    monitor: Literal["val_loss", "val_accuracy"] = "val_loss"
    augment: bool = Field(True, description="random horizontal flips and +-2 px shifts, drawn per image")
    early_stop: bool = Field(True, description="stop on validation and restore the best epoch; off: keep the last epoch")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="of the hard-label cross-entropy (members, weak learners, twins)")
    warmup: float = Field(0.3, gt=0, lt=1, description="share of the steps the one-cycle schedule spends rising to the peak rate")


@dataclass
class FitResult:
    best_epoch: int
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    # the returned model's logits on the validation split, when the fit computed them (so the
    # pipeline does not run the model over validation again)
    val_logits: np.ndarray | None = None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, _: Batch) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def smoothed_cross_entropy(label_smoothing: float) -> LossFn:
    def loss(logits: torch.Tensor, labels: torch.Tensor, _: Batch) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)

    return loss


SHIFT = 2


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image: a horizontal flip with probability 1/2 and a shift of up to 2 px each way (zero padded)."""
    n, c, h, w = x.shape
    # Draws come from the (CPU) generator, so a run is reproducible on any device.
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    dy, dx = torch.randint(0, 2 * SHIFT + 1, (2, n), generator=generator).to(x.device)
    padded = F.pad(x, (SHIFT, SHIFT, SHIFT, SHIFT))
    at = functools.partial(torch.arange, device=x.device)
    rows = (dy[:, None] + at(h))[:, None, :, None]
    cols = (dx[:, None] + at(w))[:, None, None, :]
    return padded[at(n)[:, None, None, None], at(c)[None, :, None, None], rows, cols]


def to_model_size(view: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Resize a float batch to the model's input size (antialiased bilinear, as the data is prepared)."""
    if view.shape[-2:] == (spec.height, spec.width):
        return view
    return F.interpolate(view, size=(spec.height, spec.width), mode="bilinear", align_corners=False, antialias=True)


def fit(
    model: nn.Module,
    train: Images,
    val: Images,
    spec: InputSpec,
    config: TrainConfig,
    seed: int,
    loss_fn: LossFn = cross_entropy,
    desc: str = "train",
) -> FitResult:
    """Train ``model`` for ``config.epochs`` (possibly fractional) epochs with a one-cycle schedule.

    ``loss_fn`` cross_entropy (the default) is replaced by the label-smoothed one when
    ``config.label_smoothing`` is set; a custom loss (distillation) is used as given."""
    if loss_fn is cross_entropy and config.label_smoothing:
        loss_fn = smoothed_cross_entropy(config.label_smoothing)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    device = device_of(model)
    images, labels = train.x.to(device), train.y.to(device)  # once per fit: batches are drawn on the device
    optimizer = create_optimizer_v2(model, config.optimizer, lr=config.lr, weight_decay=config.weight_decay)
    # images per epoch: every one in full epochs, a share of a fresh shuffle in a fractional last one
    epoch_sizes = [len(train)] * math.floor(config.epochs)
    if config.epochs % 1:
        epoch_sizes.append(max(1, round(len(train) * (config.epochs % 1))))
    steps = sum(math.ceil(n / config.batch_size) for n in epoch_sizes)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps, pct_start=config.warmup)
    best: tuple[float, int, dict, np.ndarray] | None = None
    history: list[dict[str, float]] = []
    epoch, last_val_logits = 0, None
    epochs = len(epoch_sizes)
    for epoch, size in enumerate(epoch_sizes, 1):
        model.train()
        order = torch.randperm(len(train), generator=generator)[:size]
        total = 0.0
        bar = tqdm(order.split(config.batch_size), desc=f"{desc} epoch {epoch}/{epochs}", leave=False, unit="batch", disable=None)
        for idx in bar:
            on_device = idx.to(device)
            view = images[on_device].float()
            if config.augment:
                view = augment_batch(view, generator)
            with autocast(device):
                loss = loss_fn(model(normalise(to_model_size(view, spec), spec)).float(), labels[on_device], Batch(idx, view))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        if not config.early_stop and epoch < epochs:
            # Nothing is chosen on validation mid-run: skip the pass (a fifth of a short epoch here).
            history.append({"epoch": epoch, "train_loss": total / size})
            tqdm.write(f"{desc} epoch {epoch}: train loss {total / size:.4f}")
            continue
        last_val_logits = predict_logits(model, val.x, spec)
        scores = validation_scores(last_val_logits, val)
        history.append({"epoch": epoch, "train_loss": total / size, **scores})
        tqdm.write(f"{desc} epoch {epoch}: train loss {total / size:.4f}, val loss {scores['val_loss']:.4f}, val acc {scores['val_accuracy']:.4f}")
        if not config.early_stop:
            continue
        score = scores["val_loss"] if config.monitor == "val_loss" else -scores["val_accuracy"]
        if best is None or score < best[0]:
            best = (score, epoch, copy.deepcopy(model.state_dict()), last_val_logits)
        elif epoch - best[1] >= config.patience:
            break
    if best is not None:
        model.load_state_dict(best[2])
        last_val_logits = best[3]
    model.eval()
    return FitResult(best_epoch=best[1] if best else epoch, epochs_run=epoch, history=history, val_logits=last_val_logits)


def validation_scores(logits: np.ndarray, val: Images) -> dict[str, float]:
    metrics = classification_metrics(softmax(logits), val.y.numpy())
    return {"val_loss": metrics["nll"], "val_accuracy": metrics["accuracy"], "val_weighted_f1": metrics["weighted_f1"]}

