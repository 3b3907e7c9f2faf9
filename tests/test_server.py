"""The service over real HTTP on loopback, on a store of real ONNX models (tests/onnx_fixtures.py)."""

from __future__ import annotations

import asyncio
import base64
import io
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image

from service.config import Settings
from tests.onnx_fixtures import LABELS, SIZE, fields, linear_model, normalise, weights
from tests.server import get, post, running_server

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def url(store_dir):
    settings = Settings(store=store_dir, max_batch_size=16, max_queue_delay_ms=20, admin_token=TOKEN,
                        max_images_per_request=32, max_body_bytes=256 * 1024)
    with running_server(settings) as base:
        yield base


def tensor_request(x: np.ndarray, datatype="FP32", **extra) -> dict:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}], **extra}


def png(pixels: np.ndarray, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, fmt)
    return buf.getvalue()


def expected_logits(x: np.ndarray, seed: int) -> np.ndarray:
    return x.reshape(len(x), -1) @ weights(seed)


# ---- health and metadata -----------------------------------------------------------------------
def test_server_metadata_and_liveness(url):
    assert get(url, "/v2").json()["extensions"] == ["binary_tensor_data"]
    assert get(url, "/v2/health/live").json() == {"live": True}


def test_model_metadata_describes_inputs_and_outputs(url):
    meta = get(url, "/v2/models/ensemble").json()
    assert meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, SIZE, SIZE]}]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "probabilities", "member_logits"]
    assert meta["parameters"]["providers"] == ["CPUExecutionProvider"]
    assert get(url, "/v2/models/ensemble/versions/1").status_code == 200
    assert get(url, "/v2/models/cascade").json()["platform"] == "committee_cascade"


def test_model_ready_and_unknown_models(url):
    assert get(url, "/v2/models/member-a/ready").json() == {"name": "member-a", "ready": True}
    r = get(url, "/v2/models/nope/ready")
    assert r.status_code == 404 and "not served here" in r.json()["error"]
    r = get(url, "/v2/models/member-a/versions/7")
    assert r.status_code == 404 and "version 7 is not served (serving version 1)" in r.json()["error"]


def test_v1_lists_models_with_metrics(url):
    models = {m["name"]: m for m in get(url, "/v1/models").json()}
    assert set(models) == {"member-a", "member-b", "ensemble", "cascade", "flaky"}
    assert models["ensemble"]["metrics"]["accuracy"] == 0.9 and models["ensemble"]["ready"]
    full = get(url, "/v1/models/cascade").json()
    assert full["manifest"]["composition"]["stages"][0]["threshold"] == 0.9


def test_openapi_schema_documents_the_routes(url):
    paths = get(url, "/openapi.json").json()["paths"]
    assert {"/v2/models/{name}/infer", "/v1/models/{name}/predict", "/metrics"} <= set(paths)


