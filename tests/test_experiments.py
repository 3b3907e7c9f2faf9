"""A/B experiments end to end over real HTTP, against SQLite and a real PostgreSQL server."""

from __future__ import annotations

import io
import statistics
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from model_store import ModelStore
from service.config import Settings
from tests.onnx_fixtures import LABELS, SIZE, fields, linear_model, slow_model, weights
from tests.server import get, post, running_server, serving_process
from tests.services import postgresql

TOKEN = "s3cret"


def png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (SIZE, SIZE), dtype=np.uint8), "L").save(out, "PNG")
    return out.getvalue()


def experiments_file(tmp_path, shadow: str | None = "member-b", name: str = "ab") -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""
[[experiments]]
name = "{name}"
arms = [{{ name = "A", variant = "ensemble" }}, {{ name = "B", variant = "member-a" }}]
{f'shadow = "{shadow}"' if shadow else ''}
min_samples = 5
""")
    return str(path)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request):
    if request.param == "sqlite":
        yield None
    else:
        with postgresql() as url:
            yield url


def predict(base: str, experiment: str, key: str | None, seed: int = 0) -> httpx.Response:
    headers = {"X-Experiment-Key": key} if key else {}
    return post(base, f"/v1/experiments/{experiment}/predict", files={"images": ("x.png", png(seed), "image/png")}, headers=headers)


def wait_for(check, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_experiment_assigns_sticky_records_joins_feedback_reports_and_survives_a_restart(store_dir, tmp_path, database_url):
    settings = Settings(store=store_dir, experiments_file=experiments_file(tmp_path), state_dir=tmp_path / "state",
                        database_url=database_url, calibrate=False)
    with running_server(settings) as base:
        first = predict(base, "ab", "user-1")
        assert first.status_code == 200, first.text
        arm = first.json()["arm"]
        assert first.headers["x-experiment-arm"] == arm and first.json()["model"] == {"A": "ensemble", "B": "member-a"}[arm]
        assert {predict(base, "ab", "user-1").json()["arm"] for _ in range(3)} == {arm}  # sticky
        answers = [predict(base, "ab", f"user-{i}", seed=i).json() for i in range(40)]
        assert {a["arm"] for a in answers} == {"A", "B"}
        truth = {a["request_id"]: LABELS[i % 3] for i, a in enumerate(answers)}
        r = post(base, "/v1/feedback", json={"feedback": [{"request_id": rid, "label": label} for rid, label in truth.items()]
                                              + [{"request_id": "no-such-id", "label": 0},
                                                 {"request_id": answers[0]["request_id"], "label": "hexagon"}]})
        assert r.status_code == 200 and r.json()["recorded"] == 40
        assert [x["status"] for x in r.json()["results"][-2:]] == ["unknown request id", f"unknown label 'hexagon'; labels are {LABELS}"]
        assert post(base, "/v1/feedback", json={"feedback": []}).status_code == 400
        # the shadow (member-b) ran behind the answers: every pair arrives
        report = wait_for(lambda: (rep := get(base, "/v1/experiments/ab").json())["paired"]["pairs"] >= 44 and rep)
        arms = {a["arm"]: a for a in report["arms"]}
        assert sum(a["requests"] for a in arms.values()) == 44 and sum(a["labelled"] for a in arms.values()) == 40
        correct = sum(a["predictions"][0]["label"] == truth[a["request_id"]] for a in answers)
        assert sum(a["correct"] for a in arms.values()) == correct
        assert report["comparison"]["method"].startswith("mSPRT") and report["paired"]["labelled_pairs"] == 40
        metrics = get(base, "/metrics").text
        assert 'committee_experiment_assignments_total{arm="A",experiment="ab"}' in metrics
        assert 'committee_shadow_runs_total{experiment="ab",outcome="done"} 44.0' in metrics
        assert 'committee_feedback_total{arm=' in metrics
    with running_server(settings) as base:  # a restart keeps everything
        again = get(base, "/v1/experiments/ab").json()
        assert again["arms"] == report["arms"] and again["paired"] == report["paired"]


def test_unknown_experiments_and_bad_definitions_get_clear_errors(store_dir, tmp_path):
    settings = Settings(store=store_dir, state_dir=tmp_path / "state", admin_token=TOKEN, calibrate=False)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with running_server(settings) as base:
        r = predict(base, "nope", "k")
        assert r.status_code == 404 and "experiment 'nope' does not exist" in r.json()["error"]
        assert get(base, "/v1/experiments/nope").status_code == 404
        assert post(base, "/v1/admin/experiments", json={"name": "x", "arms": []}, headers=auth).status_code == 400
        assert post(base, "/v1/admin/experiments", json={"name": "x", "arms": [{"name": "A", "variant": "member-a"}]}).status_code == 401
        created = post(base, "/v1/admin/experiments", headers=auth,
                       json={"name": "made", "arms": [{"name": "A", "variant": "member-a"}, {"name": "B", "variant": "cascade"}]})
        assert created.status_code == 201 and [e["name"] for e in get(base, "/v1/experiments").json()] == ["made"]
        assert predict(base, "made", "k").status_code == 200
        assert httpx.delete(base + "/v1/admin/experiments/made", headers=auth).status_code == 204
        assert predict(base, "made", "k").status_code == 404


def test_two_replicas_share_one_postgresql(store_dir, tmp_path):
    """A prediction served by one replica and its feedback posted to the other join; an experiment
    created through one replica serves on the other."""
    with postgresql() as url:
        env = {"COMMITTEE_DATABASE_URL": url, "COMMITTEE_ADMIN_TOKEN": TOKEN, "COMMITTEE_CALIBRATE": "false"}
        with serving_process(store_dir, env=env) as (one, _), serving_process(store_dir, env=env) as (two, _):
            created = post(one, "/v1/admin/experiments", headers={"Authorization": f"Bearer {TOKEN}"},
                           json={"name": "shared", "arms": [{"name": "A", "variant": "member-a"}, {"name": "B", "variant": "member-b"}]})
            assert created.status_code == 201
            answer = predict(two, "shared", "user-7")  # created on one, served by two
            assert answer.status_code == 200, answer.text
            r = post(one, "/v1/feedback", json={"feedback": [{"request_id": answer.json()["request_id"], "label": 1}]})
            assert r.json()["recorded"] == 1
            report = get(two, "/v1/experiments/shared").json()
            arm = next(a for a in report["arms"] if a["arm"] == answer.json()["arm"])
            assert (arm["requests"], arm["labelled"], arm["correct"]) == (1, 1, int(answer.json()["predictions"][0]["label"] == LABELS[1]))


def test_the_shadow_never_changes_the_primary_answer_nor_delays_it(tmp_path):
    store = ModelStore(tmp_path / "store")
    store.publish(fields("primary"), linear_model(tmp_path / "p.onnx", weights(0)))
    store.publish(fields("heavy"), slow_model(tmp_path / "h.onnx", weights(1), layers=200, width=1024))
    for name, shadow in (("plain", ""), ("shadowed", 'shadow = "heavy"')):
        (tmp_path / f"{name}.toml").write_text(f'[[experiments]]\nname = "{name}"\narms = [{{ name = "A", variant = "primary" }}]\n{shadow}\n')
    combined = tmp_path / "both.toml"
    combined.write_text((tmp_path / "plain.toml").read_text() + (tmp_path / "shadowed.toml").read_text())
    flags = ("--intra-op-threads", "1", "--no-calibrate")
    with serving_process(store.root, *flags, env={"COMMITTEE_EXPERIMENTS_FILE": str(combined),
                                                  "COMMITTEE_SHADOW_QUEUE_SIZE": "1"}) as (base, _):
        def timed(experiment: str) -> tuple[list[float], list[list]]:
            times, answers = [], []
            with httpx.Client(base_url=base, timeout=30) as client:
                for i in range(40):
                    t = time.perf_counter()
                    r = client.post(f"/v1/experiments/{experiment}/predict", files={"images": ("x.png", png(i % 5), "image/png")},
                                    headers={"X-Experiment-Key": "same"})
                    times.append(time.perf_counter() - t)
                    answers.append(r.json()["predictions"])
            return times, answers

        timed("plain")  # warm
        plain_t, plain = timed("plain")
        shadow_t, shadowed = timed("shadowed")
        metrics = get(base, "/metrics").text
    assert plain == shadowed  # the same answers, to the last probability
    p_plain, p_shadow = statistics.median(plain_t), statistics.median(shadow_t)
    assert p_shadow <= 1.5 * p_plain + 0.003, (p_plain, p_shadow)
    dropped = float(metrics.split('committee_shadow_runs_total{experiment="shadowed",outcome="dropped"} ')[1].split()[0])
    assert dropped > 0  # the heavy shadow could not keep up: its work was dropped, not queued in front of anyone
