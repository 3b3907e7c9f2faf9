import os
import tempfile

# Two cores: keep every library's thread pool small so tests don't thrash each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Servers the tests start (in this process or as subprocesses) keep experiment state out of the checkout.
os.environ.setdefault("COMMITTEE_STATE_DIR", tempfile.mkdtemp(prefix="committee-state-"))

import pytest


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory):
    """The fixture store of tests/onnx_fixtures.py, built once; tests only read it."""
    from tests.onnx_fixtures import build_store

    root = tmp_path_factory.mktemp("store")
    build_store(root, tmp_path_factory.mktemp("work"))
    return root
