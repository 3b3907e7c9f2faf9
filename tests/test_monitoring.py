"""Monitoring against the real thing: Debian's Prometheus scrapes a running committee-serve, and
every query of the Grafana dashboard must return data through Prometheus' HTTP API; promtool checks
the exposition and the alert rules."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.onnx_fixtures import SIZE
from tests.server import get, serving_process
from tests.services import prometheus

MONITORING = Path(__file__).resolve().parents[1] / "k8s" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
RULES = MONITORING / "prometheus-rules.yaml"


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target, with Grafana's $__rate_interval made concrete."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"].replace("$__rate_interval", "1m")) for p in panels for t in p["targets"]]


def promtool() -> str:
    program = shutil.which("promtool")
    if program is None:
        pytest.skip("promtool is not installed (it comes with Debian's prometheus, which make test installs where apt is usable)")
    return program


def png() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE), dtype=np.uint8), "L").save(out, "PNG")
    return out.getvalue()


def traffic(base: str) -> None:
    """Enough of everything that each dashboard panel has a series: variants, a cascade, refusals,
    errors, SLO routing, an experiment with a shadow and feedback."""
    files = {"images": ("x.png", png(), "image/png")}
    with httpx.Client(base_url=base, timeout=30) as client:
        for i in range(6):
            client.post("/v1/models/ensemble/predict", files=files)
            client.post("/v1/models/cascade/predict", files=files)
            client.post("/v1/predict", params={"max_latency_ms": 50}, files=files)
            client.post("/v1/models/no-such-model/predict", files=files)  # unrouted 404
            client.post("/v1/models/member-a/predict", content=b"not an image", headers={"Content-Type": "image/png"})
            r = client.post("/v1/experiments/ab/predict", files=files, headers={"X-Experiment-Key": f"user-{i}"})
            client.post("/v1/feedback", json={"feedback": [{"request_id": r.json()["request_id"], "label": i % 3}]})
            time.sleep(0.5)


def test_every_dashboard_query_returns_data_from_a_real_prometheus(store_dir, tmp_path):
    experiments = tmp_path / "ab.toml"
    experiments.write_text('[[experiments]]\nname = "ab"\narms = [{ name = "A", variant = "ensemble" }, '
                           '{ name = "B", variant = "member-a" }]\nshadow = "member-b"\n')
    env = {"COMMITTEE_EXPERIMENTS_FILE": str(experiments), "COMMITTEE_CALIBRATION_SECONDS": "0.2"}
    with serving_process(store_dir, env=env) as (base, _):
        target = base.removeprefix("http://")
        with prometheus([target], tmp_path, rules=RULES) as prom:
            traffic(base)
            missing: list[str] = []
            deadline = time.monotonic() + 30
            while True:  # a few scrapes must see the counters move before rate() has a value
                missing = []
                for title, query in dashboard_queries():
                    r = httpx.get(prom + "/api/v1/query", params={"query": query}, timeout=10).json()
                    assert r["status"] == "success", (title, r)
                    if not r["data"]["result"]:
                        missing.append(title)
                if not missing or time.monotonic() > deadline:
                    break
                traffic(base)
            rules = httpx.get(prom + "/api/v1/rules", timeout=10).json()["data"]["groups"][0]["rules"]
        exposition = get(base, "/metrics").text
    assert not missing, f"dashboard panels without data: {missing}"
    assert {r["name"] for r in rules} == {"CommitteeHighErrorRate", "CommitteeP99OverBudget", "CommitteeModelNotReady",
                                          "CommitteeExperimentStateDown"}
    assert all(r["health"] == "ok" for r in rules), rules
    check = subprocess.run([promtool(), "check", "metrics"], input=exposition, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_alert_rules_pass_promtool():
    check = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0 and "SUCCESS: 4 rules found" in check.stdout, check.stdout + check.stderr


def test_the_dashboard_covers_what_operators_watch():
    titles = " | ".join(title for title, _ in dashboard_queries())
    for needed in ("p50 / p95 / p99", "Requests per second", "Error rate", "batch size", "Queue depth",
                   "Cascade exits", "SLO routing", "Experiment assignments", "Shadow", "Online accuracy"):
        assert needed in titles, needed
    datasources = (MONITORING / "grafana" / "datasources" / "committee.yaml").read_text()
    providers = (MONITORING / "grafana" / "dashboards" / "committee.yaml").read_text()
    assert "type: prometheus" in datasources and "dashboards/committee" in providers
