"""The README's quick tour, run as written against a real server on a freshly trained store.

The two bash blocks of the README's "Quick tour" section are read from the README itself, so the
test cannot drift from what users are told: the first (how to start the server) is run for its
exports, the tokens the server is then started with; the second (the tour) is run as one bash
script with every `curl` made to fail on a non-2xx answer and to keep each answer, whose fields are
then checked against what the README says it returns.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import write_idx
from tests.server import serving_process
from training.config import PipelineConfig
from training.data import FASHION_MNIST_DIR
from training.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# The names and input sizes the tour uses (fmnist-*, a phi = -2 student at 21 px), tiny budgets.
TOUR_STORE = {
    "run_name": "fmnist",
    "data": {"train_limit": 0},
    "members": {"count": 3, "train": {"epochs": 1, "batch_size": 128, "augment": False, "early_stop": False}},
    "ensembles": {"rules": ["mean_prob"]},
    "baseline": {"enabled": False},
    "adaptive": {"enabled": False},
    "student": {"phi": -2, "undistilled_twin": False, "train": {"epochs": 1, "batch_size": 128, "augment": False, "early_stop": False}},
    "parity_samples": 32,
}


def tour_blocks() -> tuple[str, str]:
    section = README.read_text().split("## Quick tour", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 2, "the Quick tour has a start block and a tour block"
    return blocks[0], blocks[1]


def small_fashion_mnist(directory: Path, train: int = 3000, test: int = 1000) -> Path:
    """The first images of the real IDX files (the tour's answers come from real models)."""
    directory.mkdir(parents=True)
    for prefix, n in (("train", train), ("t10k", test)):
        images = np.frombuffer(gzip.open(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz").read()[16:], np.uint8)
        labels = np.frombuffer(gzip.open(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz").read()[8:], np.uint8)
        write_idx(directory / f"{prefix}-images-idx3-ubyte", images.reshape(-1, 28, 28)[:n])
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels[:n])
    return directory


def exported_tokens(start_block: str) -> dict[str, str]:
    """Run the start block's `export` lines (not `make`) and read back what they set."""
    exports = "\n".join(line for line in start_block.splitlines() if line.startswith("export "))
    out = subprocess.run(["bash", "-c", f"{exports}\nenv -0"], capture_output=True, check=True).stdout.decode()
    env = dict(item.split("=", 1) for item in out.split("\0") if "=" in item)
    return {k: env[k] for k in ("COMMITTEE_ADMIN_TOKEN", "COMMITTEE_FEEDBACK_TOKEN")}


# Every curl of the tour: fail on a non-2xx answer, keep the URL and the body.
CURL_WRAPPER = r'''
set -euo pipefail
curl() {
    local f
    f=$(mktemp "$TOUR_LOG/call.XXXXXX")
    printf '%s\n' "$@" > "$f.args"
    command curl --fail-with-body --show-error "$@" | tee "$f.body"
    return "${PIPESTATUS[0]}"
}
'''


@pytest.mark.slow
@pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").exists(), reason="Fashion-MNIST is not installed")
def test_every_command_of_the_readme_tour_answers_as_promised(tmp_path):
    start, tour = tour_blocks()
    tokens = exported_tokens(start)
    assert all(tokens.values()), "the start block exports both tokens"

    config = PipelineConfig.model_validate({**TOUR_STORE, "data": {**TOUR_STORE["data"], "data_dir": str(small_fashion_mnist(tmp_path / "data"))}})
    store = tmp_path / "model-store"
    run_pipeline(config, store)

    work, log = tmp_path / "work", tmp_path / "log"
    work.mkdir(), log.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    with serving_process(store, env=tokens) as (url, _):
        script = CURL_WRAPPER + tour.replace("localhost:8000", url.removeprefix("http://"))
        done = subprocess.run(["bash", "-c", script], cwd=work, capture_output=True, text=True, timeout=120,
                              env={**os.environ, **tokens, "TOUR_LOG": str(log)})
    assert done.returncode == 0, f"the tour stopped (a non-2xx answer or a failing command):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    calls = {}
    for args in sorted(log.glob("*.args")):
        argv = args.read_text().splitlines()
        target = next(a for a in argv if url.removeprefix("http://") in a).split(url.removeprefix("http://"), 1)[1]
        calls.setdefault(target, []).append(args.with_suffix(".body").read_text())

    def body(path: str) -> object:
        return json.loads(calls[path][0])

    assert {m["name"] for m in body("/v1/models")} >= {"fmnist-ensemble-mean-prob", "fmnist-cascade", "fmnist-student"}
    ensemble = body("/v1/models/fmnist-ensemble-mean-prob/predict?top_k=3")
    assert len(ensemble["predictions"]) == 2 and all(len(p["top_k"]) == 3 for p in ensemble["predictions"])
    assert all(p["member_agreement"] is not None for p in ensemble["predictions"])
    assert {"total_ms", "queue_ms", "compute_ms"} <= set(ensemble["timings"]) and ensemble["batch_sizes"]
    assert body("/v1/models/fmnist-cascade/predict")["predictions"][0]["exit_stage"] in (1, 2, 3)
    assert body("/v2/models/fmnist-student/infer")["outputs"][0]["shape"] == [1, 10]
    rows = body("/v1/tradeoffs")
    assert all({"accuracy", "live_p50_ms", "batch1_ms", "cost_per_1000_images", "pareto_latency"} <= set(r) for r in rows)
    assert calls["/v1/tradeoffs?format=csv"][0].startswith("name,")
    assert (work / "tradeoffs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (routed_path,) = [p for p in calls if p.startswith("/v1/predict?")]
    routing = body(routed_path)["routing"]
    assert routing["variant"].startswith("fmnist-") and routing["min_accuracy"] is not None
    assert routing["accuracy"] >= routing["min_accuracy"]
    feedback = body("/v1/feedback")
    assert feedback["recorded"] == 1 and feedback["results"][0]["status"] == "recorded"
    report = body("/v1/experiments/ens-vs-student")
    assert report["experiment"]["name"] == "ens-vs-student" and {a["arm"] for a in report["arms"]} == {"ensemble", "student"}
    assert body("/v2/models/fmnist-cascade")["name"] == "fmnist-cascade"
    assert body("/v2/health/ready")["ready"] is True
    assert any(line.startswith("committee_") for line in calls["/metrics"][0].splitlines())
