"""The experiment state's failure contract, on real SQLite files and a real PostgreSQL server:
buffering while away, no spinning, rejected rows isolated, retention of ended runs only, label
order and run changes serialised, labels closed with their run."""

from __future__ import annotations

import threading
import time

import pytest

from service.experiments.definition import Arm, Experiment
from service.experiments.state import Database, ExperimentState, Prediction, StateUnavailable
from tests.services import postgresql
from tests.test_experiments import wait_for

EXPERIMENT = Experiment(name="e", arms=[Arm(name="A", variant="a"), Arm(name="B", variant="b")])


def prediction(i: int, run_id: str, top1: int | None = 0) -> Prediction:
    return Prediction(f"r{i}", run_id, "A", "a", 1, i, 1.0, top1, 0.9, time.time())  # type: ignore[arg-type]


def started(db: Database, **kwargs) -> ExperimentState:
    state = ExperimentState(db, **{"retention_s": 86400, "buffer_rows": 1000, **kwargs})
    state.start()
    assert wait_for(lambda: state.up, 10), "the state never connected"
    return state


def count(state: ExperimentState, table: str) -> int:
    return state._call(lambda execute: execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def test_an_unusable_database_buffers_then_drops_counted_and_never_spins(tmp_path):
    (tmp_path / "file").write_text("")  # a file where the database's folder should be: every connect fails
    db = Database(None, tmp_path / "file" / "state.sqlite3")
    attempts = 0
    real_connect = db.connect

    def counted_connect():
        nonlocal attempts
        attempts += 1
        return real_connect()

    db.connect = counted_connect  # type: ignore[method-assign]
    drops: list[tuple[str, int]] = []
    state = ExperimentState(db, 86400, buffer_rows=5, on_drop=lambda reason, n: drops.append((reason, n)))
    state.start()
    time.sleep(2)
    assert 1 <= attempts <= 5, f"{attempts} connection attempts in 2 s: the writer must back off"
    assert [state.record_prediction(prediction(i, "run")) for i in range(8)] == [True] * 5 + [False] * 3
    assert drops == [("buffer_full", 1)] * 3 and state.pending == 5 and not state.up
    with pytest.raises(StateUnavailable, match="unavailable"):
        state.live_runs()  # at once, not after a connect timeout
    state.close(drain_s=0)
    assert ("closing", 5) in drops


def test_rows_the_database_rejects_are_dropped_alone(tmp_path):
    drops: list[tuple[str, int]] = []
    state = started(Database(None, tmp_path / "s.sqlite3"), on_drop=lambda reason, n: drops.append((reason, n)))
    run = state.start_run(EXPERIMENT)
    for i in range(9):
        state.record_prediction(prediction(i, run.run_id, top1=None if i == 4 else 0))  # NOT NULL violated once
    state.flush(10)
    assert count(state, "experiment_predictions") == 8 and drops == [("rejected", 1)] and state.up
    state.close()


def test_retention_deletes_ended_runs_only(tmp_path):
    state = started(Database(None, tmp_path / "s.sqlite3"), retention_s=0.5, expiry_every_s=0.3)
    ended = state.start_run(EXPERIMENT)
    for i in range(5):
        state.record_prediction(prediction(i, ended.run_id))
    state.flush(10)
    state.add_labels([(f"r{i}", ended.run_id, 0) for i in range(5)])
    state.start_run(EXPERIMENT)  # replaces: the first run ends now
    live = state.start_run(Experiment(name="other", arms=[Arm(name="A", variant="a")]))
    for i in range(5, 10):
        state.record_prediction(prediction(i, live.run_id))
    state.flush(10)
    assert wait_for(lambda: count(state, "experiment_predictions") == 5, 10), "the ended run's rows were not deleted"
    assert count(state, "experiment_labels") == 0 and state.find_run("e", ended.run_id) is None
    time.sleep(1)  # the live runs are older than the retention now: still kept
    assert count(state, "experiment_predictions") == 5 and state.find_run("other").live
    state.close()


def test_labels_are_closed_with_their_run(tmp_path):
    state = started(Database(None, tmp_path / "s.sqlite3"))
    run = state.start_run(EXPERIMENT)
    state.record_prediction(prediction(0, run.run_id))
    state.flush(10)
    state.end_run("e", "deleted")
    assert state.add_labels([("r0", run.run_id, 1)]) == (set(), {})  # not inserted, and no earlier label
    state.close()


@pytest.fixture(scope="module")
def postgres_url():
    with postgresql() as url:
        yield url


def test_concurrent_run_changes_on_postgresql_serialise(postgres_url, tmp_path):
    states = [started(Database(postgres_url, tmp_path / "unused")) for _ in range(2)]
    results: list[object] = []
    barrier = threading.Barrier(8)

    def create(state: ExperimentState) -> None:
        barrier.wait()
        try:
            results.append(state.start_run(Experiment(name="race", arms=[Arm(name="A", variant="a")])))
        except Exception as exc:  # what the test must not see
            results.append(exc)

    threads = [threading.Thread(target=create, args=(states[i % 2],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(not isinstance(r, Exception) for r in results), results
    assert [r.experiment.name for r in states[0].live_runs()] == ["race"]
    for state in states:
        state.close()


def test_label_order_is_commit_order_on_postgresql(postgres_url, tmp_path):
    states = [started(Database(postgres_url, tmp_path / "unused")) for _ in range(2)]
    run = states[0].start_run(Experiment(name="order", arms=[Arm(name="A", variant="a")]))
    for i in range(200):
        states[0].record_prediction(Prediction(f"o{i}", run.run_id, "A", "a", 1, i, 1.0, 0, 0.9, time.time()))
    states[0].flush(10)

    def label(state: ExperimentState, ids: range) -> None:
        for i in ids:
            state.add_labels([(f"o{i}", run.run_id, 0)])

    threads = [threading.Thread(target=label, args=(states[j], range(j, 200, 2))) for j in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    rows = states[0]._call(lambda execute: execute(
        "SELECT seq, labelled_at FROM experiment_labels WHERE run_id = %s ORDER BY seq", (run.run_id,)).fetchall())
    assert len(rows) == 200
    times = [at for _, at in rows]
    assert times == sorted(times), "a label committed later got an earlier place in the sequence"
    for state in states:
        state.close()


def test_a_definition_this_version_cannot_read_is_skipped(tmp_path):
    state = started(Database(None, tmp_path / "s.sqlite3"))
    state.start_run(EXPERIMENT)
    state._call(lambda execute: execute(
        "INSERT INTO experiment_runs (run_id, name, definition, source, started_at) VALUES ('x', 'broken', '{\"arms\": 1}', 'admin', 0)"),
        write=True)
    assert [r.experiment.name for r in state.live_runs()] == ["e"]
    state.close()


def test_sqlite_reads_do_not_block_the_writer(tmp_path):
    """A long read (a report over a big run) holds no write lock: the writer commits meanwhile."""
    state = started(Database(None, tmp_path / "s.sqlite3", connect_timeout_s=0.5))
    run = state.start_run(EXPERIMENT)
    reading = threading.Event()
    release = threading.Event()

    def slow_read(execute):
        execute("SELECT COUNT(*) FROM experiment_predictions").fetchone()
        reading.set()
        release.wait(5)

    reader = threading.Thread(target=state._call, args=(slow_read,))
    reader.start()
    assert reading.wait(5)
    for i in range(3):
        state.record_prediction(prediction(i, run.run_id))
    state.flush(3)  # would time out behind a write lock held by the reader
    release.set()
    reader.join(10)
    assert state.up
    state.close()
