import logging
import subprocess
import sys

import numpy as np
import pytest

from service.config import Settings
from service.runtime import CPU, CUDA, load_runtime, requested_providers
from tests.onnx_fixtures import SIZE, linear_model, weights


def cuda_works() -> bool:
    """Whether a CUDA session really runs here (onnxruntime-gpu falls back silently without CUDA)."""
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return False
    probe = subprocess.run([sys.executable, "-c", (
        "import onnxruntime as ort, sys; from tests.onnx_fixtures import linear_model, weights; import tempfile, pathlib;"
        "p = linear_model(pathlib.Path(tempfile.mkdtemp()) / 'm.onnx', weights(0));"
        "s = ort.InferenceSession(str(p), providers=['CUDAExecutionProvider']);"
        "sys.exit(0 if s.get_providers()[0] == 'CUDAExecutionProvider' else 1)")], capture_output=True)
    return probe.returncode == 0


def test_cuda_request_uses_cuda_where_it_works_and_falls_back_to_cpu_with_a_log_line(tmp_path, caplog):
    model = linear_model(tmp_path / "m.onnx", weights(0)).read_bytes()
    with caplog.at_level(logging.WARNING, logger="committee.runtime"):
        runtime = load_runtime(model, "input", ["logits"], Settings(device="cuda"))
    if cuda_works():
        assert runtime.providers[0] == CUDA
    else:  # whichever way CUDA is missing, the session runs on CPU and says so
        assert runtime.providers == [CPU]
        assert any("CUDA" in r.message and "CPU" in r.message for r in caplog.records)
    out = runtime.run(np.zeros((2, 1, SIZE, SIZE), np.float32))
    np.testing.assert_allclose(out[0], np.zeros((2, 3)), atol=1e-6)


def test_a_shared_thread_pool_serves_several_sessions(tmp_path):
    code = (
        "import numpy as np; from service.config import Settings; from service.runtime import load_runtime;"
        "from tests.onnx_fixtures import linear_model, weights; import tempfile, pathlib;"
        "d = pathlib.Path(tempfile.mkdtemp()); s = Settings(thread_pool='shared', intra_op_threads=2);"
        "rs = [load_runtime(linear_model(d / f'{i}.onnx', weights(i)).read_bytes(), 'input', ['logits'], s) for i in range(3)];"
        "x = np.ones((4, 1, 4, 4), np.float32);"
        "assert all(np.allclose(r.run(x)[0], x.reshape(4, -1) @ weights(i), atol=1e-5) for i, r in enumerate(rs))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)  # its own process: ORT fixes the pool once per process


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


def test_pyproject_declares_the_python_the_code_needs():
    import tomllib
    from pathlib import Path

    declared = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["requires-python"]
    assert declared == ">=3.11"  # tomllib, asyncio.timeout and TimeoutError semantics


def test_routes_reach_the_serving_core_only_through_the_data_plane():
    """Routes translate HTTP: they import the serving core (variants, registry, batcher, runtime)
    from the data plane only, so the core can change behind it."""
    import ast
    from pathlib import Path

    core = {"variants", "registry", "batcher", "runtime", "calibration", "routing"}
    for path in (Path(__file__).parent.parent / "service" / "routes").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                module = (node.module or "").split(".")[0]
                assert module not in core, f"{path.name} imports service.{node.module}: go through the data plane"
