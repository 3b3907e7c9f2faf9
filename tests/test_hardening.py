"""Defects found by review, each pinned by a test that failed on the code before the fix."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import httpx
import numpy as np
import orjson
import pytest
from PIL import Image

from model_store import ModelStore
from service.app import create_app
from service.config import Settings
from service.metrics import ServiceMetrics
from service.registry import Registry
from service.variants import leased
from tests.onnx_fixtures import INPUT, LABELS, SIZE, fields, linear_model, weights
from tests.server import get, post, running_server


def tensor(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


@pytest.fixture(scope="module")
def url(store_dir):
    with running_server(Settings(store=store_dir, max_body_bytes=32 * 1024 * 1024)) as base:
        yield base


def test_unknown_model_names_never_become_metric_labels(url):
    before = get(url, "/metrics").text
    for i in range(50):
        assert post(url, f"/v2/models/made-up-{i}/infer", json={}).status_code == 404
        assert post(url, f"/v1/models/made-up-{i}/predict", json={"images": ["x"]}).status_code == 404
    after = get(url, "/metrics").text
    assert "made-up" not in after
    assert len(after) - len(before) < 2000  # two counters, not 100 new label sets
    assert 'committee_unrouted_requests_total{endpoint="v2_infer",status="404"} 50.0' in after


def test_a_decompression_bomb_is_refused_with_413_from_its_header(url):
    buf = io.BytesIO()
    Image.new("L", (8000, 7500)).save(buf, "PNG", optimize=True)  # 60 megapixels, tens of KB
    started = time.monotonic()
    r = post(url, "/v1/models/member-a/predict", files=[("images", (f"b{i}.png", buf.getvalue(), "image/png")) for i in range(40)])
    assert r.status_code == 413 and "60,000,000 pixels; the limit is 16,777,216 per image" in r.json()["error"]
    assert time.monotonic() - started < 5  # decoding them would take tens of seconds here


def test_a_shape_of_many_dimensions_is_a_400_and_the_connection_stays_usable(url):
    bad = {"inputs": [{"name": "input", "shape": [1] * 65, "datatype": "FP32", "data": [0.0]}]}
    with httpx.Client(base_url=url, timeout=30) as client:  # one keep-alive connection for both
        r = client.post("/v2/models/member-a/infer", json=bad)
        assert r.status_code == 400 and "shape must be [N, 1, 4, 4]" in r.json()["error"]
        assert client.post("/v2/models/member-a/infer", json=tensor(np.zeros((1, 1, SIZE, SIZE), np.float32))).status_code == 200


def test_an_unexpected_error_answers_500_with_a_request_id_and_no_internals(store_dir, caplog):
    app = create_app(Settings(store=store_dir))

    async def explode() -> None:
        raise RuntimeError("secret internal detail /var/lib/store")

    app.add_api_route("/explode", explode)
    with running_server(Settings(store=store_dir), app) as base, httpx.Client(base_url=base, timeout=30) as client:
        r = client.get("/explode")
        assert r.status_code == 500
        assert r.json() == {"error": "internal server error", "request_id": r.headers["X-Request-Id"]}
        assert client.get("/v2/health/live").status_code == 200  # same connection, still serving
    assert any(r.headers["X-Request-Id"] in rec.getMessage() for rec in caplog.records)


def test_big_bodies_are_parsed_off_the_event_loop_and_small_ones_on_it(url, monkeypatch):
    """The parse of a large body runs in a worker thread (the real parser, watched, not replaced);
    a small one stays on the loop, where a thread hop would cost more than the parse."""
    import service.dataplane as dataplane

    threads: list[str] = []
    real = dataplane.decode_request

    def watched(*args):
        threads.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(dataplane, "decode_request", watched)
    x = np.random.default_rng(0).normal(size=(256, 1, SIZE, SIZE)).astype(np.float32)
    pad = orjson.dumps(np.random.default_rng(1).normal(size=1_000_000).round(6).tolist())  # ~10 MB of numbers
    big = orjson.dumps(tensor(x))[:-1] + b', "parameters": {"pad": ' + pad + b"}}"
    assert post(url, "/v2/models/member-a/infer", content=big, headers={"Content-Type": "application/json"}).status_code == 200
    assert post(url, "/v2/models/member-a/infer", json=tensor(x[:1])).status_code == 200
    loop_thread = threads[1]
    assert threads[0] != loop_thread  # a worker of the loop's default executor


def test_a_failed_new_version_leaves_the_old_one_serving_and_the_server_ready(tmp_path):
    store = ModelStore(tmp_path / "store")
    store.publish(fields("m"), linear_model(tmp_path / "a.onnx", weights(0)))
    (tmp_path / "store" / "lost+found").mkdir()  # a stray folder is not a model
    with running_server(Settings(store=store.root, admin_token="t")) as base:
        assert get(base, "/v2/health/ready").status_code == 200
        (tmp_path / "junk.onnx").write_bytes(b"not a graph")
        store.publish(fields("m"), tmp_path / "junk.onnx")
        report = post(base, "/v1/admin/reload", headers={"Authorization": "Bearer t"}).json()
        assert "m" in report["failed"]
        ready = get(base, "/v2/health/ready")
        assert ready.status_code == 200 and "version 2 failed to load" in ready.json()["models"]["m"]
        assert str(tmp_path) not in ready.text  # no filesystem paths for anonymous clients
        status = {m["name"]: m for m in get(base, "/v1/models").json()}["m"]
        assert (status["ready"], status["version"], status["target_version"]) == (True, 1, 2)
        assert post(base, "/v2/models/m/infer", json=tensor(np.zeros((1, 1, SIZE, SIZE), np.float32))).status_code == 200
        assert get(base, "/v2/models/m/ready").status_code == 200


def test_readiness_is_strict_by_default_and_lenient_on_request(tmp_path):
    store = ModelStore(tmp_path / "store")
    store.publish(fields("good"), linear_model(tmp_path / "a.onnx", weights(0)))
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    store.publish(fields("junk"), tmp_path / "junk.onnx")
    for strict, status in ((True, 503), (False, 200)):
        with running_server(Settings(store=store.root, strict_readiness=strict)) as base:
            r = get(base, "/v2/health/ready")
            assert r.status_code == status and "junk" in r.json()["models"] and "good" not in r.json()["models"]


def test_a_replaced_runner_stays_open_while_a_request_holds_it(tmp_path):
    async def main():
        store = ModelStore(tmp_path / "store")
        store.publish(fields("m"), linear_model(tmp_path / "a.onnx", weights(0)))
        registry = Registry(Settings(store=store.root), ServiceMetrics())
        await registry.reload()
        x = np.zeros((1, 1, SIZE, SIZE), np.float32)
        with leased(registry.get("m")) as old:
            store.publish(fields("m"), linear_model(tmp_path / "b.onnx", weights(1)))
            assert (await registry.reload()).loaded == ["m:2"]
            await asyncio.sleep(0.05)
            # a long request (or a cascade's later stage) still reaches its runner after the reload
            result = await old.predict(x, time.monotonic() + 5)
            assert old.manifest.version == 1 and result.logits.shape == (1, 3)
            runner = old.runners[0]
        for _ in range(100):  # returned: the old runner is closed soon after
            if runner.batcher.closing:
                break
            await asyncio.sleep(0.01)
        assert runner.batcher.closing
        await registry.close()

    asyncio.run(main())


def test_a_cascade_whose_stages_take_different_inputs_is_refused_at_load(tmp_path):
    store = ModelStore(tmp_path / "store")
    a = store.publish(fields("a"), linear_model(tmp_path / "a.onnx", weights(0)))
    other_input = {**INPUT, "mean": [0.1]}
    b = store.publish({**fields("b"), "input": other_input}, linear_model(tmp_path / "b.onnx", weights(1)))
    store.publish({"name": "c", "kind": "cascade", "input": INPUT, "labels": LABELS, "composition": {"stages": [
        {"model": a.ref.model_dump(), "threshold": 0.9, "flops_per_image": 1},
        {"model": b.ref.model_dump(), "threshold": None, "flops_per_image": 1}]}})
    with running_server(Settings(store=store.root)) as base:
        r = get(base, "/v2/health/ready")
        assert r.status_code == 503 and "disagree on the input spec" in r.json()["models"]["c"]


def test_a_cascade_follows_its_manifest_combine_rule(tmp_path):
    store = ModelStore(tmp_path / "store")
    a = store.publish(fields("a"), linear_model(tmp_path / "a.onnx", weights(0)))
    b = store.publish(fields("b"), linear_model(tmp_path / "b.onnx", weights(1)))
    stages = [{"model": a.ref.model_dump(), "threshold": 2.0, "flops_per_image": 1},  # never exits at stage 1
              {"model": b.ref.model_dump(), "threshold": None, "flops_per_image": 1}]
    for rule in ("mean_prob", "mean_logit"):
        store.publish({"name": f"c-{rule}", "kind": "cascade", "input": INPUT, "labels": LABELS,
                       "composition": {"stages": stages, "combine": rule}})
    x = np.random.default_rng(1).normal(size=(4, 1, SIZE, SIZE)).astype(np.float32) * 3
    la, lb = (x.reshape(4, -1) @ weights(s) for s in (0, 1))
    pa, pb = (np.exp(v) / np.exp(v).sum(1, keepdims=True) for v in (la, lb))
    expected = {"mean_prob": (pa + pb) / 2, "mean_logit": np.sqrt(pa * pb) / np.sqrt(pa * pb).sum(1, keepdims=True)}
    with running_server(Settings(store=store.root)) as base:
        for rule, probs in expected.items():
            body = post(base, f"/v2/models/c-{rule}/infer", json={**tensor(x), "outputs": [{"name": "probabilities"}]}).json()
            np.testing.assert_allclose(np.array(body["outputs"][0]["data"]).reshape(4, 3), probs, atol=1e-5)


def test_bodies_held_by_the_server_are_bounded_in_bytes_not_only_in_requests(store_dir):
    """A burst that fits its deadline is queued, with its bodies: past COMMITTEE_MAX_INFLIGHT_BODY_BYTES
    a new request is refused (503 + Retry-After) before its body is read; the server serves on."""
    import socket

    settings = Settings(store=store_dir, max_inflight_body_bytes=4096)
    with running_server(settings) as base:
        host, port = base.removeprefix("http://").split(":")
        slow = socket.create_connection((host, int(port)))
        try:  # an upload that declares 3,000 bytes and stalls after 2,500: the server holds what arrived
            slow.sendall(b"POST /v1/models/member-a/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                         b"Content-Length: 3000\r\n\r\n" + b"0" * 2500)
            time.sleep(0.3)
            refused = post(base, "/v1/models/member-a/predict", content=b"0" * 2000, headers={"Content-Type": "image/png"})
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1", refused.text
            assert "bytes of request bodies" in refused.json()["error"]
            assert 'committee_shed_requests_total{model="server",reason="body_bytes"} 1.0' in get(base, "/metrics").text
        finally:
            slow.close()
        time.sleep(0.3)  # the stalled upload's bytes are released when its connection goes
        answered = post(base, "/v1/models/member-a/predict", content=b"0" * 2000, headers={"Content-Type": "image/png"})
        assert answered.status_code != 503, answered.text  # a 4xx for the bad image: the budget is free again
