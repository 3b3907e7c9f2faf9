"""What an experiment is, and which arm a request belongs to.

Assignment is sticky and stateless: the arm is a function of sha256(experiment name, key) alone,
so the same key lands on the same arm on every replica, before and after a restart, without a
lookup. Weights are relative; a key's point in [0, 1) falls into the arm whose share covers it.
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class Arm(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME)
    variant: str = Field(description="served model name")
    weight: float = Field(1.0, gt=0, description="relative share of the traffic")


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME)
    arms: list[Arm] = Field(min_length=1, max_length=8, description="A first, then B, ...; the report compares A with B")
    shadow: str | None = Field(None, description="a variant run on every request off the response path, for paired comparison")
    key_header: str = Field("X-Experiment-Key", pattern=r"^[A-Za-z0-9-]{1,64}$",
                            description="request header holding the assignment key (an HTTP header name)")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="error rate of the always-valid verdict")
    tau: float = Field(0.05, gt=0, le=1, description="mSPRT mixture scale: the accuracy differences worth detecting")
    min_samples: int = Field(30, ge=1, description="labelled requests per arm before any verdict")
    description: str = ""

    @field_validator("arms")
    @classmethod
    def _distinct(cls, arms: list[Arm]) -> list[Arm]:
        names = [a.name for a in arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be distinct, got {names}")
        return arms

    def variants(self) -> list[str]:
        return [a.variant for a in self.arms] + ([self.shadow] if self.shadow else [])

    def assign(self, key: str) -> Arm:
        """The arm of ``key``: stable across calls, processes and restarts."""
        digest = hashlib.sha256(f"{self.name}\x00{key}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") / 2**64
        total = sum(a.weight for a in self.arms)
        edge = 0.0
        for arm in self.arms:
            edge += arm.weight / total
            if point < edge:
                return arm
        return self.arms[-1]


class ExperimentsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    experiments: list[Experiment] = []


def load_experiments(path: Path) -> list[Experiment]:
    """``[[experiments]]`` tables of a TOML file (see docs/ab-testing.md)."""
    with path.open("rb") as f:
        return ExperimentsFile.model_validate(tomllib.load(f)).experiments
