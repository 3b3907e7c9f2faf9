import logging
import subprocess
import sys

import numpy as np
import pytest

from service.config import Settings
from service.runtime import CPU, load_runtime, requested_providers
from tests.onnx_fixtures import SIZE, linear_model, weights


def test_cuda_request_falls_back_to_cpu_with_a_log_line(tmp_path, caplog):
    path = linear_model(tmp_path / "m.onnx", weights(0))
    with caplog.at_level(logging.WARNING, logger="committee.runtime"):
        runtime = load_runtime(path, "input", ["logits"], Settings(device="cuda"))
    # This machine has no GPU: whichever way CUDA is missing, the session runs and says so.
    assert runtime.providers[-1] == CPU and runtime.providers[0] == CPU
    assert any("CUDA" in r.message and "CPU" in r.message for r in caplog.records)
    out = runtime.run(np.zeros((2, 1, SIZE, SIZE), np.float32))
    assert out[0].shape == (2, 3)


def test_cpu_is_the_default_provider():
    assert requested_providers(Settings()) == [CPU]


@pytest.mark.parametrize("imports, forbidden", [
    # the serving side: no torch, no timm, no training code
    ("service.app, service.cli, service.registry, model_store", ("torch", "timm", "torchvision", "training")),
    # the contract: pydantic and the standard library only
    ("model_store", ("torch", "onnxruntime", "numpy", "service", "training")),
])
def test_packages_import_only_what_the_architecture_allows(imports, forbidden):
    code = f"import sys; import {imports}; bad = [m for m in {forbidden!r} if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)
