"""The experiment state under the faults of its real dependency (Debian's PostgreSQL, started by
the tests): stopped under traffic, down at start, two replicas on one database, and a server that
polls its store for a long time. Nothing acknowledged may be lost and inference never stops."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx

from tests.onnx_fixtures import LABELS
from tests.server import ClientLoop, get, post, serving_process
from tests.services import postgresql_server
from tests.test_experiments import ADMIN, FEEDBACK_TOKEN, TOKEN, experiments_file, label, png, predict, wait_for


def env_for(url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"COMMITTEE_DATABASE_URL": url, "COMMITTEE_ADMIN_TOKEN": TOKEN, "COMMITTEE_FEEDBACK_TOKEN": FEEDBACK_TOKEN,
            "COMMITTEE_CALIBRATE": "false", "COMMITTEE_EXPERIMENT_REFRESH_S": "1", "COMMITTEE_REPORT_CACHE_S": "0",
            "COMMITTEE_DATABASE_CONNECT_TIMEOUT_S": "1", "COMMITTEE_STATE_DIR": str(tmp_path / "state"), **extra}


class Traffic(ClientLoop):
    """Named and experiment predictions in a loop on a thread, every answer kept."""

    def __init__(self, base: str) -> None:
        super().__init__(base, pause_s=0.02)
        self.named: list[int] = []
        self.experiment: list[httpx.Response] = []

    def step(self, client: httpx.Client, i: int) -> None:
        files = {"images": ("x.png", png(i % 7), "image/png")}
        self.named.append(client.post("/v1/models/member-a/predict", files=files).status_code)
        self.experiment.append(client.post("/v1/experiments/ab/predict", files=files,
                                           headers={"X-Experiment-Key": f"user-{i % 50}"}))


def test_a_database_outage_under_traffic_fails_no_prediction_and_loses_no_acknowledged_label(store_dir, tmp_path):
    with postgresql_server() as pg, serving_process(
            store_dir, env=env_for(pg.url, tmp_path, COMMITTEE_EXPERIMENTS_FILE=experiments_file(tmp_path))) as (base, _):
        assert wait_for(lambda: predict(base, "ab", "k").status_code == 200)
        acknowledged: set[str] = set()
        with Traffic(base) as traffic:
            time.sleep(1)
            before = [r.json()["request_id"] for r in list(traffic.experiment)]
            r = label(base, [(rid, 1) for rid in before])
            acknowledged |= {x["request_id"] for x in r.json()["results"] if x["status"] == "recorded"}
            pg.stop()
            time.sleep(1)
            during_outage = label(base, [(r.json()["request_id"], 1) for r in list(traffic.experiment)[-3:]])
            report_during = get(base, "/v1/experiments/ab")
            time.sleep(3)  # several seconds of traffic with the database away
            metrics_during = get(base, "/metrics").text
            pg.start()
            time.sleep(1)
        answers = [r for r in traffic.experiment]
        assert traffic.named and set(traffic.named) == {200}, "a named prediction failed"
        assert answers and {r.status_code for r in answers} == {200}, "an experiment prediction failed"
        assert during_outage.status_code == 503 and during_outage.headers["retry-after"]
        assert "experiment database (postgresql) is unavailable" in during_outage.json()["error"]
        assert report_during.status_code == 503
        assert "committee_experiment_state_up 0.0" in metrics_during
        pending = float(metrics_during.split("\ncommittee_experiment_records_pending ")[1].split()[0])
        assert pending > 0  # the answers of the outage were buffered, not written and not dropped
        # after the restart: the buffered answers arrive, and every answer can be labelled once
        rest = [r.json()["request_id"] for r in answers if r.json()["request_id"] not in acknowledged]
        r = wait_for(lambda: (x := label(base, [(rid, 1) for rid in rest])).status_code == 200 and x, timeout=30)
        assert r, "feedback never worked again after the database came back"
        acknowledged |= {x["request_id"] for x in r.json()["results"] if x["status"] == "recorded"}
        assert len(acknowledged) == len(answers)
        report = get(base, "/v1/experiments/ab").json()
        assert sum(a["labelled"] for a in report["arms"]) == len(acknowledged)
        assert sum(a["requests"] for a in report["arms"]) == len(answers) + 1  # + the first, unlabelled, answer
        assert "committee_experiment_records_dropped_total{" not in get(base, "/metrics").text  # no record was lost


def test_a_hung_database_holds_no_request_and_recovers(store_dir, tmp_path):
    """The database stops answering (SIGSTOP: connections open, nothing comes back) under traffic:
    predictions keep flowing, feedback and reports answer 503 within the statement timeout, and
    everything works again once it answers."""
    with postgresql_server() as pg, serving_process(store_dir, env={
            **env_for(pg.url, tmp_path, COMMITTEE_EXPERIMENTS_FILE=experiments_file(tmp_path)),
            "COMMITTEE_DATABASE_STATEMENT_TIMEOUT_S": "2"}) as (base, _):
        assert wait_for(lambda: predict(base, "ab", "k").status_code == 200)
        with Traffic(base) as traffic:
            time.sleep(0.5)
            pg.pause()
            try:
                time.sleep(0.5)
                started = time.monotonic()
                during = label(base, [(r.json()["request_id"], 0) for r in list(traffic.experiment)[-3:]])
                waited = time.monotonic() - started
                report = get(base, "/v1/experiments/ab")
                time.sleep(2)
            finally:
                pg.resume()
            time.sleep(1)
        assert set(traffic.named) == {200} and {r.status_code for r in traffic.experiment} == {200}
        assert during.status_code == 503 and waited < 5, (during.status_code, waited)
        assert report.status_code == 503
        rids = [r.json()["request_id"] for r in traffic.experiment]
        r = wait_for(lambda: (x := label(base, [(rid, 0) for rid in rids])).status_code == 200 and x, timeout=30)
        assert r and r.json()["recorded"] == len(rids)


def test_a_server_started_with_the_database_down_serves_and_its_experiments_work_once_it_is_back(store_dir, tmp_path):
    with postgresql_server() as pg:
        pg.stop()
        with serving_process(store_dir, env=env_for(pg.url, tmp_path, COMMITTEE_EXPERIMENTS_FILE=experiments_file(tmp_path))) as (base, _):
            files = {"images": ("x.png", png(0), "image/png")}
            assert post(base, "/v1/models/member-a/predict", files=files).status_code == 200
            waiting = predict(base, "ab", "k")
            assert waiting.status_code == 503 and "unavailable" in waiting.json()["error"]
            assert get(base, "/v1/experiments").status_code == 503
            pg.start()
            answer = wait_for(lambda: (r := predict(base, "ab", "k")).status_code == 200 and r, timeout=30)
            assert answer, "experiments never started after the database came back"
            r = wait_for(lambda: (x := label(base, [(answer.json()["request_id"], LABELS[0])])).status_code == 200 and x)
            assert r.json()["recorded"] == 1


def test_two_replicas_agree_on_creates_and_deletes_within_5_s(store_dir, tmp_path):
    definition = {"name": "shared", "arms": [{"name": "A", "variant": "member-a"}, {"name": "B", "variant": "member-b"}]}
    with postgresql_server() as pg:
        env = env_for(pg.url, tmp_path, COMMITTEE_EXPERIMENT_REFRESH_S="2")
        with serving_process(store_dir, env=env) as (one, _), serving_process(store_dir, env=env) as (two, _):
            assert wait_for(lambda: get(one, "/v1/experiments").status_code == 200)
            created = post(one, "/v1/admin/experiments", headers=ADMIN, json=definition)
            assert created.status_code == 201
            started = time.monotonic()
            answer = wait_for(lambda: (r := predict(two, "shared", "user-7")).status_code == 200 and r, timeout=10)
            assert answer and time.monotonic() - started <= 5, "the create was not in force on the other replica within 5 s"
            assert [e["run_id"] for e in get(two, "/v1/experiments").json()] == [created.json()["run_id"]]
            r = label(one, [(answer.json()["request_id"], 1)])  # served by two, labelled through one
            assert r.json()["recorded"] == 1
            assert httpx.delete(two + "/v1/admin/experiments/shared", headers=ADMIN).status_code == 204
            started = time.monotonic()
            assert wait_for(lambda: predict(one, "shared", "user-7").status_code == 404, timeout=10)
            assert time.monotonic() - started <= 5, "the delete was not in force on the other replica within 5 s"
            assert get(one, "/v1/experiments").json() == []
            report = get(one, "/v1/experiments/shared").json()
            assert report["run"]["live"] is False and sum(a["labelled"] for a in report["arms"]) == 1


def _threads_and_files(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


def test_store_polling_leaves_threads_and_open_files_flat(store_dir, tmp_path):
    """Polling every 0.2 s for 30 s with experiments on PostgreSQL: no connection, thread or file
    is opened per poll."""
    with postgresql_server() as pg, serving_process(
            store_dir, "--poll-interval-s", "0.2",
            env=env_for(pg.url, tmp_path, COMMITTEE_EXPERIMENTS_FILE=experiments_file(tmp_path))) as (base, proc):
        assert wait_for(lambda: predict(base, "ab", "k").status_code == 200)
        time.sleep(2)
        threads, files = _threads_and_files(proc.pid)
        for i in range(30):
            predict(base, "ab", f"u{i}")
            time.sleep(1)
        threads_after, files_after = _threads_and_files(proc.pid)
    assert threads_after <= threads + 2 and files_after <= files + 2, ((threads, files), (threads_after, files_after))
