"""What an experiment is, and which arm a request belongs to.

Assignment is sticky and stateless: the arm is a function of sha256(experiment name, run id, key)
alone, so the same key lands on the same arm on every replica, before and after a restart, without
a lookup; a new run of the experiment draws afresh (no carry-over from the last run's split). Weights are relative; a key's point in [0, 1) falls into the arm whose share covers it.
Whether a key's requests are recorded at all (``record_rate``) is a second hash of the key, salted
differently, so sampling is independent of the arm and keeps every key's requests together (the
key is the unit of analysis).
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# Headers that carry credentials: an assignment key read from one would be stored in the state
# database and make a user's credential a statistic.
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"})


def _point(*parts: str) -> float:
    """A uniform point in [0, 1) from a hash of ``parts``."""
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


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
    # the bounds are the settings the A/A matrix checks (docs/ab-testing.md): outside them the verdict's
    # error rate is not measured (tau 1, min_samples 1, min_keys 2 gave up to 12 % false verdicts before)
    tau: float = Field(0.05, ge=0.01, le=0.2, description="mixture scale of the confidence sequence: the accuracy differences worth detecting")
    min_samples: int = Field(30, ge=30, description="labelled requests per arm before any verdict")
    min_keys: int = Field(10, ge=10, description="distinct assignment keys (users) per arm before any verdict")
    record_rate: float = Field(1.0, gt=0, le=1, description=(
        "share of assignment keys whose requests are recorded (and can take feedback); "
        "sampled by key, independently of the arm"))
    description: str = ""

    @field_validator("key_header")
    @classmethod
    def _not_a_credential(cls, header: str) -> str:
        if header.lower() in CREDENTIAL_HEADERS:
            raise ValueError(f"key_header may not name a credential header ({header}); use e.g. X-Experiment-Key")
        return header

    @field_validator("arms")
    @classmethod
    def _distinct(cls, arms: list[Arm]) -> list[Arm]:
        names = [a.name for a in arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be distinct, got {names}")
        return arms

    def variants(self) -> list[str]:
        return [a.variant for a in self.arms] + ([self.shadow] if self.shadow else [])

    def assign(self, key: str, run_id: str = "") -> Arm:
        """The arm of ``key`` in the run ``run_id``: stable across calls, processes and restarts."""
        point = _point(self.name, run_id, key) if run_id else _point(self.name, key)
        total = sum(a.weight for a in self.arms)
        edge = 0.0
        for arm in self.arms:
            edge += arm.weight / total
            if point < edge:
                return arm
        return self.arms[-1]

    def records(self, key: str, run_id: str = "") -> bool:
        """Whether requests of ``key`` are recorded (``record_rate``): all of a key's or none."""
        return self.record_rate >= 1 or _point(self.name, run_id, "record", key) < self.record_rate


class ExperimentsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    experiments: list[Experiment] = []


def load_experiments(path: Path) -> list[Experiment]:
    """``[[experiments]]`` tables of a TOML file (see docs/ab-testing.md)."""
    with path.open("rb") as f:
        return ExperimentsFile.model_validate(tomllib.load(f)).experiments
