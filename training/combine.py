"""Ensembles as one ``nn.Module`` (so an ensemble exports as one ONNX graph), and the adaptive
ensemble's frozen-members-plus-linear-head model.

One fused graph matters for serving: on 2 cores, three ONNX Runtime sessions run back to back
reached a third of the throughput of the same three members fused (ARCHITECTURE.md).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model_store import CombineRule


def combine_logits(logits: torch.Tensor, rule: CombineRule) -> torch.Tensor:
    """Merge member logits (M x B x K) into ensemble logits (B x K); softmax of the result is the
    ensemble's probability. ``vote`` ties split a member's vote between the tied classes."""
    if rule is CombineRule.MEAN_PROB:
        # log(mean(softmax)) in log space: finite even where every member's probability underflows
        return torch.logsumexp(torch.log_softmax(logits, dim=-1), dim=0) - math.log(logits.shape[0])
    if rule is CombineRule.MEAN_LOGIT:
        return torch.log_softmax(logits, dim=-1).mean(dim=0)
    if rule is CombineRule.VOTE:
        top = (logits == logits.max(dim=-1, keepdim=True).values).float()
        share = (top / top.sum(dim=-1, keepdim=True)).mean(dim=0)
        return torch.log(share.clamp_min(1e-6))
    raise ValueError(f"unknown combine rule {rule!r}")


class Ensemble(nn.Module):
    def __init__(self, members: list[nn.Module], rule: CombineRule) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.rule = CombineRule(rule)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return combine_logits(self.member_logits(x), self.rule)


class WithMemberLogits(nn.Module):
    """Export view of an ensemble: combined logits and every member's logits from one pass, so the
    service can report member agreement without running the members twice. Member logits come
    batch-first: batch x members x classes."""

    def __init__(self, ensemble: Ensemble) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        members = self.ensemble.member_logits(x)
        # batch first (B x M x K), like every other output, so batches can be split along axis 0
        return combine_logits(members, self.ensemble.rule), members.transpose(0, 1)


class PooledFeatures(nn.Module):
    """Frozen members' pooled features (timm ``forward_head(..., pre_logits=True)``), concatenated."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        for p in self.members.parameters():
            p.requires_grad_(False)
        self.num_features = sum(int(m.num_features) for m in members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.forward_head(m.forward_features(x), pre_logits=True) for m in self.members], dim=1)


class AdaptiveEnsemble(nn.Module):
    """Bruno et al. 2023: concatenated pooled features of frozen weak learners -> one linear layer."""

    def __init__(self, features: PooledFeatures, head: nn.Linear) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
