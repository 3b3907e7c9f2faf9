"""The manifest: everything the service needs to know about one published model version.

Training writes it, the service reads it; neither side imports the other, so this schema *is* the
contract between them. It depends on pydantic only (no torch, no onnxruntime).
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 1


class Kind(str, Enum):
    MEMBER = "member"
    ENSEMBLE = "ensemble"
    ADAPTIVE_ENSEMBLE = "adaptive_ensemble"
    STUDENT = "student"
    CASCADE = "cascade"


class CombineRule(str, Enum):
    """How an ensemble merges its members' outputs into one set of logits.

    ``mean_logit`` averages log-probabilities, i.e. the normalised geometric mean of probabilities.
    ``vote`` returns the log of the vote share (ties keep probability mass on every tied class).
    """

    MEAN_PROB = "mean_prob"
    MEAN_LOGIT = "mean_logit"
    VOTE = "vote"


class Confidence(str, Enum):
    """The score a cascade stage compares with its exit threshold (higher = more confident)."""

    MAX_PROB = "max_prob"
    MARGIN = "margin"  # top-1 minus top-2 probability
    NEG_ENTROPY = "neg_entropy"  # minus the entropy in nats

    @property
    def ceiling(self) -> float:
        """The highest value this score can take. A stage whose threshold lies above it never lets
        an image exit (manifests hold standard JSON, so "never" cannot be written as infinity)."""
        return 0.0 if self is Confidence.NEG_ENTROPY else 1.0


class _Strict(BaseModel):
    # NaN and infinities are not JSON: a manifest that needs them is a bug in its writer.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class InputSpec(_Strict):
    """How to turn a decoded image into the model's input tensor (NCHW, float32).

    The service resizes to ``height`` x ``width`` (bilinear, aspect ratio not kept: the training data
    were resized the same way), converts to ``colour_mode``, scales to [0, 1], then normalises with
    ``mean``/``std`` per channel.
    """

    channels: int = Field(ge=1, le=4)
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    colour_mode: Literal["L", "RGB"]
    mean: list[float]
    std: list[float]
    resize: Literal["bilinear"] = "bilinear"

    @model_validator(mode="after")
    def _per_channel(self) -> InputSpec:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} values each (one per channel)")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self


class TensorIO(_Strict):
    """Names of the ONNX graph's input and outputs. ``output_name`` holds logits over ``labels``;
    an ensemble's graph may also output each member's logits (batch x members x classes)."""

    input_name: str = "input"
    output_name: str = "logits"
    members_output_name: str | None = None

    @property
    def output_names(self) -> list[str]:
        """Every output of the graph, in the order it returns them."""
        return [self.output_name] + ([self.members_output_name] if self.members_output_name else [])


class Artifact(_Strict):
    """A file of the version, with the digest the service checks. ``path`` is a plain file name
    inside the version folder: no folders, no ``..``, nothing absolute, so a manifest can never
    point the service at a file outside its own version."""

    path: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=255)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class ModelRef(_Strict):
    name: str
    version: int = Field(ge=1)

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"


class CascadeStage(_Strict):
    """Stage k runs ``model`` and combines it with stages 1..k-1; an image exits when its confidence
    reaches ``threshold``. The last stage has no threshold: every image left exits there."""

    model: ModelRef
    threshold: float | None = None
    flops_per_image: float = Field(ge=0)


class OperatingPoint(_Strict):
    """One setting of a cascade's exit thresholds and what it measured (thresholds fit on validation).

    A cascade's points run from its served default (point 0) to its cheapest, so a server under load
    can trade accuracy for cost by stepping down the list without refitting anything."""

    thresholds: list[float]  # one per early stage, encoded as CascadeStage.threshold is
    tolerance: float = Field(ge=0)  # the accuracy loss against the full ensemble it was fit to allow, on validation
    val_accuracy: float
    accuracy: float  # on the test split (held out; no choice is made on it)
    members_per_image: float  # mean stages run per image, on validation
    reach: list[float]  # fraction of validation images reaching each stage (reach[0] == 1.0), one per stage


class Composition(_Strict):
    members: list[ModelRef] = []
    combine: CombineRule | None = None
    teacher: ModelRef | None = None
    stages: list[CascadeStage] = []
    confidence: Confidence | None = None
    operating_points: list[OperatingPoint] = []  # cascades only; empty: the stages' thresholds are the only setting


class Metrics(_Strict):
    """Measured on the held-out split named in ``split`` (the official test set), never on data
    used for any choice. FLOPs count 2 x multiply-adds per image (torch's FlopCounterMode)."""

    split: str = "test"
    samples: int = Field(ge=1)
    accuracy: float
    weighted_f1: float
    nll: float
    ece: float
    brier: float
    params: int = Field(ge=0)
    flops_per_image: float = Field(ge=0)
    members_per_image: float | None = None  # cascades: mean members evaluated per image
    extra: dict[str, float] = {}


class Provenance(_Strict):
    dataset: str
    train_size: int
    val_size: int
    test_size: int
    split_seed: int
    seed: int | None = None
    config: dict[str, Any] = {}
    code_version: str = "unknown"
    # How the run was set up, so that two manifests' numbers can be compared honestly.
    preset: str | None = None
    val_fraction: float | None = None
    train_limit: int | None = None
    threads: int | None = None
    libraries: dict[str, str] = {}


class ExportInfo(_Strict):
    opset: int
    parity_max_abs_diff: float
    parity_samples: int


def _check_operating_points(points: list[OperatingPoint], thresholds: list[float | None]) -> None:
    """Point 0 is what the stages serve by default, and each later point must cost no more than the
    one before, so that stepping down the list under load never makes the cascade dearer."""
    for i, p in enumerate(points):
        if len(p.thresholds) != len(thresholds) or len(p.reach) != len(thresholds) + 1:
            raise ValueError(
                f"operating_points[{i}] needs {len(thresholds)} thresholds and {len(thresholds) + 1} reach values "
                f"(one per early stage, one per stage), got {len(p.thresholds)} and {len(p.reach)}"
            )
        if i and p.members_per_image > points[i - 1].members_per_image:
            raise ValueError(
                f"operating_points[{i}] runs {p.members_per_image} members per image, more than point {i - 1}'s "
                f"{points[i - 1].members_per_image}: points go from the default down to the cheapest"
            )
    if points and points[0].thresholds != thresholds:
        raise ValueError(
            f"operating_points[0] is the served default: its thresholds {points[0].thresholds} must equal the "
            f"stages' {thresholds}"
        )


class Manifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=128)
    version: int = Field(ge=1)
    kind: Kind
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    description: str = ""
    architecture: str | None = None
    input: InputSpec
    labels: list[str] = Field(min_length=2)
    io: TensorIO | None = None
    artifact: Artifact | None = None
    export: ExportInfo | None = None
    composition: Composition = Composition()
    metrics: Metrics | None = None
    provenance: Provenance | None = None

    @model_validator(mode="after")
    def _shape_matches_kind(self) -> Manifest:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {self.schema_version} is not supported (this code reads {SCHEMA_VERSION})"
            )
        if self.kind is Kind.CASCADE:
            if not self.composition.stages:
                raise ValueError("a cascade needs at least one stage")
            if self.artifact is not None:
                raise ValueError("a cascade is composite: it has no ONNX artifact of its own")
            *early, last = self.composition.stages
            if last.threshold is not None or any(s.threshold is None for s in early):
                raise ValueError("in a cascade only the last stage has no threshold (every image left exits there)")
            _check_operating_points(self.composition.operating_points, [s.threshold for s in early])
        elif self.artifact is None or self.io is None:
            raise ValueError(f"a {self.kind.value} needs an ONNX artifact and its tensor io names")
        elif self.composition.operating_points:
            raise ValueError(f"a {self.kind.value} has no exit thresholds: operating_points are for cascades only")
        return self

    @property
    def ref(self) -> ModelRef:
        # the fields were validated with this manifest's: a hot path (every request keys by it) skips that again
        return ModelRef.model_construct(name=self.name, version=self.version)
