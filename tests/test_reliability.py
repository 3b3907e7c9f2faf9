"""The reliability suite: tries to break the server over real HTTP, bounded in time.

- schemathesis against the generated OpenAPI document, every operation, every check;
- a corpus of bad inputs: each gets a 4xx with a message and memory stays flat;
- overload at 10x capacity: prompt 503s only, nobody outlives the deadline, goodput holds;
- hot reload under load: zero failed requests; SIGTERM under load: in-flight requests complete.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from PIL import Image

from model_store import ModelStore
from service.config import Settings
from tests.onnx_fixtures import SIZE, fields, linear_model, slow_model, weights
from tests.server import needs_granian, post, running_server, serving_process

TOKEN = "s3cret"


def tensor(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024


@pytest.fixture(scope="module")
def url(store_dir):
    with running_server(Settings(store=store_dir, admin_token=TOKEN, max_body_bytes=4 * 1024 * 1024)) as base:
        yield base


# ---- schemathesis ---------------------------------------------------------------------------------
def test_schemathesis_finds_no_failure_in_any_operation(url):
    """Every check but one: 'schema-valid request accepted' cannot hold for inference, whose valid
    bodies depend on the model (its input shape, real image bytes), which no static schema states."""
    out = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(Path(__file__).parent / "schemathesis.toml"),
         "run", f"{url}/openapi.json", "--checks", "all", "--exclude-checks", "positive_data_acceptance",
         "-n", "15", "--generation-deterministic", "-H", f"Authorization: Bearer {TOKEN}", "--request-timeout", "30"],
        capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stdout[-6000:]
    assert re.search(r"\d+ generated, \d+ passed", out.stdout), out.stdout[-2000:]


# ---- a corpus of bad inputs -----------------------------------------------------------------------
def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


GOOD = png(SIZE, SIZE)
HEADER = orjson.dumps({"inputs": [{"name": "input", "shape": [1, 1, 4, 4], "datatype": "FP32", "parameters": {"binary_data_size": 64}}]})
CORPUS = {
    "zero-byte image": ("/v1/models/member-a/predict", {"files": [("images", ("z.png", b"", "image/png"))]}, 422),
    "truncated png": ("/v1/models/member-a/predict", {"files": [("images", ("t.png", png(300, 300)[:60], "image/png"))]}, 422),
    "bomb png": ("/v1/models/member-a/predict", {"files": [("images", ("b.png", png(9000, 9000), "image/png"))]}, 413),
    "polyglot: png header, jpeg body": ("/v1/models/member-a/predict",
                                        {"files": [("images", ("p.png", GOOD[:16] + b"\xff\xd8\xff\xe0" + b"\0" * 64, "image/png"))]}, 415),
    "pdf named png": ("/v1/models/member-a/predict", {"files": [("images", ("x.png", b"%PDF-1.4\n%%EOF", "image/png"))]}, 415),
    "base64 garbage": ("/v1/models/member-a/predict", {"json": {"images": ["!!!"]}}, 400),
    "no files in form": ("/v1/models/member-a/predict", {"data": {"a": "b"}, "files": [("x", ("", b"", "text/plain"))]}, 400),
    "wrong shape": ("/v2/models/member-a/infer", {"json": tensor(np.zeros((1, 3, 4, 4), np.float32))}, 400),
    "65 dimensions": ("/v2/models/member-a/infer", {"json": {"inputs": [{"name": "input", "shape": [1] * 65, "datatype": "FP32", "data": [0]}]}}, 400),
    "huge dimension": ("/v2/models/member-a/infer", {"json": {"inputs": [{"name": "input", "shape": [2**62, 1, 4, 4], "datatype": "FP32", "data": [0]}]}}, 400),
    "negative dimension": ("/v2/models/member-a/infer", {"json": {"inputs": [{"name": "input", "shape": [-1, 1, 4, 4], "datatype": "FP32", "data": [0]}]}}, 400),
    "wrong dtype": ("/v2/models/member-a/infer", {"json": {"inputs": [{"name": "input", "shape": [1, 1, 4, 4], "datatype": "BYTES", "data": ["x"] * 16}]}}, 400),
    "strings as numbers": ("/v2/models/member-a/infer", {"json": {"inputs": [{"name": "input", "shape": [1, 1, 4, 4], "datatype": "FP32", "data": ["x"] * 16}]}}, 400),
    "NaN in binary": ("/v2/models/member-a/infer", {"content": HEADER + np.full(16, np.nan, np.float32).tobytes(),
                                                     "headers": {"Inference-Header-Content-Length": str(len(HEADER))}}, 400),
    "deeply nested json": ("/v2/models/member-a/infer", {"content": b"[" * 100_000 + b"]" * 100_000}, 400),
    "deeply nested data": ("/v2/models/member-a/infer", {"content": b'{"inputs": [{"name": "input", "shape": [1, 1, 4, 4], "datatype": "FP32", "data": '
                                                                    + b"[" * 1000 + b"0" + b"]" * 1000 + b"}]}"}, 400),
    "huge json": ("/v2/models/member-a/infer", {"content": b'{"inputs": [' + b'{"a": 1},' * 600_000 + b"1]}"}, 413),
    "header length lies (too long)": ("/v2/models/member-a/infer", {"content": HEADER + b"\0" * 64,
                                                                    "headers": {"Inference-Header-Content-Length": "100000"}}, 400),
    "header length lies (too short)": ("/v2/models/member-a/infer", {"content": HEADER + b"\0" * 64,
                                                                     "headers": {"Inference-Header-Content-Length": "10"}}, 400),
    "binary size lies": ("/v2/models/member-a/infer", {"content": HEADER + b"\0" * 60,
                                                       "headers": {"Inference-Header-Content-Length": str(len(HEADER))}}, 400),
    "unknown model": ("/v2/models/no-such-model/infer", {"json": tensor(np.zeros((1, 1, 4, 4), np.float32))}, 404),
    "unknown version": ("/v2/models/member-a/versions/99/infer", {"json": tensor(np.zeros((1, 1, 4, 4), np.float32))}, 404),
    "version zero": ("/v2/models/member-a/versions/0/infer", {"json": {}}, 400),
    "bad timeout header": ("/v2/models/member-a/infer", {"json": tensor(np.zeros((1, 1, 4, 4), np.float32)),
                                                         "headers": {"X-Request-Timeout": "nan"}}, 400),
}


def test_the_bad_input_corpus_gets_4xx_with_a_message_and_memory_stays_flat(url):
    def send_all() -> None:
        for case, (path, payload, status) in CORPUS.items():
            r = post(url, path, **payload)
            assert r.status_code == status, (case, r.status_code, r.text[:300])
            assert r.json()["error"], case

    send_all()  # warm: first-time allocations are not growth
    before = rss_bytes()
    for _ in range(3):
        send_all()
    assert rss_bytes() - before < 30 * 1024 * 1024
    assert post(url, "/v1/models/member-a/predict", json={"images": [base64.b64encode(GOOD).decode()]}).status_code == 200


# ---- overload -----------------------------------------------------------------------------------
async def closed_loop(url: str, body: bytes, concurrency: int, seconds: float) -> list[tuple[int, float]]:
    results: list[tuple[int, float]] = []
    end = time.monotonic() + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < end:
            t = time.monotonic()
            r = await client.post("/v2/models/slow/infer", content=body)
            results.append((r.status_code, time.monotonic() - t))

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return results


async def open_loop(url: str, body: bytes, rate: float, seconds: float) -> list[tuple[int, float]]:
    results: list[tuple[int, float]] = []

    async def one(client: httpx.AsyncClient) -> None:
        t = time.monotonic()
        r = await client.post("/v2/models/slow/infer", content=body)
        results.append((r.status_code, time.monotonic() - t))

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=1000)) as client:
        tasks, start = [], time.monotonic()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(client)))
        await asyncio.gather(*tasks)
    return results


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99))


def test_under_ten_times_capacity_goodput_holds_answers_keep_their_deadline_and_refusals_are_prompt(tmp_path):
    store = ModelStore(tmp_path / "store")
    store.publish(fields("slow"), slow_model(tmp_path / "slow.onnx", weights(0), layers=200, width=2048))
    body = orjson.dumps(tensor(np.zeros((1, 1, SIZE, SIZE), np.float32)))
    deadline_s = 1.0
    # in its own process: a client sharing the server's GIL would measure itself, not the server
    # no background calibration: it would time the slow model on the same cores while capacity is measured
    with serving_process(store.root, "--max-batch-size", "2", "--intra-op-threads", "1", "--request-timeout-s", str(deadline_s),
                         "--no-calibrate") as (base, _):
        asyncio.run(closed_loop(base, body, 2, 1.0))  # warm
        seconds = 5.0
        at_capacity = asyncio.run(closed_loop(base, body, 4, seconds))
        capacity = sum(s == 200 for s, _ in at_capacity) / seconds
        capacity_p99 = p99([t for s, t in at_capacity if s == 200])
        overload = asyncio.run(open_loop(base, body, 10 * capacity, seconds))
        metrics = httpx.get(base + "/metrics").text
    ok = [t for s, t in overload if s == 200]
    refused = [t for s, t in overload if s == 503]
    timed_out = sum(s == 504 for s, _ in overload)
    goodput = len(ok) / seconds
    summary = (f"capacity {capacity:.1f}/s p99 {capacity_p99:.3f}s; at 10x: {len(overload)} requests, {goodput:.1f} ok/s, "
               f"ok p99 {p99(ok):.3f}s max {max(ok):.3f}s, {len(refused)} 503 (p99 {p99(refused) if refused else 0:.3f}s), "
               f"{timed_out} 504")
    print(summary)
    assert {s for s, _ in overload} <= {200, 503, 504}, summary
    # Admission by expected completion: what is admitted is answered inside its deadline (the
    # server counts late answers; the client's clock adds its own scheduling on these shared cores),
    # and the refusals cost little (the outermost middleware answers them: see service/shedding.py).
    assert goodput >= 0.8 * capacity, summary
    assert max(ok) < deadline_s + 0.3, summary
    assert timed_out <= 0.01 * len(overload), summary
    assert p99(refused) < 0.5, summary  # refused promptly, not after queueing
    # A batch that started in time is answered even when it ends past the deadline (its compute is
    # spent): admitted right up to the deadline, a fair share of answers end inside one batch of
    # this slow model (0.13 s) past it; each is counted, and none is later than that.
    late = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("committee_late_answers_total{"))
    assert late <= 0.5 * len(ok), summary


# ---- reload and shutdown under load --------------------------------------------------------------
def test_hot_reload_under_load_fails_no_request(tmp_path):
    store = ModelStore(tmp_path / "store")
    store.publish(fields("m"), linear_model(tmp_path / "v1.onnx", weights(0)))
    body = orjson.dumps(tensor(np.zeros((2, 1, SIZE, SIZE), np.float32)))

    async def traffic(base: str, stop: asyncio.Event) -> list[tuple[int, str]]:
        seen: list[tuple[int, str]] = []
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            async def worker() -> None:
                while not stop.is_set():
                    r = await client.post("/v2/models/m/infer", content=body)
                    seen.append((r.status_code, r.json().get("model_version", r.text)))
            await asyncio.gather(*(worker() for _ in range(8)))
        return seen

    async def main(base: str) -> list[tuple[int, str]]:
        stop = asyncio.Event()
        load = asyncio.create_task(traffic(base, stop))
        async with httpx.AsyncClient(base_url=base, timeout=30) as admin:
            for v in range(2, 6):
                await asyncio.sleep(0.3)
                await asyncio.to_thread(store.publish, fields("m"), linear_model(tmp_path / f"v{v}.onnx", weights(v)))
                r = await admin.post("/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
                assert r.json()["loaded"] == [f"m:{v}"]
        await asyncio.sleep(0.3)
        stop.set()
        return await load

    with running_server(Settings(store=store.root, admin_token=TOKEN)) as base:
        seen = asyncio.run(main(base))
    failures = [s for s in seen if s[0] != 200]
    assert len(seen) > 100 and not failures, failures[:5]
    assert {v for _, v in seen} >= {"1", "5"}


@pytest.mark.parametrize("server", ["uvicorn", pytest.param("granian", marks=needs_granian)])
def test_sigterm_under_load_finishes_in_flight_requests_and_refuses_new_ones_cleanly(tmp_path, server):
    store = ModelStore(tmp_path / "store")
    store.publish(fields("slow"), slow_model(tmp_path / "slow.onnx", weights(0), layers=200, width=2048))
    body = orjson.dumps(tensor(np.zeros((1, 1, SIZE, SIZE), np.float32)))
    with serving_process(store.root, "--server", server, "--max-batch-size", "2", "--max-queue-wait-ms", "5000") as (base, proc):
        async def main() -> tuple[list[int], list[str]]:
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                in_flight = [asyncio.create_task(client.post("/v2/models/slow/infer", content=body)) for _ in range(6)]
                await asyncio.sleep(0.5)  # accepted and queued or computing
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                late: list[str] = []
                try:
                    r = await client.post("/v2/models/slow/infer", content=body, headers={"Connection": "close"})
                    late.append(str(r.status_code))
                except httpx.HTTPError as exc:
                    late.append(type(exc).__name__)
                done = await asyncio.gather(*in_flight)
                return [r.status_code for r in done], late

        statuses, late = asyncio.run(main())
        assert statuses == [200] * 6  # everything accepted before the signal was answered
        assert late[0] in {"503", "ConnectError", "RemoteProtocolError"}, late  # refused cleanly, never hung
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a graceful shutdown; granian exits 0