# ---- v2 inference ------------------------------------------------------------------------------
def test_v2_infer_fp32_json_matches_the_model(url):
    x = np.random.default_rng(0).normal(size=(3, 1, SIZE, SIZE)).astype(np.float32)
    r = post(url, "/v2/models/member-a/infer", json=tensor_request(x, id="req-1"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "member-a" and body["model_version"] == "1" and body["id"] == "req-1"
    out = {o["name"]: o for o in body["outputs"]}
    assert out["logits"]["shape"] == [3, 3] and out["logits"]["datatype"] == "FP32"
    np.testing.assert_allclose(np.array(out["logits"]["data"]).reshape(3, 3), expected_logits(x, 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(out["probabilities"]["data"]).reshape(3, 3).sum(1), 1, atol=1e-6)


def test_v2_uint8_pixels_are_normalised_by_the_server(url):
    pixels = np.random.default_rng(1).integers(0, 256, (2, 1, SIZE, SIZE)).astype(np.uint8)
    r = post(url, "/v2/models/member-b/infer", json=tensor_request(pixels, "UINT8", outputs=[{"name": "logits"}]))
    out = r.json()["outputs"]
    assert [o["name"] for o in out] == ["logits"]
    np.testing.assert_allclose(np.array(out[0]["data"]).reshape(2, 3), expected_logits(normalise(pixels), 1), rtol=1e-4, atol=1e-4)


def test_v2_binary_tensors_in_and_out(url):
    x = np.random.default_rng(2).normal(size=(4, 1, SIZE, SIZE)).astype(np.float32)
    header = {"inputs": [{"name": "input", "shape": [4, 1, SIZE, SIZE], "datatype": "FP32",
                          "parameters": {"binary_data_size": x.nbytes}}],
              "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}
    import orjson

    head = orjson.dumps(header)
    r = post(url, "/v2/models/member-a/infer", content=head + x.tobytes(),
             headers={"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    meta = orjson.loads(r.content[:n])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 4 * 3 * 4
    logits = np.frombuffer(r.content[n:], dtype="<f4").reshape(4, 3)
    np.testing.assert_allclose(logits, expected_logits(x, 0), rtol=1e-5, atol=1e-5)


def test_cascade_reports_exit_stages_consistent_with_thresholds(url):
    x = np.random.default_rng(3).normal(size=(16, 1, SIZE, SIZE)).astype(np.float32) * 3
    r = post(url, "/v2/models/cascade/infer", json=tensor_request(x))
    out = {o["name"]: np.array(o["data"]) for o in r.json()["outputs"]}
    stages = out["exit_stage"]
    p1 = np.exp(expected_logits(x, 0))
    p1 /= p1.sum(1, keepdims=True)
    assert set(stages.tolist()) <= {1, 2}
    np.testing.assert_array_equal(stages == 1, p1.max(1) >= 0.9)
    assert (stages == 1).any() and (stages == 2).any()  # the fixture data exercise both stages


def test_tritonclient_works_unchanged(url):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_model_metadata("member-a")
    assert meta["inputs"][0]["shape"] == [-1, 1, SIZE, SIZE]
    x = np.random.default_rng(4).normal(size=(2, 1, SIZE, SIZE)).astype(np.float32)
    for binary in (True, False):
        inp = triton.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        result = client.infer("member-a", [inp], outputs=[triton.InferRequestedOutput("logits", binary_data=binary)])
        np.testing.assert_allclose(result.as_numpy("logits"), expected_logits(x, 0), rtol=1e-5, atol=1e-5)
    client.close()


# ---- v1 images -----------------------------------------------------------------------------------
def test_v1_predict_multipart_png_and_jpeg(url):
    rng = np.random.default_rng(5)
    files = [("images", ("a.png", png(rng.integers(0, 256, (SIZE, SIZE))), "image/png")),
             ("images", ("b.jpg", png(rng.integers(0, 256, (12, 9, 3)), "JPEG"), "image/jpeg"))]
    r = post(url, "/v1/models/ensemble/predict?top_k=2", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "ensemble" and len(body["predictions"]) == 2
    for p in body["predictions"]:
        assert p["label"] in LABELS and len(p["top_k"]) == 2 and p["top_k"][0]["probability"] >= p["top_k"][1]["probability"]
        assert p["member_agreement"] in (0.0, 0.5, 1.0)
    assert body["timings"]["total_ms"] >= body["timings"]["compute_ms"] > 0


def test_v1_predict_json_base64_gives_the_tensor_answer(url):
    pixels = np.random.default_rng(6).integers(0, 256, (SIZE, SIZE)).astype(np.uint8)
    r = post(url, "/v1/models/member-a/predict", json={"images": [base64.b64encode(png(pixels)).decode()], "top_k": 3})
    assert r.status_code == 200, r.text
    logits = expected_logits(normalise(pixels)[None, None], 0)[0]
    assert r.json()["predictions"][0]["label"] == LABELS[int(np.argmax(logits))]


def test_v1_cascade_predict_says_which_stage_answered(url):
    r = post(url, "/v1/models/cascade/predict", files=[("images", ("a.png", png(np.full((SIZE, SIZE), 200)), "image/png"))])
    assert r.json()["predictions"][0]["exit_stage"] in (1, 2)


# ---- bad input: precise 4xx, never a 500 ---------------------------------------------------------
BAD_V2 = [
    (b"{not json", 400, "not valid JSON"),
    (b'{"inputs": []}', 400, "inputs"),
    (b'{"inputs": [{"name": "input", "shape": [1, 1, 4, 4], "datatype": "FP32", "data": [1, 2]}]}', 400, "needs 16 elements, data has 2"),
    (b'{"inputs": [{"name": "input", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": ' + str([0] * 48).encode() + b"}]}", 400, "shape must be [N, 1, 4, 4]"),
    (b'{"inputs": [{"name": "input", "shape": [1, 1, 4, 4], "datatype": "BYTES", "data": ["x"]}]}', 400, "datatype BYTES is not accepted"),
    (b'{"inputs": [{"name": "input", "shape": [1, 1, 4, 4], "datatype": "FP32", "data": ["a", 1]}]}', 400, "not a flat or nested list"),
    (b'{"inputs": [{"name": "pixels", "shape": [1, 1, 4, 4], "datatype": "FP32", "data": ' + str([0] * 16).encode() + b"}]}", 400, "unknown input 'pixels'"),
    (b'{"inputs": [{"name": "input", "shape": [1, 1, 4, 4], "datatype": "FP32", "data": ' + str([0] * 16).encode() + b'}], "outputs": [{"name": "nope"}]}', 400, "unknown output(s) ['nope']"),
    (b'{"inputs": [{"name": "input", "shape": [33, 1, 4, 4], "datatype": "UINT8", "data": ' + str([0] * 528).encode() + b"}]}", 400, "33 images in one request; the limit is 32"),
]


@pytest.mark.parametrize("body, status, message", BAD_V2)
def test_v2_bad_requests_get_precise_errors(url, body, status, message):
    r = post(url, "/v2/models/member-a/infer", content=body)
    assert r.status_code == status and message in r.json()["error"], r.text


def test_v2_nan_and_inf_are_refused(url):
    for bad in ("NaN", "Infinity"):
        data = ",".join(["0"] * 15 + [bad])
        body = f'{{"inputs": [{{"name": "input", "shape": [1, 1, 4, 4], "datatype": "FP32", "data": [{data}]}}]}}'
        x = np.zeros(16, np.float32)
        x[-1] = np.nan if bad == "NaN" else np.inf
        # orjson refuses NaN literals in JSON; the binary path carries them
        r = post(url, "/v2/models/member-a/infer", content=body.encode())
        assert r.status_code == 400
        import orjson

        head = orjson.dumps({"inputs": [{"name": "input", "shape": [1, 1, 4, 4], "datatype": "FP32", "parameters": {"binary_data_size": 64}}]})
        r = post(url, "/v2/models/member-a/infer", content=head + x.tobytes(), headers={"Inference-Header-Content-Length": str(len(head))})
        assert r.status_code == 400 and "NaN or infinite" in r.json()["error"]


def test_v2_binary_size_mismatch_and_bad_header(url):
    head = b'{"inputs": [{"name": "input", "shape": [1, 1, 4, 4], "datatype": "FP32", "parameters": {"binary_data_size": 64}}]}'
    r = post(url, "/v2/models/member-a/infer", content=head + b"\0" * 10, headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 400 and "binary_data_size is 64 but 10 bytes" in r.json()["error"]
    r = post(url, "/v2/models/member-a/infer", content=head, headers={"Inference-Header-Content-Length": "abc"})
    assert r.status_code == 400 and "must be an integer" in r.json()["error"]


def test_unknown_model_and_unparseable_version(url):
    r = post(url, "/v2/models/ghost/infer", json={})
    assert r.status_code == 404 and "ghost" in r.json()["error"]
    r = post(url, "/v2/models/member-a/versions/abc/infer", json={})
    assert r.status_code == 400 and "version" in r.json()["error"]


def test_body_over_the_limit_is_413(url):
    r = post(url, "/v2/models/member-a/infer", content=b"x" * (300 * 1024))
    assert r.status_code == 413 and "over the limit" in r.json()["error"]

    def chunks():
        for _ in range(40):
            yield b"y" * 8192

    r = post(url, "/v1/models/member-a/predict", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


@pytest.mark.parametrize("payload, status, message", [
    ({"files": [("images", ("x.png", b"definitely not an image", "image/png"))]}, 415, "not an image"),
    ({"files": [("images", ("t.png", None, "image/png"))]}, 422, "truncated or corrupt"),
    ({"files": [("images", ("e.png", b"", "image/png"))]}, 422, "is empty"),
    ({"data": {"field": "value"}}, 415, "not accepted"),
    ({"json": {"images": ["%%%"]}}, 400, "images[0] is not valid base64"),
    ({"json": {"images": []}}, 400, "images"),
    ({"content": b"{bad", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
    ({"files": [("images", ("a.png", b"\x89PNG", "image/png"))] * 33}, 400, "33 images in one request"),
])
def test_v1_bad_uploads_get_precise_errors(url, payload, status, message):
    if payload.get("files") and payload["files"][0][1][1] is None:
        good = png(np.random.default_rng(0).integers(0, 256, (64, 64)))
        payload = {"files": [("images", ("t.png", good[: len(good) * 2 // 3], "image/png"))]}
    r = post(url, "/v1/models/member-a/predict", **payload)
    assert r.status_code == status and message in r.json()["error"], r.text


def test_framework_refusals_use_the_same_error_shape(url):
    r = get(url, "/v3/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = get(url, "/v2/models/member-a/infer")
    assert r.status_code == 405 and "error" in r.json()
    many = [("images", (f"{i}.png", b"x", "image/png")) for i in range(40)]
    r = post(url, "/v1/models/member-a/predict", files=many)
    assert r.status_code == 400 and "Too many files" in r.json()["error"]


def test_deadline_header_gives_504_and_bad_header_400(url):
    x = np.zeros((1, 1, SIZE, SIZE), np.float32)
    r = post(url, "/v2/models/member-a/infer", json=tensor_request(x), headers={"X-Request-Timeout": "0.000001"})
    assert r.status_code == 504 and "deadline" in r.json()["error"]
    r = post(url, "/v2/models/member-a/infer", json=tensor_request(x), headers={"X-Request-Timeout": "soon"})
    assert r.status_code == 400


def test_a_failing_batch_fails_its_callers_and_the_service_keeps_serving(url):
    poison = np.full((2, 1, SIZE, SIZE), 5, np.float32)  # 'flaky' fails any batch holding a value >= 2
    r = post(url, "/v2/models/flaky/infer", json=tensor_request(poison), headers={"X-Request-Id": "poison-1"})
    body = r.json()
    assert r.status_code == 500 and body["error"] == "inference on flaky:1 failed for a batch of 2 images"
    assert body["request_id"] == r.headers["X-Request-Id"] == "poison-1"  # the id the log line carries
    clean = np.zeros((2, 1, SIZE, SIZE), np.float32)
    assert post(url, "/v2/models/flaky/infer", json=tensor_request(clean)).status_code == 200
    assert post(url, "/v2/models/member-a/infer", json=tensor_request(clean)).status_code == 200


# ---- batching under concurrency and metrics ------------------------------------------------------
def test_concurrent_requests_are_batched_and_metrics_show_it(url):
    x = np.random.default_rng(7).normal(size=(1, 1, SIZE, SIZE)).astype(np.float32)

    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            rs = await asyncio.gather(*(client.post("/v2/models/member-b/infer", json=tensor_request(x)) for _ in range(48)))
        return rs

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses), {r.status_code: r.text for r in responses}
    text = get(url, "/metrics").text
    assert 'committee_requests_total{endpoint="v2_infer",model="member-b",outcome="ok"}' in text
    count = float(next(l for l in text.splitlines() if l.startswith('committee_batch_size_count{model="member-b:1"}')).split()[-1])
    total = float(next(l for l in text.splitlines() if l.startswith('committee_batch_size_sum{model="member-b:1"}')).split()[-1])
    assert total >= 48 and count < total  # fewer batches than images: some batches held several requests
    for name in ("committee_request_duration_seconds_bucket", "committee_queue_wait_seconds_bucket",
                 "committee_batch_compute_seconds_bucket", "committee_queue_depth", "committee_inflight_requests",
                 "committee_model_ready", "committee_cascade_exits_total"):
        assert name in text, name


# ---- admin reload --------------------------------------------------------------------------------
def test_reload_needs_the_token(url):
    assert post(url, "/v1/admin/reload").status_code == 401
    assert post(url, "/v1/admin/reload", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_new_version_takes_traffic_after_reload(tmp_path):
    from model_store import ModelStore

    store = ModelStore(tmp_path / "store")
    store.publish(fields("m"), linear_model(tmp_path / "v1.onnx", weights(0)))
    with running_server(Settings(store=store.root, admin_token=TOKEN)) as base:
        x = np.random.default_rng(8).normal(size=(1, 1, SIZE, SIZE)).astype(np.float32)
        before = post(base, "/v2/models/m/infer", json=tensor_request(x)).json()
        store.publish(fields("m"), linear_model(tmp_path / "v2.onnx", weights(9)))
        report = post(base, "/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert report["loaded"] == ["m:2"]
        after = post(base, "/v2/models/m/infer", json=tensor_request(x)).json()
        assert (before["model_version"], after["model_version"]) == ("1", "2")
        np.testing.assert_allclose(np.array(after["outputs"][0]["data"]), expected_logits(x, 9)[0], rtol=1e-5, atol=1e-5)


def test_polling_picks_up_new_versions(tmp_path):
    import time

    from model_store import ModelStore

    store = ModelStore(tmp_path / "store")
    store.publish(fields("m"), linear_model(tmp_path / "v1.onnx", weights(0)))
    with running_server(Settings(store=store.root, poll_interval_s=0.1)) as base:
        store.publish(fields("m"), linear_model(tmp_path / "v2.onnx", weights(1)))
        deadline = time.monotonic() + 10
        while get(base, "/v2/models/m").json()["versions"] != ["2"]:
            assert time.monotonic() < deadline, "poller never loaded version 2"
            time.sleep(0.05)


def test_broken_models_are_reported_while_the_rest_serve(tmp_path):
    from model_store import ModelStore

    store = ModelStore(tmp_path / "store")
    store.publish(fields("good"), linear_model(tmp_path / "g.onnx", weights(0)))
    tampered = store.publish(fields("tampered"), linear_model(tmp_path / "t.onnx", weights(1)))
    path = store.artifact_path(tampered)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    (tmp_path / "junk.onnx").write_bytes(b"this is not an onnx graph")
    store.publish(fields("junk"), tmp_path / "junk.onnx")
    with running_server(Settings(store=store.root)) as base:
        ready = get(base, "/v2/health/ready")
        assert ready.status_code == 503
        problems = ready.json()["models"]
        assert set(problems) == {"tampered", "junk"} and "sha256" in problems["tampered"]
        r = post(base, "/v2/models/tampered/infer", json=tensor_request(np.zeros((1, 1, SIZE, SIZE), np.float32)))
        assert r.status_code == 503 and "sha256" in r.json()["error"]
        listed = {m["name"]: m for m in get(base, "/v1/models").json()}
        assert not listed["junk"]["ready"] and "failed to load" in listed["junk"]["reason"]
        assert post(base, "/v2/models/good/infer", json=tensor_request(np.zeros((1, 1, SIZE, SIZE), np.float32))).status_code == 200
        assert 'committee_model_load_failures_total{model="junk"} 1.0' in get(base, "/metrics").text


def test_queue_full_is_503_with_retry_after(tmp_path, store_dir):
    settings = Settings(store=store_dir, models=["member-a"], max_batch_size=1, max_queue_size=1, max_queue_delay_ms=0)
    x = np.zeros((1, 1, SIZE, SIZE), np.float32)
    with running_server(settings) as base:
        async def burst():
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                return await asyncio.gather(*(client.post("/v2/models/member-a/infer", json=tensor_request(x)) for _ in range(64)))

        statuses = [r.status_code for r in asyncio.run(burst())]
        refused = [r for r in asyncio.run(burst()) if r.status_code == 503]
    assert set(statuses) <= {200, 503} and 200 in statuses
    assert refused and refused[0].headers["Retry-After"] == "1" and "queued" in refused[0].json()["error"]
