"""Admission by expected completion: the pure rules (``service/admission.py``) and the outermost
middleware that refuses overload before the app spends anything on it (``service/shedding.py``)."""

from __future__ import annotations

import asyncio

import pytest

from service.admission import ServerLoad, judge
from service.shedding import EarlyShed


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_judge_admits_what_fits_and_refuses_with_the_backlog_as_retry_after():
    assert judge(0, 1, 0.1, 1, time_left_s=0.01) is None  # nothing ahead: its own compute, no refusal saves it
    assert judge(5, 1, None, 1, time_left_s=0.01) is None  # throughput unmeasured
    assert judge(40, 1, 0.1, 1, time_left_s=4.2) is None  # 4.1 s of work fits 4.2 s
    refusal = judge(40, 1, 0.1, 2, time_left_s=1.0)  # two instances: 2.05 s
    assert refusal is not None and refusal.wait_s == pytest.approx(2.05) and refusal.retry_after_s == 2
    assert judge(1, 1, 0.1, 1, time_left_s=10.0, cap_s=0.1) is not None  # the operator's cap


def test_server_load_estimates_the_wait_from_departures_in_busy_periods_only():
    clock = Clock()
    load = ServerLoad(weight=0.5, clock=clock)
    arrivals = [load.arrived() for _ in range(4)]
    for at in arrivals:  # one leaves every 10 ms
        clock.now += 0.010
        load.departed(at)
    assert load.seconds_per_request == pytest.approx(0.010)
    clock.now += 60  # idle for a minute: not a gap between departures
    at = load.arrived()
    clock.now += 0.010
    load.departed(at)
    assert load.seconds_per_request == pytest.approx(0.010)
    load.arrived()  # an upload that takes a minute while others come and go
    for _ in range(3):
        clock.now += 5.0
        at = load.arrived()
        clock.now += 0.010
        load.departed(at)
    clock.now += 45.0
    load.departed(clock.now - 0.010)  # its body in 10 ms ago: its minute is the client's, not work
    assert load.seconds_per_request == pytest.approx(0.010)
    load.seconds_per_request = 0.010
    for _ in range(20):
        load.arrived()
    assert load.expected_completion_s() == pytest.approx(0.21)  # 20 ahead and itself
    assert load.judge(0.5) is None
    refused = load.judge(0.1)
    assert refused is not None and refused.retry_after_s == 1
    assert ServerLoad().judge(0.0) is None  # an idle server admits everything


def test_a_request_alone_teaches_nothing_of_the_rate_a_queue_clears_at():
    """One client's one-second requests, one at a time: their run time is not a backlog, and a
    light request beside one is admitted."""
    clock = Clock()
    load = ServerLoad(weight=0.5, clock=clock)
    for _ in range(5):
        at = load.arrived()
        clock.now += 1.0
        load.departed(at)
    assert load.seconds_per_request is None
    load.arrived()  # the heavy one runs
    assert load.judge(0.05) is None


def _call(app, path: str, headers: list[tuple[bytes, bytes]] = (), query: bytes = b"") -> tuple[int, dict, bool]:
    reached = []

    async def downstream(scope, receive, send):
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        raise AssertionError("the body must not be read")

    scope = {"type": "http", "method": "POST", "path": path, "query_string": query, "headers": list(headers)}
    app.app = downstream
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], dict(sent[0]["headers"]), bool(reached)


def test_overload_is_refused_before_the_app_from_path_query_and_headers_only():
    load = ServerLoad()
    for _ in range(50):
        load.arrived()
    load.seconds_per_request = 0.01  # 0.5 s of backlog
    refused = []
    shed = EarlyShed(None, lambda: load, default_timeout_s=10.0, refused=lambda: refused.append(1))  # type: ignore[arg-type]
    assert _call(shed, "/v1/models/m/predict")[0] == 200  # 10 s deadline: it fits
    status, headers, reached = _call(shed, "/v1/models/m/predict", [(b"x-request-timeout", b"0.2")])
    assert (status, reached, headers[b"retry-after"]) == (503, False, b"1") and b"x-request-id" in headers
    assert _call(shed, "/v1/predict", query=b"max_latency_ms=100")[0] == 503  # the SLO route's budget
    assert _call(shed, "/v1/predict", [(b"x-max-latency-ms", b"100")])[0] == 503
    assert _call(shed, "/v1/models/m/predict", query=b"max_latency_ms=100")[0] == 200  # a budget only routes
    assert _call(shed, "/v1/predict", [(b"x-request-timeout", b"nonsense")])[0] == 200  # the app says what is wrong
    assert _call(shed, "/v2/models/m/ready", [(b"x-request-timeout", b"0.2")])[0] == 200  # not inference
    # read as the app reads it: the first of repeated headers, the last of repeated query parameters
    assert _call(shed, "/v1/models/m/predict", [(b"x-request-timeout", b"20"), (b"x-request-timeout", b"0.2")])[0] == 200
    assert _call(shed, "/v1/predict", query=b"max_latency_ms=100&max_latency_ms=")[0] == 200  # the app says 422
    assert len(refused) == 3


def test_what_the_estimate_missed_is_learnt_and_fades():
    clock = Clock()
    load = ServerLoad(weight=0.5, correction_half_life_s=5.0, clock=clock)
    first = load.arrived()
    load.arrived()
    clock.now += 0.01
    load.departed(first)  # 10 ms a request; one in flight
    assert load.expected_completion_s() == pytest.approx(0.02)
    for _ in range(30):  # the loop is busy with other work: every request takes 40 ms more
        load.learn(load.expected_completion_s(counted=True), load.expected_completion_s(counted=True) - load.correction() + 0.04)
    assert load.correction() == pytest.approx(0.04, rel=1e-3)  # all of the miss, not half of it
    assert load.judge(0.03) is not None
    clock.now += 5.0
    assert load.correction() == pytest.approx(0.02, rel=1e-3)  # half of it after one half-life
    load.learn(0.0, 3600.0)  # a request that took an hour teaches at most max_miss_s
    assert load.correction() < 0.02 + 0.5 * 1.0 + 1e-9
