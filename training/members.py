"""Member architectures: any timm model by name, plus ``committee_cnet``, a compound-scaled family
for small images.

timm's ImageNet models reduce a 28-32 px input to 1x1 long before their last stage, so for the
small-image data sets here we register our own family in timm's registry: it has timm's uniform
interface (``forward_features`` / ``forward_head(pre_logits=...)``, ``num_features``), which is all
the ensemble, the adaptive head and the student code rely on.

Compound scaling (EfficientNet, Tan & Le 2019): one coefficient phi scales depth by alpha**phi,
width by beta**phi and input resolution by gamma**phi, with alpha=1.2, beta=1.1, gamma=1.15
(alpha * beta**2 * gamma**2 ~ 1.92 is the textbook FLOPs factor per +1 of phi). At these small
widths and depths the rounding dominates it: channels are rounded to multiples of 8 and block
counts up to whole blocks, so the measured factor (torch's FlopCounterMode, 2 x multiply-adds per
image, 1 x 28 x 28 input) is uneven: phi=-2 (21 px) 11.7 MFLOPs, -1 (24 px) 12.2, 0 (28 px) 20.8,
1 (32 px) 57.8 (2.78x phi=0; 0.93x three phi=0 members), 2 (37 px) 113.2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import timm
import torch
from timm.layers import make_divisible
from timm.models import register_model
from torch import nn

ALPHA, BETA, GAMMA = 1.2, 1.1, 1.15
CNET = "committee_cnet"

# (channels, blocks, stride) per stage at phi = 0: 28 px -> stem 28 -> 14 -> 7 -> 7.
# Only the stem (one input channel, so cheap) runs at full resolution; the first stage downsamples.
# On 2 CPU cores a residual stage at 28 x 28 cost more time than its share of the FLOPs (memory-bound
# batch norm and ReLU); without it a member trains 1.3x faster at the same validation accuracy
# (docs/experiments.md, "Member architecture").
_BASE_STAGES = ((24, 1, 2), (48, 1, 2), (64, 2, 1))
_BASE_STEM = 16


@dataclass(frozen=True)
class CompoundScale:
    phi: float

    @property
    def depth(self) -> float:
        return ALPHA**self.phi

    @property
    def width(self) -> float:
        return BETA**self.phi

    @property
    def resolution(self) -> float:
        return GAMMA**self.phi

    def channels(self, base: int) -> int:
        return make_divisible(base * self.width, 8)

    def blocks(self, base: int) -> int:
        return max(1, math.ceil(base * self.depth))

    def image_size(self, base: int) -> int:
        return max(4, round(base * self.resolution))


class _ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with a projection shortcut where the shape changes (ResNet basic block)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and in_ch == out_ch
            else nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class CompactNet(nn.Module):
    """Small residual CNN scaled by one compound coefficient; timm-style two-halves interface."""

    def __init__(
        self, phi: float = 0.0, num_classes: int = 10, in_chans: int = 1, drop_rate: float = 0.0,
        stages: tuple[tuple[int, int, int], ...] = _BASE_STAGES, **_: object,
    ) -> None:
        """``stages``: (channels, blocks, stride) per stage at phi = 0, before scaling."""
        super().__init__()
        scale = CompoundScale(phi)
        stem = scale.channels(_BASE_STEM)
        self.stem = nn.Sequential(nn.Conv2d(in_chans, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        in_ch = stem
        for base_ch, base_blocks, stride in stages:
            out_ch = scale.channels(base_ch)
            for i in range(scale.blocks(base_blocks)):
                blocks.append(_ResidualBlock(in_ch, out_ch, stride if i == 0 else 1))
                in_ch = out_ch
        self.stages = nn.Sequential(*blocks)
        self.num_features = in_ch
        self.num_classes = num_classes
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_ch, num_classes)

    def get_classifier(self) -> nn.Module:
        """timm's name for the layer that maps pooled features to logits (in eval mode, dropout is off)."""
        return self.fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.fc(self.drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def committee_cnet(pretrained: bool = False, **kwargs: object) -> CompactNet:
    if pretrained:
        raise ValueError("committee_cnet has no pretrained weights (nothing is ever downloaded)")
    return CompactNet(**kwargs)  # type: ignore[arg-type]


def image_size_for(arch: str, phi: float, base_size: int) -> int:
    """Input side length a member is trained and served at: scaled by gamma**phi for the compound
    family, the data set's own size for any other timm model."""
    return CompoundScale(phi).image_size(base_size) if arch == CNET else base_size


def build_member(arch: str, num_classes: int, in_chans: int, phi: float = 0.0, drop_rate: float = 0.0) -> nn.Module:
    """A freshly initialised member. Weights are never downloaded (``pretrained=False``).

    Channels-last memory format: oneDNN's convolutions train 1.14x (batch 128) to 1.4x (batch 256)
    faster on this CPU (docs/benchmarks.md, docs/experiments.md); ONNX export does not see the layout."""
    kwargs: dict[str, object] = {"num_classes": num_classes, "in_chans": in_chans, "drop_rate": drop_rate}
    if arch == CNET:
        kwargs["phi"] = phi
    elif phi:
        raise ValueError(f"phi (compound scaling) applies to {CNET} only, not {arch!r}")
    return timm.create_model(arch, pretrained=False, **kwargs).to(memory_format=torch.channels_last)
