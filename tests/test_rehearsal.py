"""A multi-replica rehearsal on this machine: two committee servers on one PostgreSQL (Debian's)
behind a real round-robin reverse proxy (Debian's HAProxy), configured from the settings the
k8s `postgres` overlay gives its pods. One server is SIGKILLed mid-traffic and started again:
nothing acknowledged may be lost, and the report counts every labelled request exactly once."""

from __future__ import annotations

import os
import signal
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from tests.onnx_fixtures import LABELS
from tests.server import ClientLoop, free_port, serving_process
from tests.services import postgresql_server, reverse_proxy
from tests.test_deploy import env_of, one, render, serving
from tests.test_experiment_faults import png

ADMIN, FEEDBACK = "rehearsal-admin", "rehearsal-feedback"


def overlay_environment(database_url: str, store: Path, state: Path) -> tuple[dict[str, str], str]:
    """The environment the `postgres` overlay gives a serving pod (its ConfigMap, then its env
    entries, the Secrets filled with this rehearsal's values; the pod's mounts become local
    folders), and its readiness probe's path."""
    objects = render("k8s/overlays/postgres")
    _, _, container = serving(objects)
    settings = dict(one(objects, "ConfigMap")["data"])
    secrets = {("committee-database", "url"): database_url, ("committee-admin", "token"): ADMIN,
               ("committee-feedback", "token"): FEEDBACK}
    for name, entry in env_of(container).items():
        if "value" in entry:
            settings[name] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            settings[name] = secrets[(ref["name"], ref["key"])]
    assert settings["COMMITTEE_DATABASE_URL"] == database_url, "the postgres overlay must take its database from a Secret"
    settings.update(COMMITTEE_STORE=str(store), COMMITTEE_STATE_DIR=str(state), COMMITTEE_CALIBRATE="false",
                    COMMITTEE_POLL_INTERVAL_S="0")
    return settings, container["readinessProbe"]["httpGet"]["path"]


class Clients(ClientLoop):
    """Experiment predictions and feedback through the proxy on a thread, everything kept."""

    def __init__(self, base: str) -> None:
        super().__init__(base)
        self.answers: list[str] = []  # request ids of answered predictions
        self.failed: list[int] = []  # statuses of failed predictions
        self.acknowledged: set[str] = set()  # labels the service answered "recorded"
        self.labelled_ids: set[str] = set()

    def label(self, client: httpx.Client, ids: list[str]) -> dict[str, str]:
        """Post labels for ``ids``; keep the acknowledged ones; the status of each."""
        r = client.post("/v1/feedback", json={"feedback": [{"request_id": rid, "label": LABELS[1]} for rid in ids]},
                        headers={"Authorization": f"Bearer {FEEDBACK}"})
        statuses = {x["request_id"]: x["status"] for x in r.json().get("results", [])} if r.headers.get(
            "content-type", "").startswith("application/json") else {}
        # "already labelled" (the same label) is ours too: an earlier post committed it but its answer was lost
        self.acknowledged |= {rid for rid, status in statuses.items() if status in ("recorded", "already labelled")}
        self.labelled_ids |= set(ids)
        return statuses

    def step(self, client: httpx.Client, i: int) -> None:
        try:
            r = client.post("/v1/experiments/ab/predict", files={"images": ("x.png", png(i % 7), "image/png")},
                            headers={"X-Experiment-Key": f"user-{i % 40}"})
            (self.answers.append(r.json()["request_id"]) if r.status_code == 200 else self.failed.append(r.status_code))
        except httpx.HTTPError:
            self.failed.append(0)
        if i % 10 == 9:  # label what was answered so far, as users' clicks arrive
            fresh = [rid for rid in self.answers if rid not in self.labelled_ids][:50]
            try:
                self.label(client, fresh)
            except httpx.HTTPError:
                pass


def test_two_replicas_behind_a_proxy_lose_nothing_acknowledged_when_one_is_killed(store_dir, tmp_path):
    with ExitStack() as stack:
        pg = stack.enter_context(postgresql_server())
        env, ready_path = overlay_environment(pg.url, store_dir, tmp_path / "state")
        ports = [free_port(), free_port()]
        replicas = [stack.enter_context(serving_process(store_dir, env=env, port=port)) for port in ports]
        base = stack.enter_context(reverse_proxy([f"127.0.0.1:{p}" for p in ports], health_path=ready_path))
        created = httpx.post(base + "/v1/admin/experiments", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30, json={
            "name": "ab", "arms": [{"name": "A", "variant": "member-a"}, {"name": "B", "variant": "member-b"}]})
        assert created.status_code == 201, created.text
        time.sleep(float(env.get("COMMITTEE_EXPERIMENT_REFRESH_S", "2")) + 1)  # in force on both replicas
        with Clients(base) as clients:
            time.sleep(4)
            before_kill = metrics(replicas[0][0])
            killed = replicas[0][1]
            os.kill(killed.pid, signal.SIGKILL)
            killed.wait(10)
            time.sleep(3)
            restarted = stack.enter_context(serving_process(store_dir, env=env, port=ports[0]))
            time.sleep(4)
            after_restart = metrics(restarted[0])
        # the rest of the labels, once every replica has written what it answered
        with httpx.Client(base_url=base, timeout=30) as client:
            rest = [rid for rid in clients.answers if rid not in clients.acknowledged]
            deadline = time.monotonic() + 90
            while rest and time.monotonic() < deadline:  # ids still "not recorded yet" are asked again
                statuses = clients.label(client, rest)
                rest = [rid for rid in rest if statuses.get(rid, "").startswith("not recorded yet")]
                if rest:
                    time.sleep(2)
            report = client.get("/v1/experiments/ab").json()
        assert restarted[1].poll() is None
    lost = [rid for rid in clients.answers if rid not in clients.acknowledged]
    counted = sum(a["labelled"] for a in report["arms"])
    figures = (f"{len(clients.answers)} answered, {len(clients.failed)} failed {sorted(set(clients.failed))}, "
               f"{len(clients.acknowledged)} labels acknowledged, {counted} counted, {len(lost)} answers never recorded")
    print("rehearsal:", figures)
    assert counted == len(clients.acknowledged), figures  # every acknowledged label ...
    assert counted <= len(clients.labelled_ids), figures  # ... once: no request is counted twice
    assert len(clients.answers) > 100 and len(clients.failed) <= 3, figures  # the proxy retried what never arrived
    assert served(before_kill) > 0 and served(after_restart) > 0, "both lives of the killed replica must have served"
    # answers the killed replica still held in its buffer (and the one in flight) are the only ones without a record
    assert len(lost) <= before_kill["committee_experiment_records_pending"] + 2, figures


def metrics(base: str) -> dict[str, float]:
    """One replica's own /metrics (not through the proxy), unlabelled and experiment-request samples."""
    text = httpx.get(base + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if line.startswith("committee_experiment_records_pending ") or ('endpoint="v1_experiment"' in name and "_total{" in name):
            out[name] = out.get(name, 0.0) + float(value)
    return out


def served(samples: dict[str, float]) -> float:
    return sum(v for k, v in samples.items() if k.startswith("committee_requests_total"))
