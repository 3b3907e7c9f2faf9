import logging
import subprocess
import sys

import numpy as np

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


def test_the_serving_side_never_imports_torch():
    code = (
        "import sys; import service.app, service.cli, service.registry, model_store; "
        "bad = [m for m in ('torch', 'timm', 'torchvision', 'training') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_model_store_needs_only_pydantic_and_the_standard_library():
    code = (
        "import sys; import model_store; "
        "bad = [m for m in ('torch', 'onnxruntime', 'numpy', 'service', 'training') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

