"""``committee-serve --server granian``: the same app under granian's worker processes, its lifespan
included (models loaded before the first request, everything closed on SIGTERM), as users run it.
The drain of requests in flight at SIGTERM is tested for both servers in test_reliability.py."""

from __future__ import annotations

import signal
import subprocess

import httpx
import numpy as np
import orjson

from tests.onnx_fixtures import SIZE
from tests.server import needs_granian, serving_process

pytestmark = needs_granian


def test_granian_serves_the_store_counts_in_metrics_and_exits_0_on_sigterm(store_dir):
    x = np.zeros((1, 1, SIZE, SIZE), np.float32)
    body = orjson.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})
    with serving_process(store_dir, "--server", "granian", "--no-calibrate", "--log-level", "info",
                         stdout=subprocess.PIPE) as (base, proc):
        r = httpx.post(f"{base}/v2/models/member-a/infer", content=body, timeout=30)
        assert r.status_code == 200, r.text
        assert r.headers["server"] == "granian"
        assert r.json()["outputs"][0]["shape"] == [1, 3]
        metrics = httpx.get(f"{base}/metrics", timeout=30).text
        assert 'committee_requests_total{endpoint="v2_infer",model="member-a",outcome="ok"} 1.0' in metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read().decode()[-2000:]
        granian_log = proc.stdout.read().decode()
        # The worker ran the app's lifespan shutdown (granian logs a failed one as an error) and stopped.
        assert "[ERROR]" not in granian_log and "Granian shutdown completed" in granian_log, granian_log
