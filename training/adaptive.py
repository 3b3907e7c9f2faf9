"""The adaptive ensemble's combination layer (Bruno et al. 2023).

Weak learners are trained elsewhere (each overfits its own disjoint subset) and frozen; here their
pooled features are computed once, and a linear layer is trained on them with AdaBelief (timm:
lr 5e-4, eps 1e-16, decoupled weight decay, no rectification), early stopping on validation
weighted F1 with patience 10. The head is trained from several seeds; the best on validation wins.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from sklearn.metrics import f1_score
from timm.optim import create_optimizer_v2
from torch import nn
from tqdm.auto import tqdm

from model_store import InputSpec

from .combine import PooledFeatures
from .evaluate import forward_batched
from .inputs import Images


class HeadConfig(BaseModel):
    lr: float = Field(5e-4, gt=0)
    eps: float = Field(1e-16, gt=0)
    weight_decay: float = Field(1e-4, ge=0, description="decoupled (AdamW-style) weight decay")
    batch_size: int = Field(256, ge=1)
    max_epochs: int = Field(100, ge=1)
    patience: int = Field(10, ge=1, description="epochs without a better validation weighted F1")
    seeds: int = Field(5, ge=1, description="heads trained from different seeds; the best on validation is kept")


@dataclass(frozen=True)
class HeadResult:
    head: nn.Linear
    seed: int
    val_weighted_f1: float
    epochs_run: int


def pooled_features(features: PooledFeatures, images: Images, spec: InputSpec, batch_size: int = 1024) -> torch.Tensor:
    return forward_batched(features, images.x, spec, batch_size)


def weighted_f1(head: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        predicted = head(x).argmax(-1).numpy()
    return float(f1_score(y.numpy(), predicted, average="weighted", zero_division=0))


def train_head(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
               num_classes: int, config: HeadConfig, seed: int) -> HeadResult:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(train_x.shape[1], num_classes)
    optimizer = create_optimizer_v2(
        head, "adabelief", lr=config.lr, eps=config.eps, betas=(0.9, 0.999), weight_decay=config.weight_decay,
        decoupled_decay=True, rectify=False,
    )
    best_f1, best_state, best_epoch, epoch = -1.0, copy.deepcopy(head.state_dict()), 0, 0
    for epoch in range(1, config.max_epochs + 1):
        for idx in torch.randperm(len(train_y), generator=generator).split(config.batch_size):
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        f1 = weighted_f1(head, val_x, val_y)
        if f1 > best_f1:
            best_f1, best_state, best_epoch = f1, copy.deepcopy(head.state_dict()), epoch
        elif epoch - best_epoch >= config.patience:
            break
    head.load_state_dict(best_state)
    return HeadResult(head, seed, best_f1, epoch)


def fit_combination_head(features: PooledFeatures, train: Images, val: Images, spec: InputSpec,
                         num_classes: int, config: HeadConfig, first_seed: int = 0) -> HeadResult:
    """Train heads from ``config.seeds`` seeds on frozen features; return the best on validation."""
    train_x, val_x = pooled_features(features, train, spec), pooled_features(features, val, spec)
    return fit_head_on_features(train_x, train.y, val_x, val.y, num_classes, config, first_seed)


def fit_head_on_features(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                         num_classes: int, config: HeadConfig, first_seed: int = 0) -> HeadResult:
    """``fit_combination_head`` on features already computed (the pipeline keeps each learner's
    pooled features per split, and derives the learners' own logits from them)."""
    results = []
    for seed in tqdm(range(first_seed, first_seed + config.seeds), desc="adaptive head seeds", unit="seed", disable=None):
        result = train_head(train_x, train_y, val_x, val_y, num_classes, config, seed)
        tqdm.write(f"head seed {seed}: val weighted F1 {result.val_weighted_f1:.4f} after {result.epochs_run} epochs")
        results.append(result)
    return max(results, key=lambda r: r.val_weighted_f1)

