"""Service settings: environment variables (``COMMITTEE_*``) and ``committee-serve`` flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COMMITTEE_", extra="ignore")

    store: Path = Field(Path("model-store"), description="model store folder to serve")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    models: list[str] = Field([], description="serve only these model names (empty: every model in the store)")
    pins: dict[str, int] = Field({}, description="name -> version to serve instead of the latest, e.g. '{\"m\": 2}'")

    device: Literal["cpu", "cuda"] = Field("cpu", description="cuda: CUDA execution provider first, CPU as fallback")
    cuda_device_id: int = 0
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads per session (0: ORT default)")
    allow_spinning: bool = Field(False, description="let idle ORT workers spin; off because sessions share the cores")

    max_batch_size: int = Field(32, ge=1, description="a batch is cut at this many images ...")
    # 0 by default: measured here, waiting 2 ms for company cost 2.5 ms of p50 latency at concurrency 1
    # and bought no throughput at concurrency 32 (the queue fills by itself while a batch computes).
    max_queue_delay_ms: float = Field(0.0, ge=0, description="... or this long after its first image arrived")
    max_queue_size: int = Field(512, ge=1, description="images waiting per model; beyond it requests get 503")
    request_timeout_s: float = Field(10.0, gt=0, description="default deadline; header X-Request-Timeout overrides")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_images_per_request: int = Field(256, ge=1)
    top_k: int = Field(5, ge=1)

    admin_token: SecretStr | None = Field(None, description="bearer token for /v1/admin/*; unset disables them")
    poll_interval_s: float = Field(0.0, ge=0, description="check the store for new versions this often (0: never)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("models", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str) and not value.startswith("["):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value
