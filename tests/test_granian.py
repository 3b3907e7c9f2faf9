"""``committee-serve --server granian``: the same app under granian's worker processes, its lifespan
included (models loaded before the first request, everything closed on SIGTERM), as users run it."""

from __future__ import annotations

import asyncio
import signal

import httpx
import numpy as np
import orjson
import pytest

from model_store import ModelStore
from tests.onnx_fixtures import SIZE, fields, slow_model, weights
from tests.server import serving_process

try:
    import granian  # noqa: F401
    MISSING = ""
except ImportError as exc:
    MISSING = f"granian is not importable ({exc}); install the extra: pip install -e '.[granian]'"

pytestmark = pytest.mark.skipif(bool(MISSING), reason=MISSING)


def tensor_body() -> bytes:
    x = np.zeros((1, 1, SIZE, SIZE), np.float32)
    return orjson.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})


def test_granian_serves_the_store_counts_in_metrics_and_exits_0_on_sigterm(store_dir):
    with serving_process(store_dir, "--server", "granian", "--no-calibrate") as (base, proc):
        r = httpx.post(f"{base}/v2/models/member-a/infer", content=tensor_body(), timeout=30)
        assert r.status_code == 200, r.text
        assert r.headers["server"] == "granian"
        assert r.json()["outputs"][0]["shape"] == [1, 3]
        metrics = httpx.get(f"{base}/metrics", timeout=30).text
        assert 'committee_requests_total{endpoint="v2_infer",model="member-a",outcome="ok"} 1.0' in metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read().decode()[-2000:]


def test_granian_finishes_requests_in_flight_at_sigterm_and_refuses_new_ones(tmp_path):
    store = ModelStore(tmp_path / "store")
    store.publish(fields("slow"), slow_model(tmp_path / "slow.onnx", weights(0), layers=200, width=2048))
    with serving_process(store.root, "--server", "granian", "--no-calibrate", "--max-batch-size", "2",
                         "--max-queue-wait-ms", "5000") as (base, proc):
        async def main() -> tuple[list[int], str]:
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                in_flight = [asyncio.create_task(client.post("/v2/models/slow/infer", content=tensor_body())) for _ in range(6)]
                await asyncio.sleep(0.5)  # accepted and queued or computing
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                try:
                    r = await client.post("/v2/models/slow/infer", content=tensor_body(), headers={"Connection": "close"})
                    late = str(r.status_code)
                except httpx.HTTPError as exc:
                    late = type(exc).__name__
                return [r.status_code for r in await asyncio.gather(*in_flight)], late

        statuses, late = asyncio.run(main())
        assert statuses == [200] * 6  # everything accepted before the signal was answered
        assert late in {"503", "ConnectError", "RemoteProtocolError"}, late  # refused cleanly, never hung
        assert proc.wait(30) == 0, proc.stderr.read().decode()[-2000:]
