"""The contract between training and serving: manifest schema and an atomic, verifiable store."""

from .manifest import (
    SCHEMA_VERSION,
    Artifact,
    CascadeStage,
    CombineRule,
    Composition,
    Confidence,
    ExportInfo,
    InputSpec,
    Kind,
    Manifest,
    Metrics,
    ModelRef,
    OperatingPoint,
    Provenance,
    TensorIO,
)
from .pareto import pareto_front
from .store import IntegrityError, ModelNotFound, ModelStore, StoreError, sha256_of

__all__ = [
    "SCHEMA_VERSION", "Artifact", "CascadeStage", "CombineRule", "Composition", "Confidence",
    "ExportInfo", "InputSpec", "Kind", "Manifest", "Metrics", "ModelRef", "OperatingPoint", "Provenance", "TensorIO",
    "IntegrityError", "ModelNotFound", "ModelStore", "StoreError", "sha256_of", "pareto_front",
]
