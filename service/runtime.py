"""ONNX Runtime sessions with providers chosen from settings.

``device=cuda`` asks for the CUDA execution provider first. If this onnxruntime build has no CUDA
provider, or the CUDA libraries fail to load (onnxruntime-gpu then falls back silently), the
session runs on CPU and a warning says so; the provider actually used is reported in metadata.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .config import Settings

log = logging.getLogger("committee.runtime")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class Runtime:
    session: ort.InferenceSession
    input_name: str
    output_names: list[str]
    providers: list[str]

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, {self.input_name: batch})


def requested_providers(settings: Settings) -> list[str | tuple[str, dict]]:
    if settings.device == "cuda":
        if CUDA in ort.get_available_providers():
            return [(CUDA, {"device_id": settings.cuda_device_id}), CPU]
        log.warning("device=cuda but this onnxruntime build has no %s (install the gpu extra); using CPU", CUDA)
    return [CPU]


_shared_pool_lock = threading.Lock()
_shared_pool_size: int | None = None


def _use_shared_pool(threads: int) -> None:
    """Size the process-wide ORT pool once: ORT fixes it when its environment is created."""
    global _shared_pool_size
    with _shared_pool_lock:
        if _shared_pool_size is None:
            ort.set_global_thread_pool_sizes(threads, 1)
            _shared_pool_size = threads
        elif _shared_pool_size != threads:
            log.warning("the shared ORT thread pool already has %d threads; %d asked for", _shared_pool_size, threads)


def session_options(settings: Settings) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if settings.thread_pool == "shared":
        _use_shared_pool(settings.intra_op_threads or os.cpu_count() or 1)
        options.use_per_session_threads = False
    elif settings.intra_op_threads:
        options.intra_op_num_threads = settings.intra_op_threads
    # Several sessions share few cores: spinning idle workers steal them from the busy one.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.allow_spinning else "0")
    return options


def load_runtime(model: bytes, input_name: str, output_names: list[str], settings: Settings, label: str = "model") -> Runtime:
    """A session over ``model``, the ONNX bytes the store verified (never re-read from disk)."""
    session = ort.InferenceSession(model, session_options(settings), providers=requested_providers(settings))
    used = session.get_providers()
    if settings.device == "cuda" and used[0] != CUDA:
        log.warning("%s: CUDA was requested but the session runs on %s", label, used[0])
    log.info("loaded %s on %s", label, used[0])
    return Runtime(session, input_name, output_names, used)
