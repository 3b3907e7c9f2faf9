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
    thread_pool: Literal["per_session", "shared"] = Field(
        "per_session", description="shared: one ORT intra-op pool for every session of the process instead of one each")
    instances: int = Field(1, ge=1, le=64, description="batches of one model in flight at once (one thread-safe session)")
    workers: int = Field(1, ge=1, le=64, description="server processes sharing the port, each with its own loop and sessions")
    server: Literal["uvicorn", "granian"] = Field(
        "uvicorn", description="the HTTP server under the same ASGI app; granian needs the `granian` extra")

    max_batch_size: int = Field(32, ge=1, description="a batch is cut at this many images ...")
    # 0 by default: measured here, waiting 2 ms for company cost 2.5 ms of p50 latency at concurrency 1
    # and bought no throughput at concurrency 32 (the queue fills by itself while a batch computes).
    max_queue_delay_ms: float = Field(0.0, ge=0, description="... or this long after its first image arrived")
    # Sized for bursts: a queue that is expected to clear before its requests' deadlines is not
    # refused (see ``admission``); 1,000 clients at once are 0.6 s of work for the default ensemble.
    max_queue_size: int = Field(2048, ge=1, description="images waiting per model; beyond it requests get 503")
    # Admission control: a request not expected to complete before its deadline is refused at once
    # with 503 instead of queueing into a latency nobody waits for.
    max_queue_wait_ms: float = Field(
        0.0, ge=0, description="cap on the expected queue wait per model, below the deadline; 0: the deadline only")
    max_inflight_requests: int = Field(2048, ge=1, description="inference requests in the server at once; beyond: 503")
    request_timeout_s: float = Field(10.0, gt=0, description="default deadline; header X-Request-Timeout overrides")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    # Thousands of requests may wait in the server (a burst that fits its deadline is queued): their
    # bodies, not their count, are what memory must hold.
    max_inflight_body_bytes: int = Field(1024 * 1024 * 1024, ge=1024,
                                         description="request bodies held by the server at once; beyond: 503")
    max_images_per_request: int = Field(256, ge=1)
    # Decompression-bomb guards, checked on each image's header before its pixels are decoded.
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="pixels (width x height) per uploaded image")
    max_request_pixels: int = Field(64 * 1024 * 1024, ge=1, description="pixels of all images of one request")
    top_k: int = Field(5, ge=1)

    # Live trade-offs and SLO routing (``/v1/tradeoffs``, ``POST /v1/predict``).
    calibrate: bool = Field(True, description="time every runner on its runtime in the background after each load")
    calibration_seconds: float = Field(2.0, gt=0, le=60, description="time budget of one runner's calibration")
    latency_window: int = Field(2048, ge=16, description="recent successful requests kept per variant for live quantiles")
    latency_window_s: float = Field(300.0, gt=0, description="... and no older than this")
    # Estimates miss what a loaded server adds (the loop, other requests' decoding); choosing the most
    # accurate variant only while it fits half the budget keeps the rest for that, and sends a loaded
    # server's requests to the cheapest variant that fits (measured: docs/benchmarks.md, SLO policies).
    slo_headroom: float = Field(0.5, gt=0, le=1, description="the SLO route picks for accuracy among variants expected "
                                                             "within this share of the budget; beyond it, the cheapest that fits")
    slo_pool: list[str] = Field([], description="variants POST /v1/predict may route to (empty: all sharing the common label set)")

    # A/B experiments (``/v1/experiments``, ``/v1/feedback``).
    experiments_file: Path | None = Field(None, description="TOML file of [[experiments]] to run")
    state_dir: Path = Field(Path("state"), description="where the SQLite experiment database lives")
    database_url: SecretStr | None = Field(None, description="postgresql://... : share experiment state between replicas")
    database_connect_timeout_s: float = Field(
        3.0, gt=0, le=60, description="give up connecting to the experiment database after this long (feedback and reports answer 503)")
    database_statement_timeout_s: float = Field(10.0, gt=0, le=600, description="PostgreSQL statement timeout")
    experiment_retention_days: float = Field(
        30.0, gt=0, description="records of an experiment run are deleted this long after the run ended (never while live)")
    experiment_buffer_records: int = Field(
        50_000, ge=1, description="experiment records buffered while the database is away; beyond: dropped and counted")
    experiment_refresh_s: float = Field(2.0, gt=0, le=60, description="read the live experiments from the database this often")
    report_cache_s: float = Field(2.0, ge=0, le=300, description="a live run's report is computed at most this often")
    feedback_token: SecretStr | None = Field(None, description="bearer token POST /v1/feedback requires (unset: open)")
    shadow_queue_size: int = Field(64, ge=1, description="shadow predictions waiting per experiment; beyond: dropped and counted")
    shadow_max_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="image bytes held by waiting shadow predictions, all experiments together")
    shadow_timeout_s: float = Field(10.0, gt=0, description="a shadow prediction gives up after this long")

    admin_token: SecretStr | None = Field(None, description="bearer token for /v1/admin/*; unset disables them")
    poll_interval_s: float = Field(0.0, ge=0, description="check the store for new versions this often (0: never)")
    strict_readiness: bool = Field(
        True, description="ready only when every model serves; false: ready when at least one does (failures still listed)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("models", "slo_pool", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str) and not value.startswith("["):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value
