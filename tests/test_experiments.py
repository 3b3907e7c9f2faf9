"""A/B experiments end to end over real HTTP, against SQLite and a real PostgreSQL server: assignment,
recording, append-only feedback, reports, runs and versions, and what an attacker can and cannot do."""

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
from service.experiments.definition import Arm, Experiment
from service.experiments.manager import key_digest
from service.experiments.state import Database, ExperimentState, Prediction
from tests.onnx_fixtures import LABELS, SIZE, fields, linear_model, slow_model, weights
from tests.server import get, post, running_server, serving_process
from tests.services import postgresql

TOKEN = "s3cret"
FEEDBACK_TOKEN = "label-writer"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
WRITER = {"Authorization": f"Bearer {FEEDBACK_TOKEN}"}


def png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (SIZE, SIZE), dtype=np.uint8), "L").save(out, "PNG")
    return out.getvalue()


def experiments_file(tmp_path, shadow: str | None = "member-b", name: str = "ab", extra: str = "") -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""
[[experiments]]
name = "{name}"
arms = [{{ name = "A", variant = "ensemble" }}, {{ name = "B", variant = "member-a" }}]
{f'shadow = "{shadow}"' if shadow else ''}
{extra}
""")
    return str(path)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request):
    if request.param == "sqlite":
        yield None
    else:
        with postgresql() as url:
            yield url


def settings_for(store, tmp_path, **overrides) -> Settings:
    fields_ = {"store": store, "state_dir": tmp_path / "state", "calibrate": False, "admin_token": TOKEN,
               "feedback_token": FEEDBACK_TOKEN, "experiment_refresh_s": 0.5, "report_cache_s": 0}
    return Settings(**{**fields_, **overrides})


def predict(base: str, experiment: str, key: str | None, seed: int = 0) -> httpx.Response:
    headers = {"X-Experiment-Key": key} if key else {}
    return post(base, f"/v1/experiments/{experiment}/predict", files={"images": ("x.png", png(seed), "image/png")}, headers=headers)


def label(base: str, items: list[tuple[str, str | int]], headers: dict | None = WRITER) -> httpx.Response:
    return post(base, "/v1/feedback", json={"feedback": [{"request_id": r, "label": v} for r, v in items]}, headers=headers)


def wait_for(check, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def create(base: str, definition: dict) -> httpx.Response:
    return post(base, "/v1/admin/experiments", json=definition, headers=ADMIN)


def test_experiment_assigns_sticky_records_joins_feedback_reports_and_survives_a_restart(store_dir, tmp_path, database_url):
    settings = settings_for(store_dir, tmp_path, experiments_file=experiments_file(tmp_path), database_url=database_url)
    with running_server(settings) as base:
        first = wait_for(lambda: (r := predict(base, "ab", "user-1")).status_code == 200 and r)
        assert first, "the experiment never served"
        arm = first.json()["arm"]
        assert first.headers["x-experiment-arm"] == arm and first.json()["model"] == {"A": "ensemble", "B": "member-a"}[arm]
        assert {predict(base, "ab", "user-1").json()["arm"] for _ in range(3)} == {arm}  # sticky
        answers = [predict(base, "ab", f"user-{i}", seed=i).json() for i in range(40)]
        assert {a["arm"] for a in answers} == {"A", "B"}
        # the shadow (member-b) runs behind the answers, per arm: every pair arrives
        pairs = lambda rep: sum(p["pairs"] for p in rep["paired"])  # noqa: E731
        assert wait_for(lambda: pairs(get(base, "/v1/experiments/ab").json()) >= 44)
        truth = {a["request_id"]: LABELS[i % 3] for i, a in enumerate(answers)}
        r = label(base, list(truth.items()) + [("no-such-id", 0), (answers[0]["request_id"], "hexagon")])
        assert r.status_code == 200 and r.json()["recorded"] == 40
        assert [x["status"] for x in r.json()["results"][-2:]] == ["unknown request id", f"unknown label 'hexagon'; labels are {LABELS}"]
        assert label(base, []).status_code == 400
        report = get(base, "/v1/experiments/ab").json()
        arms = {a["arm"]: a for a in report["arms"]}
        assert sum(a["requests"] for a in arms.values()) == 44 and sum(a["labelled"] for a in arms.values()) == 40
        correct = sum(a["predictions"][0]["label"] == truth[a["request_id"]] for a in answers)
        assert sum(a["correct"] for a in arms.values()) == correct
        assert [(p["arm"], p["primary"]) for p in report["paired"]] == [("A", "ensemble"), ("B", "member-a")]
        assert sum(p["labelled_pairs"] for p in report["paired"]) == 40
        assert report["sample_ratio"]["keys"] == [arms["A"]["keys"], arms["B"]["keys"]]
        assert report["run"]["live"] is True and report["arms"][0]["version"] == 1
        metrics = get(base, "/metrics").text
        assert 'committee_experiment_assignments_total{arm="A",experiment="ab"}' in metrics
        assert 'committee_shadow_runs_total{experiment="ab",outcome="done"} 44.0' in metrics
        assert 'committee_requests_total{endpoint="shadow",model="member-b",outcome="ok"} 44.0' in metrics
        assert 'committee_feedback_total{arm=' in metrics and "committee_experiment_state_up 1.0" in metrics
    with running_server(settings) as base:  # a restart keeps everything, and the file does not start a new run
        again = wait_for(lambda: (r := get(base, "/v1/experiments/ab")).status_code == 200 and r.json())
        assert again["run"] == report["run"] and again["arms"] == report["arms"] and again["paired"] == report["paired"]


def test_request_ids_of_experiment_answers_are_the_servers_not_the_clients(store_dir, tmp_path):
    with running_server(settings_for(store_dir, tmp_path, experiments_file=experiments_file(tmp_path))) as base:
        wait_for(lambda: predict(base, "ab", "k").status_code == 200)
        headers = {"X-Request-Id": "chosen-by-client", "X-Experiment-Key": "k"}
        answers = [post(base, "/v1/experiments/ab/predict", files={"images": ("x.png", png(1), "image/png")}, headers=headers)
                   for _ in range(2)]
        ids = [a.json()["request_id"] for a in answers]
        assert len(set(ids)) == 2 and "chosen-by-client" not in ids
        assert all(a.headers["x-request-id"] == "chosen-by-client" for a in answers)  # still the correlation id


# ---- an attacker's checks ---------------------------------------------------------------------------
def test_a_second_label_changes_nothing_and_says_so(store_dir, tmp_path):
    with running_server(settings_for(store_dir, tmp_path, experiments_file=experiments_file(tmp_path, shadow=None))) as base:
        wait_for(lambda: predict(base, "ab", "k").status_code == 200)
        answers = [predict(base, "ab", f"user-{i}", seed=i).json()["request_id"] for i in range(10)]
        assert label(base, [(rid, 0) for rid in answers]).json()["recorded"] == 10
        before = get(base, "/v1/experiments/ab").json()
        same = label(base, [(answers[0], 0)])  # a client retrying after a lost answer: no error, no change
        assert same.status_code == 200 and same.json()["results"][0]["status"] == "already labelled"
        flipped = label(base, [(rid, 1) for rid in answers])
        assert flipped.status_code == 422
        assert {r["status"] for r in flipped.json()["results"]} == {"already labelled with 0; the first label stands"}
        assert get(base, "/v1/experiments/ab").json()["arms"] == before["arms"]


def test_feedback_needs_the_credential_when_one_is_set(store_dir, tmp_path):
    with running_server(settings_for(store_dir, tmp_path, experiments_file=experiments_file(tmp_path, shadow=None))) as base:
        rid = wait_for(lambda: (r := predict(base, "ab", "k")).status_code == 200 and r.json()["request_id"])
        for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": FEEDBACK_TOKEN}):
            r = label(base, [(rid, 0)], headers=headers)
            assert r.status_code == 401 and r.json() == {"error": "missing or wrong bearer token"}
        assert label(base, [(rid, 0)]).json()["recorded"] == 1


def test_feedback_of_only_unknown_ids_or_labels_is_refused_with_the_reasons(store_dir, tmp_path):
    with running_server(settings_for(store_dir, tmp_path, experiments_file=experiments_file(tmp_path, shadow=None))) as base:
        rid = wait_for(lambda: (r := predict(base, "ab", "k")).status_code == 200 and r.json()["request_id"])
        r = label(base, [("no-such-id", 0), (rid, "hexagon"), (rid, 7)])
        assert r.status_code == 422 and r.json()["error"].startswith("no label was recorded: unknown request id")
        assert [x["status"] for x in r.json()["results"]] == [
            "unknown request id", f"unknown label 'hexagon'; labels are {LABELS}", "unknown label index 7 (the model has 3 classes)"]


def test_labels_match_class_names_in_any_case(store_dir, tmp_path):
    with running_server(settings_for(store_dir, tmp_path, experiments_file=experiments_file(tmp_path, shadow=None))) as base:
        rid = wait_for(lambda: (r := predict(base, "ab", "k")).status_code == 200 and r.json()["request_id"])
        r = label(base, [(rid, LABELS[2].upper())])  # "TRIANGLE", as "Sneaker" is written for "sneaker"
        assert r.status_code == 200 and r.json()["recorded"] == 1


def test_a_key_header_may_not_name_a_credential_header(store_dir, tmp_path):
    for header in ("Authorization", "cookie", "Proxy-Authorization"):
        with pytest.raises(ValueError, match="credential header"):
            Experiment(name="x", arms=[Arm(name="A", variant="member-a")], key_header=header)
    with running_server(settings_for(store_dir, tmp_path)) as base:
        r = create(base, {"name": "x", "arms": [{"name": "A", "variant": "member-a"}], "key_header": "Authorization"})
        assert r.status_code == 400 and "credential header" in r.json()["error"]


def test_a_report_over_100k_outcomes_answers_within_a_second(store_dir, tmp_path):
    experiment = Experiment(name="big", arms=[Arm(name="A", variant="member-a"), Arm(name="B", variant="member-b")],
                            shadow="cascade")
    state = ExperimentState(Database(None, tmp_path / "state" / "experiments.sqlite3"), 86400, buffer_rows=200_000, batch=5000)
    state.start()
    run = state_ready(state).start_run(experiment)
    rng = np.random.default_rng(0)
    n, now = 100_000, time.time()
    keys = rng.integers(0, 20_000, n)
    for i in range(n):
        arm = experiment.assign(f"user-{keys[i]}", run.run_id)
        state.record_prediction(Prediction(f"r{i}", run.run_id, arm.name, arm.variant, 1, key_digest(f"user-{keys[i]}"), 3.0,
                                           int(rng.integers(3)), 0.9, now + i * 1e-3))
    state.flush(120)
    state.add_labels([(f"r{i}", run.run_id, int(rng.integers(3))) for i in range(n)])
    state.close()
    with running_server(settings_for(store_dir, tmp_path)) as base:
        wait_for(lambda: get(base, "/v1/experiments").status_code == 200)
        started = time.perf_counter()
        r = get(base, "/v1/experiments/big")
        elapsed = time.perf_counter() - started
    assert r.status_code == 200 and sum(a["labelled"] for a in r.json()["arms"]) == n
    assert elapsed < 1.0, f"a report over {n} outcomes took {elapsed:.2f} s"


def state_ready(state: ExperimentState) -> ExperimentState:
    assert wait_for(lambda: state.up, 10), "the state never connected"
    return state


# ---- runs, versions, deletes ------------------------------------------------------------------------
def test_a_replaced_experiment_starts_a_new_run_and_its_report_counts_only_that_run(store_dir, tmp_path):
    definition = {"name": "swap", "arms": [{"name": "A", "variant": "member-a"}, {"name": "B", "variant": "member-b"}]}
    with running_server(settings_for(store_dir, tmp_path)) as base:
        first = wait_for(lambda: (r := create(base, definition)).status_code == 201 and r.json())
        for i in range(30):
            predict(base, "swap", f"u{i}")
        definition["arms"][0]["variant"] = "cascade"
        second = create(base, definition).json()
        assert second["run_id"] != first["run_id"]
        for i in range(5):
            predict(base, "swap", f"v{i}")
        report = get(base, "/v1/experiments/swap").json()
        assert report["run"]["run_id"] == second["run_id"] and sum(a["requests"] for a in report["arms"]) == 5
        assert report["arms"][0]["variant"] == "cascade"
        old = get(base, f"/v1/experiments/swap?run={first['run_id']}").json()
        assert sum(a["requests"] for a in old["arms"]) == 30 and old["run"]["end_reason"] == "replaced"


def test_a_deleted_experiments_report_stays_readable(store_dir, tmp_path):
    definition = {"name": "gone", "arms": [{"name": "A", "variant": "member-a"}, {"name": "B", "variant": "member-b"}]}
    with running_server(settings_for(store_dir, tmp_path)) as base:
        wait_for(lambda: create(base, definition).status_code == 201)
        rids = [predict(base, "gone", f"u{i}").json()["request_id"] for i in range(6)]
        label(base, [(r, 1) for r in rids])
        assert httpx.delete(base + "/v1/admin/experiments/gone", headers=ADMIN).status_code == 204
        assert predict(base, "gone", "u1").status_code == 404
        report = get(base, "/v1/experiments/gone")
        assert report.status_code == 200 and report.json()["run"]["live"] is False
        assert sum(a["labelled"] for a in report.json()["arms"]) == 6
        late = label(base, [(rids[0], 2)])  # evidence of an ended run is closed
        assert late.status_code == 422 and "ended" in late.json()["results"][0]["status"]
        assert httpx.delete(base + "/v1/admin/experiments/gone", headers=ADMIN).status_code == 404


def test_a_hot_reload_mid_run_never_pools_two_versions(tmp_path):
    store = ModelStore(tmp_path / "store")
    for name, seed in (("left", 0), ("right", 1)):
        store.publish(fields(name), linear_model(tmp_path / f"{name}.onnx", weights(seed)))
    definition = {"name": "v", "arms": [{"name": "A", "variant": "left"}, {"name": "B", "variant": "right"}]}
    with running_server(settings_for(store.root, tmp_path)) as base:
        wait_for(lambda: create(base, definition).status_code == 201)
        before = [predict(base, "v", f"u{i}", seed=i).json() for i in range(20)]
        label(base, [(a["request_id"], 0) for a in before])
        store.publish(fields("left"), linear_model(tmp_path / "left2.onnx", weights(5)))
        assert post(base, "/v1/admin/reload", headers=ADMIN).status_code == 200
        after = [predict(base, "v", f"u{i}", seed=i).json() for i in range(20)]
        label(base, [(a["request_id"], 0) for a in after])
        arm_a = get(base, "/v1/experiments/v").json()
    left = next(a for a in arm_a["arms"] if a["arm"] == "A")
    on_a = [a for a in before if a["arm"] == "A"]
    assert left["version"] == 2 and left["requests"] == len(on_a) and left["labelled"] == len(on_a)
    # B is compared over the same period: from A's first answer on its new version
    first_a = next(i for i, a in enumerate(after) if a["arm"] == "A")
    right = next(a for a in arm_a["arms"] if a["arm"] == "B")
    assert right["version"] == 1 and right["earlier_versions"] == []
    assert right["requests"] == sum(a["arm"] == "B" for a in after[first_a:])
    assert left["earlier_versions"] == [{"version": 1, "requests": len(on_a), "labelled": len(on_a),
                                         "correct": sum(a["predictions"][0]["label"] == LABELS[0] for a in on_a)}]
    assert any("never pooled" in note for note in arm_a["notes"])


def test_a_record_rate_samples_whole_keys_and_the_report_says_so(store_dir, tmp_path):
    path = experiments_file(tmp_path, shadow=None, extra="record_rate = 0.5")
    with running_server(settings_for(store_dir, tmp_path, experiments_file=path)) as base:
        wait_for(lambda: predict(base, "ab", "k").status_code == 200)
        recorded = {key: predict(base, "ab", key).json()["request_id"] is not None for key in ["k"] + [f"u{i}" for i in range(60)]}
        assert 10 < sum(recorded.values()) < 50
        assert all((predict(base, "ab", key).json()["request_id"] is not None) == kept for key, kept in list(recorded.items())[:10])
        report = get(base, "/v1/experiments/ab").json()
    assert sum(a["keys"] for a in report["arms"]) == sum(recorded.values())  # only sampled keys
    assert any("recording rate 0.5" in note for note in report["notes"])


def test_unknown_experiments_and_bad_definitions_get_clear_errors(store_dir, tmp_path):
    with running_server(settings_for(store_dir, tmp_path)) as base:
        wait_for(lambda: get(base, "/v1/experiments").status_code == 200)
        r = predict(base, "nope", "k")
        assert r.status_code == 404 and "experiment 'nope' does not exist" in r.json()["error"]
        assert get(base, "/v1/experiments/nope").status_code == 404
        assert create(base, {"name": "x", "arms": []}).status_code == 400
        assert post(base, "/v1/admin/experiments", json={"name": "x", "arms": [{"name": "A", "variant": "member-a"}]}).status_code == 401
        created = create(base, {"name": "made", "arms": [{"name": "A", "variant": "member-a"}, {"name": "B", "variant": "cascade"}]})
        assert created.status_code == 201 and [e["name"] for e in get(base, "/v1/experiments").json()] == ["made"]
        assert predict(base, "made", "k").status_code == 200


def test_the_shadow_never_changes_the_primary_answer_nor_delays_it(tmp_path):
    store = ModelStore(tmp_path / "store")
    store.publish(fields("primary"), linear_model(tmp_path / "p.onnx", weights(0)))
    store.publish(fields("heavy"), slow_model(tmp_path / "h.onnx", weights(1), layers=200, width=1024))
    for name, shadow in (("plain", ""), ("shadowed", 'shadow = "heavy"')):
        (tmp_path / f"{name}.toml").write_text(f'[[experiments]]\nname = "{name}"\narms = [{{ name = "A", variant = "primary" }}]\n{shadow}\n')
    combined = tmp_path / "both.toml"
    combined.write_text((tmp_path / "plain.toml").read_text() + (tmp_path / "shadowed.toml").read_text())
    flags = ("--intra-op-threads", "1", "--no-calibrate")
    with serving_process(store.root, *flags, env={"COMMITTEE_EXPERIMENTS_FILE": str(combined), "COMMITTEE_STATE_DIR": str(tmp_path / "s"),
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

        wait_for(lambda: predict(base, "plain", "k").status_code == 200)
        timed("plain")  # warm
        plain_t, plain = timed("plain")
        shadow_t, shadowed = timed("shadowed")
        metrics = get(base, "/metrics").text
    assert plain == shadowed  # the same answers, to the last probability
    p_plain, p_shadow = statistics.median(plain_t), statistics.median(shadow_t)
    assert p_shadow <= 1.5 * p_plain + 0.003, (p_plain, p_shadow)
    dropped = float(metrics.split('committee_shadow_runs_total{experiment="shadowed",outcome="dropped"} ')[1].split()[0])
    assert dropped > 0  # the heavy shadow could not keep up: its work was dropped, not queued in front of anyone


def test_the_shadow_holds_no_more_image_bytes_than_its_budget(store_dir, tmp_path):
    """Each image is bigger than the whole budget: every shadow job is dropped, none is held."""
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8), "L").save(big, "PNG")
    assert len(big.getvalue()) > 1024
    settings = settings_for(store_dir, tmp_path, experiments_file=experiments_file(tmp_path), shadow_max_bytes=1024)
    with running_server(settings) as base:
        wait_for(lambda: predict(base, "ab", "k").status_code == 200)
        for i in range(5):
            post(base, "/v1/experiments/ab/predict", files={"images": ("x.png", big.getvalue(), "image/png")},
                 headers={"X-Experiment-Key": f"u{i}"})
        metrics = get(base, "/metrics").text
    assert 'committee_shadow_runs_total{experiment="ab",outcome="dropped"}' in metrics
    dropped = float(metrics.split('committee_shadow_runs_total{experiment="ab",outcome="dropped"} ')[1].split()[0])
    assert dropped >= 5  # every big job: neither arm is the shadow's variant, so each was offered
