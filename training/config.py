"""Typed configuration of a training run.

Layers, each overriding the one before: the class defaults below, a named preset
(``training/presets/<name>.toml``: ``quick``, the default, or ``full``), the user's TOML file, then
CLI flags. The preset's name is recorded in every manifest."""

from __future__ import annotations

import tomllib
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from model_store import CombineRule, Confidence

from .adaptive import HeadConfig
from .device import DeviceChoice

from .members import CNET
from .train import TrainConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    dataset: str = Field("fashion_mnist", description="fashion_mnist, mnist, digits, cifar10, cifar100 or image_folder")
    data_dir: Path | None = Field(None, description="where the data set's files are (each loader has a default)")
    download: bool = Field(False, description="let torchvision download CIFAR (needs internet)")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="class-stratified share of train held out for validation")
    split_seed: int = 0
    train_limit: int = Field(
        20_000, ge=0, description="train on a class-stratified subset of this size (0: all of it); test is always complete"
    )


class MembersConfig(_Section):
    count: int = Field(3, ge=1, description="members per ensemble (same architecture, different seeds)")
    arch: str = Field(CNET, description="committee_cnet or any timm model name")
    phi: float = Field(0.0, description="compound-scaling coefficient (committee_cnet only)")
    first_seed: int = 0
    # No augmentation by default: even at ten epochs over 20,000 images flips and shifts cost a member
    # 0.6 pt of validation accuracy (docs/experiments.md, "Full preset: augmentation"); members still
    # differ by seed.
    train: TrainConfig = TrainConfig(augment=False)


class EnsembleConfig(_Section):
    rules: list[CombineRule] = [CombineRule.MEAN_PROB, CombineRule.MEAN_LOGIT, CombineRule.VOTE]


class BaselineConfig(_Section):
    """One compound-scaled single model set against the ensemble at about its FLOPs, trained with the
    members' budget (Wang et al. 2022). committee_cnet at phi=1 costs 57.8 MFLOPs per image, 2.78x one
    phi=0 member (20.8) and 0.93x the three of them (measured by FlopCounterMode, members.py)."""

    enabled: bool = True
    arch: str = CNET
    phi: float = 1.0
    seed: int = 300
    train: TrainConfig | None = Field(None, description="unset: the members' own training settings (the same budget)")


class AdaptiveConfig(_Section):
    enabled: bool = True
    learners: int = Field(2, ge=2, description="weak learners, each on its own disjoint class-stratified subset")
    arch: str = CNET
    phi: float = 0.0
    first_seed: int = 100
    train: TrainConfig = TrainConfig(epochs=12, augment=False, early_stop=False)
    head: HeadConfig = HeadConfig()
    head_data: Literal["all", "held_out"] = Field(
        "all",
        description="all: the head trains on the learners' own training images (features they memorised, as in the paper); "
        "held_out: a class-stratified share no learner sees is kept for the head (out-of-fold features)",
    )
    head_fraction: float = Field(0.2, gt=0, lt=1, description="share of train kept for the head when head_data = held_out")


class CascadeConfig(_Section):
    enabled: bool = True
    confidence: Confidence = Confidence.MAX_PROB
    tolerance: float = Field(0.002, ge=0, description="accuracy the cascade may lose against the full ensemble on validation")
    margin_z: float = Field(
        1.645, ge=0, description="standard errors of margin on that loss (paired, McNemar); 0: the plain measured loss"
    )
    operating_tolerances: list[float] = Field(
        [0.005, 0.01, 0.02, 0.05, 0.1, 1.0],
        description="looser tolerances, increasing, for the cheaper operating points a server may step down to under load "
        "(those above tolerance; each kept if it runs fewer members per image on validation); 1.0: every image exits at stage 1",
    )

    @field_validator("operating_tolerances")
    @classmethod
    def _increasing_fractions(cls, values: list[float]) -> list[float]:
        if any(not 0 <= v <= 1 for v in values) or any(a >= b for a, b in zip(values, values[1:])):
            raise ValueError(f"operating_tolerances must be strictly increasing accuracy losses in [0, 1], got {values}")
        return values


class StudentConfig(_Section):
    enabled: bool = True
    arch: str = CNET
    phi: float = Field(-2.0, description="compound-scaling coefficient of the student (smaller than the members)")
    teacher: Literal["ensemble", "adaptive"] = Field("ensemble", description="mean-prob ensemble of the members, or the adaptive ensemble")
    # T=2, alpha=0.5 and 12 epochs were chosen on validation accuracy (docs/training-results.md): at
    # 6 epochs no setting beat the hard-label twin; at 12 the twin overfits and distillation does not.
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, description="weight of the hard-label cross-entropy (the soft term has weight 1, times T^2)")
    seed: int = 200
    consistent: bool = Field(
        False, description="consistent teaching (Beyer et al. 2022): the teacher sees the student's augmented view, batch by batch; "
        "off: the teacher's outputs on un-augmented images are computed once"
    )
    train: TrainConfig = TrainConfig(augment=False, epochs=12, patience=3)
    undistilled_twin: bool = Field(True, description="also train the same student on hard labels only, same budget")


class PipelineConfig(_Section):
    preset: str = Field("custom", description="the preset this configuration started from (recorded in every manifest)")
    run_name: str = Field("fmnist", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="prefix of every published model name")
    threads: int = Field(2, ge=1, description="torch intra-op threads")
    device: DeviceChoice = Field("auto", description="auto: CUDA when torch sees a GPU, else the CPU; cuda falls back to the CPU with a log line")
    seed: int = Field(0, ge=0, description="run seed: added (x1000) to every model's seed, to repeat a run with fresh initialisations and data orders")
    parity_samples: int = Field(256, ge=1, description="test images used for the ONNX-vs-PyTorch parity check")
    data: DataConfig = DataConfig()
    members: MembersConfig = MembersConfig()
    ensembles: EnsembleConfig = EnsembleConfig()
    baseline: BaselineConfig = BaselineConfig()
    adaptive: AdaptiveConfig = AdaptiveConfig()
    cascade: CascadeConfig = CascadeConfig()
    student: StudentConfig = StudentConfig()


PRESETS = ("quick", "full")


def preset_values(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return tomllib.loads(files("training").joinpath("presets", f"{name}.toml").read_text())


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update: tables merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: Path | None, preset: str | None = "quick") -> PipelineConfig:
    """The preset (None: only the class defaults), then the TOML file at ``path`` over it."""
    values = {**preset_values(preset), "preset": preset} if preset else {}
    if path is not None:
        with path.open("rb") as f:
            values = merge(values, tomllib.load(f))
    return PipelineConfig.model_validate(values)
