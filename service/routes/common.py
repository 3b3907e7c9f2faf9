"""What every router needs: the app's data plane and the per-variant tensor outputs."""

from __future__ import annotations

import hmac
from typing import Annotated

import numpy as np
from fastapi import Path, Request
from pydantic import SecretStr

from model_store import Kind

from ..dataplane import DataPlane, Prediction, Variant, input_name, softmax
from ..errors import BadRequest, Unauthorized
from ..protocol import ErrorResponse, TensorMetadata


# Versions are integers >= 1 (the store's contract); the schema says so, so clients never send others.
Version = Annotated[int, Path(ge=1, le=2**31 - 1, description="model version (an integer >= 1)")]


def error_responses(*codes: int) -> dict[int | str, dict]:
    """OpenAPI ``responses`` for routes whose errors are ``{"error": ...}`` bodies."""
    return {code: {"model": ErrorResponse} for code in codes}


def plane(request: Request) -> DataPlane:
    return request.app.state.plane


def require_bearer(request: Request, token: SecretStr) -> None:
    """401 unless the request carries ``Authorization: Bearer <token>`` (compared in constant time)."""
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token.get_secret_value()}".encode()):
        raise Unauthorized("missing or wrong bearer token")


def output_metadata(variant: Variant) -> list[TensorMetadata]:
    """The tensors ``infer`` can return for this variant (batch axis -1)."""
    m = variant.manifest
    k = len(m.labels)
    outputs = [TensorMetadata(name="logits", datatype="FP32", shape=[-1, k]),
               TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, k])]
    if m.kind is Kind.CASCADE:
        outputs.append(TensorMetadata(name="exit_stage", datatype="INT32", shape=[-1]))
    if m.io and m.io.members_output_name:
        outputs.append(TensorMetadata(name="member_logits", datatype="FP32", shape=[-1, len(m.composition.members), k]))
    return outputs


def output_tensors(prediction: Prediction, wanted: list[str] | None) -> dict[str, tuple[str, np.ndarray]]:
    """The outputs asked for (``None``: all this prediction has), as (datatype, array), computing
    only those; an unknown name is the client's mistake."""
    available = {
        "logits": lambda: ("FP32", prediction.logits),
        "probabilities": lambda: ("FP32", softmax(prediction.logits).astype(np.float32)),
    }
    if prediction.exit_stage is not None:
        available["exit_stage"] = lambda: ("INT32", prediction.exit_stage)
    if prediction.member_logits is not None:
        available["member_logits"] = lambda: ("FP32", prediction.member_logits)
    names = list(available) if wanted is None else wanted
    unknown = [n for n in names if n not in available]
    if unknown:
        raise BadRequest(f"unknown output(s) {unknown}; this model has {sorted(available)}")
    return {n: available[n]() for n in names}
