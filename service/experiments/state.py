"""Where experiments keep what happened, and what happens while that store is away.

Tables (SQLite by default, PostgreSQL when a database URL is set, so replicas share one truth):
``experiment_runs`` (one row per run of an experiment: a create or replace starts a run, a replace
or delete ends it), ``experiment_predictions`` (one row per recorded answer: run, arm, variant and
its version, assignment key, top-1 and its probability, latency; the shadow's answer joins the same
row) and ``experiment_labels`` (append-only: a request's first label stands; ``seq`` is the order
labels were committed in, which never changes).

Failure contract (psycopg's pool is the model):
- Predictions and shadow results go into a bounded in-memory buffer that one writer thread commits
  in batches. While the database is away the buffer holds them and the writer reconnects with
  exponential backoff (``connect_timeout_s`` per try); a failed batch is retried, never dropped.
  Only a full buffer drops a record, counted on ``/metrics``; the answer itself is never delayed.
- Everything a client is told succeeded (a label "recorded", a run created or ended) is committed
  before the answer: those calls run their own transaction in a worker thread and raise
  ``StateUnavailable`` (503 with Retry-After) when the database cannot be reached.
- Retention deletes the rows of runs that ended more than ``retention_s`` ago; a live run's
  evidence is never deleted.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..errors import ServiceError
from .definition import Experiment

log = logging.getLogger("committee.experiments")

RETRY_AFTER_S = 5
EXPIRY_EVERY_S = 600.0


class StateUnavailable(ServiceError):
    """The experiment database cannot be reached now; named and routed predictions are unaffected."""

    status = 503
    headers = {"Retry-After": str(RETRY_AFTER_S)}


def _schema(postgres: bool) -> list[str]:
    seq = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY" if postgres else "INTEGER PRIMARY KEY AUTOINCREMENT"
    return [
        """CREATE TABLE IF NOT EXISTS experiment_runs (
            run_id TEXT PRIMARY KEY, name TEXT NOT NULL, definition TEXT NOT NULL,
            started_at DOUBLE PRECISION NOT NULL, ended_at DOUBLE PRECISION, end_reason TEXT)""",
        # at most one live run per name: two replicas creating at once cannot both win
        "CREATE UNIQUE INDEX IF NOT EXISTS experiment_runs_live ON experiment_runs (name) WHERE ended_at IS NULL",
        """CREATE TABLE IF NOT EXISTS experiment_predictions (
            request_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, arm TEXT NOT NULL, variant TEXT NOT NULL,
            version INTEGER NOT NULL, assignment_key TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
            latency_ms REAL NOT NULL, top1 INTEGER NOT NULL, top1_prob REAL NOT NULL,
            shadow_variant TEXT, shadow_version INTEGER, shadow_top1 INTEGER, shadow_kl REAL, shadow_latency_ms REAL)""",
        "CREATE INDEX IF NOT EXISTS experiment_predictions_run ON experiment_predictions (run_id, created_at)",
        f"""CREATE TABLE IF NOT EXISTS experiment_labels (
            seq {seq}, request_id TEXT NOT NULL UNIQUE, run_id TEXT NOT NULL, label INTEGER NOT NULL,
            labelled_at DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS experiment_labels_run ON experiment_labels (run_id, seq)",
    ]


INSERT_PREDICTION = """INSERT INTO experiment_predictions (request_id, run_id, arm, variant, version, assignment_key,
    created_at, latency_ms, top1, top1_prob) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING"""
UPDATE_SHADOW = """UPDATE experiment_predictions SET shadow_variant = ?, shadow_version = ?, shadow_top1 = ?,
    shadow_kl = ?, shadow_latency_ms = ? WHERE request_id = ?"""
INSERT_LABEL = """INSERT INTO experiment_labels (request_id, run_id, label, labelled_at) VALUES (?, ?, ?, ?)
    ON CONFLICT (request_id) DO NOTHING"""
RUN_COLUMNS = "run_id, name, definition, started_at, ended_at, end_reason"
EXPIRE = [f"DELETE FROM {table} WHERE run_id IN (SELECT run_id FROM experiment_runs WHERE ended_at < ?)"
          for table in ("experiment_labels", "experiment_predictions")] + ["DELETE FROM experiment_runs WHERE ended_at < ?"]


@dataclass(frozen=True)
class Run:
    """One run of an experiment: its definition as it was, and whether it is still live."""

    run_id: str
    experiment: Experiment
    started_at: float
    ended_at: float | None = None
    end_reason: str | None = None

    @property
    def live(self) -> bool:
        return self.ended_at is None


@dataclass(frozen=True)
class Prediction:
    request_id: str
    run_id: str
    arm: str
    variant: str
    version: int
    key: str
    latency_ms: float
    top1: int
    top1_prob: float
    created_at: float


@dataclass(frozen=True)
class ShadowResult:
    request_id: str
    variant: str
    version: int
    top1: int
    kl: float  # KL(primary || shadow) of their class probabilities
    latency_ms: float


@dataclass(frozen=True)
class Recorded:
    """What feedback needs to know about one recorded answer."""

    run_id: str
    experiment: str
    live: bool
    arm: str
    variant: str
    top1: int
    label: int | None  # the label it already has, if any


@dataclass(frozen=True)
class RunRows:
    """A run's predictions as the report reads them (one tuple per recorded answer, in the order
    answered) and their labels in the order labels were committed."""

    predictions: list[tuple]  # request_id, arm, version, key, latency_ms, top1, shadow_version, shadow_top1, shadow_kl
    labels: list[tuple]  # request_id, label


PREDICTION_COLUMNS = "request_id, arm, version, assignment_key, latency_ms, top1, shadow_version, shadow_top1, shadow_kl"


class Database:
    """Connections and dialect: SQLite (a file) or PostgreSQL (a URL). Connecting gives up after
    ``connect_timeout_s``; a PostgreSQL statement after ``statement_timeout_s``."""

    def __init__(self, url: str | None, sqlite_path: Path, connect_timeout_s: float = 3.0,
                 statement_timeout_s: float = 10.0) -> None:
        self.url = url
        self.sqlite_path = sqlite_path
        self.connect_timeout_s = connect_timeout_s
        self.statement_timeout_s = statement_timeout_s
        self.transient: tuple[type[BaseException], ...] = (sqlite3.OperationalError,)
        if url is not None:
            import psycopg

            self.transient = (psycopg.OperationalError, psycopg.InterfaceError)

    @property
    def kind(self) -> str:
        return "sqlite" if self.url is None else "postgresql"

    def connect(self) -> Any:
        if self.url is None:
            self.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.sqlite_path, timeout=self.connect_timeout_s, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            return conn
        import psycopg

        return psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, round(self.connect_timeout_s)),
                               options=f"-c statement_timeout={int(self.statement_timeout_s * 1000)}")

    def sql(self, statement: str) -> str:
        return statement if self.url is None else statement.replace("?", "%s")

    @property
    def serialise_labels(self) -> str | None:
        """PostgreSQL hands out identity values before commit: a lock taken by every label
        transaction makes ``seq`` order commit order (SQLite's BEGIN IMMEDIATE already does)."""
        return None if self.url is None else "SELECT pg_advisory_xact_lock(727336)"

    def transaction(self, conn: Any, work: Callable[[Callable[[str, Sequence], Any]], Any]) -> Any:
        """Run ``work(execute)`` in one transaction; ``execute(sql, args)`` returns a cursor."""
        if self.url is None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(lambda statement, args=(): conn.execute(statement, args))
                conn.execute("COMMIT")
                return result
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        with conn.transaction():
            return work(lambda statement, args=(): conn.execute(self.sql(statement), args))


class ExperimentState:
    """The experiment database behind a buffered writer and short synchronous calls.

    ``start()`` begins connecting in the background: a server whose database is down still starts.
    Synchronous calls (everything but ``record_*``) block; call them in a worker thread.
    """

    def __init__(self, database: Database, retention_s: float, buffer_rows: int, batch: int = 500,
                 on_change: Callable[[bool, int], None] = lambda up, pending: None,
                 on_drop: Callable[[str], None] = lambda reason: None) -> None:
        self.db = database
        self.retention_s = retention_s
        self.buffer_rows = buffer_rows
        self.batch = batch
        self._on_change = on_change  # (database up, records pending) for the metrics
        self._on_drop = on_drop
        self._buffer: deque[tuple[str, tuple]] = deque()
        self._cond = threading.Condition()
        self._enqueued = 0  # records ever buffered
        self._done = 0  # records that left the buffer (committed, or rejected by the database)
        self._closing = False
        self._schema_ready = False
        self.up = False
        self.last_error: str | None = None
        self._writer: threading.Thread | None = None

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._writer = threading.Thread(target=self._write_loop, name="experiment-writer", daemon=True)
        self._writer.start()

    def close(self, drain_s: float = 10.0) -> None:
        """Commit what is buffered (for up to ``drain_s``), then stop the writer."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._writer is not None:
            self._writer.join(drain_s + self.db.connect_timeout_s + 5)
        if self._buffer:
            log.error("experiment state: %d buffered records were not written before shutdown (%s)",
                      len(self._buffer), self.last_error or "database unreachable")

    # ---- buffered writes (never block, never raise) ------------------------------------------------
    def record_prediction(self, p: Prediction) -> bool:
        return self._enqueue(INSERT_PREDICTION, (p.request_id, p.run_id, p.arm, p.variant, p.version, p.key, p.created_at,
                                                 p.latency_ms, p.top1, p.top1_prob))

    def record_shadow(self, s: ShadowResult) -> bool:
        return self._enqueue(UPDATE_SHADOW, (s.variant, s.version, s.top1, s.kl, s.latency_ms, s.request_id))

    def _enqueue(self, statement: str, args: tuple) -> bool:
        with self._cond:
            if len(self._buffer) >= self.buffer_rows:
                self._on_drop("buffer_full")
                return False
            self._buffer.append((statement, args))
            self._enqueued += 1
            self._cond.notify_all()
            pending = len(self._buffer)
        self._on_change(self.up, pending)
        return True

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def flush(self, timeout: float) -> None:
        """Block until every record buffered before this call has left the buffer; raise
        ``StateUnavailable`` when that takes longer than ``timeout`` (the database is away)."""
        with self._cond:
            target = self._enqueued
            if not self._cond.wait_for(lambda: self._done >= target, timeout):
                raise self.unavailable()

    def unavailable(self) -> StateUnavailable:
        return StateUnavailable(
            f"the experiment database ({self.db.kind}) is unreachable: {self.last_error or 'not connected yet'}; "
            f"{len(self._buffer)} records are buffered; named and routed predictions are unaffected; retry shortly")

    # ---- the writer -----------------------------------------------------------------------------
    def _write_loop(self) -> None:
        conn: Any = None
        backoff = 0.5
        next_expiry = 0.0
        while True:
            with self._cond:
                # idle and connected: wake every few seconds for expiry; disconnected: the backoff paces
                self._cond.wait_for(lambda: self._buffer or self._closing, timeout=5 if conn is not None else 0)
                batch = [self._buffer[i] for i in range(min(self.batch, len(self._buffer)))]
                closing = self._closing
            expire = time.monotonic() >= next_expiry
            if closing and not batch:
                break
            if not batch and not expire and conn is not None:
                continue
            try:
                if conn is None:
                    conn = self._connect()
                statements = list(batch)
                if expire:
                    cutoff = time.time() - self.retention_s
                    statements += [(s, (cutoff,)) for s in EXPIRE]
                self.db.transaction(conn, lambda execute: [execute(s, a) for s, a in statements])
                if expire:
                    next_expiry = time.monotonic() + EXPIRY_EVERY_S
            except self.db.transient as exc:
                conn = self._lost(conn, exc)
                if closing:
                    break
                with self._cond:  # wait out the backoff; close() cuts it short
                    self._cond.wait_for(lambda: self._closing, timeout=backoff)
                backoff = min(2 * backoff, 10.0)
                continue
            except Exception:  # the database refused these rows: retrying would refuse them forever
                log.exception("experiment state: the database rejected %d records; they are dropped", len(batch))
                for _ in batch:
                    self._on_drop("rejected")
            backoff = 0.5
            with self._cond:
                for _ in batch:
                    self._buffer.popleft()
                self._done += len(batch)
                self._cond.notify_all()
                pending = len(self._buffer)
            self._on_change(True, pending)
        if conn is not None:
            conn.close()

    def _connect(self) -> Any:
        conn = self.db.connect()
        if not self._schema_ready:
            schema = _schema(self.db.kind == "postgresql")
            self.db.transaction(conn, lambda execute: [execute(s) for s in schema])
            self._schema_ready = True
        if not self.up:
            log.info("experiment state: connected to %s", self.db.kind)
        self.up, self.last_error = True, None
        self._on_change(True, len(self._buffer))
        return conn

    def _lost(self, conn: Any, exc: BaseException) -> None:
        if self.up or self.last_error is None:
            log.warning("experiment state: %s unreachable (%s); %d records buffered, reconnecting",
                        self.db.kind, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                        len(self._buffer))
        self.up, self.last_error = False, (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        self._on_change(False, len(self._buffer))
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass
        return None

    # ---- synchronous calls (worker threads) -------------------------------------------------------
    def _call(self, work: Callable[[Callable[[str, Sequence], Any]], Any]) -> Any:
        """``work`` in one transaction on a fresh connection; an unreachable database → 503."""
        if not self._schema_ready:
            raise self.unavailable()
        try:
            conn = self.db.connect()
        except self.db.transient as exc:
            self._lost(None, exc)
            raise self.unavailable() from None
        try:
            return self.db.transaction(conn, work)
        except self.db.transient as exc:
            self._lost(None, exc)
            raise self.unavailable() from None
        finally:
            conn.close()

    def live_runs(self) -> list[Run]:
        return self._call(lambda execute: [_run(r) for r in execute(
            f"SELECT {RUN_COLUMNS} FROM experiment_runs WHERE ended_at IS NULL ORDER BY name").fetchall()])

    def start_run(self, experiment: Experiment, reason: str = "replaced", keep_identical: bool = False) -> Run:
        """End the live run of the experiment's name (if any) and start a new one. With
        ``keep_identical`` a live run with the very same definition is kept instead (a replica
        starting with the experiments file must not restart what another replica started)."""
        definition = json.dumps(experiment.model_dump(mode="json"), sort_keys=True)

        def work(execute: Callable) -> Run:
            now = time.time()
            live = execute(f"SELECT {RUN_COLUMNS} FROM experiment_runs WHERE name = ? AND ended_at IS NULL",
                           (experiment.name,)).fetchone()
            if live is not None and keep_identical and live[2] == definition:
                return _run(live)
            execute("UPDATE experiment_runs SET ended_at = ?, end_reason = ? WHERE name = ? AND ended_at IS NULL",
                    (now, reason, experiment.name))
            run = Run(uuid.uuid4().hex, experiment, now)
            execute("INSERT INTO experiment_runs (run_id, name, definition, started_at) VALUES (?, ?, ?, ?)",
                    (run.run_id, experiment.name, definition, now))
            return run

        return self._call(work)

    def end_run(self, name: str, reason: str) -> Run | None:
        """End the live run of ``name``; None when there is none."""
        def work(execute: Callable) -> Run | None:
            live = execute(f"SELECT {RUN_COLUMNS} FROM experiment_runs WHERE name = ? AND ended_at IS NULL",
                           (name,)).fetchone()
            if live is None:
                return None
            now = time.time()
            execute("UPDATE experiment_runs SET ended_at = ?, end_reason = ? WHERE run_id = ?", (now, reason, live[0]))
            return _run((*live[:4], now, reason))

        return self._call(work)

    def find_run(self, name: str, run_id: str | None = None) -> Run | None:
        """The run ``run_id`` of ``name``, or its latest run (live, else the last one ended)."""
        if run_id is not None:
            query, args = f"SELECT {RUN_COLUMNS} FROM experiment_runs WHERE name = ? AND run_id = ?", (name, run_id)
        else:
            query, args = (f"SELECT {RUN_COLUMNS} FROM experiment_runs WHERE name = ? "
                           "ORDER BY ended_at IS NOT NULL, started_at DESC LIMIT 1"), (name,)
        row = self._call(lambda execute: execute(query, args).fetchone())
        return None if row is None else _run(row)

    def runs_of(self, name: str) -> list[Run]:
        return self._call(lambda execute: [_run(r) for r in execute(
            f"SELECT {RUN_COLUMNS} FROM experiment_runs WHERE name = ? ORDER BY started_at DESC", (name,)).fetchall()])

    def recorded(self, request_ids: list[str]) -> dict[str, Recorded]:
        """The recorded answers among ``request_ids``, with their run's state and any label."""
        def work(execute: Callable) -> dict[str, Recorded]:
            found: dict[str, Recorded] = {}
            for chunk in _chunks(request_ids, 500):
                marks = ", ".join("?" * len(chunk))
                for rid, run_id, name, ended_at, arm, variant, top1, label in execute(
                        f"""SELECT p.request_id, p.run_id, r.name, r.ended_at, p.arm, p.variant, p.top1, l.label
                            FROM experiment_predictions p JOIN experiment_runs r ON r.run_id = p.run_id
                            LEFT JOIN experiment_labels l ON l.request_id = p.request_id
                            WHERE p.request_id IN ({marks})""", tuple(chunk)).fetchall():
                    found[rid] = Recorded(run_id, name, ended_at is None, arm, variant, top1, label)
            return found

        return self._call(work)

    def add_labels(self, labels: list[tuple[str, str, int]]) -> set[str]:
        """Insert (request id, run id, label) rows in one transaction, in the given order; a request
        that already has a label keeps it. Returns the request ids whose label was inserted."""
        def work(execute: Callable) -> set[str]:
            if self.db.serialise_labels:
                execute(self.db.serialise_labels)
            now = time.time()
            return {rid for rid, run_id, label in labels
                    if execute(INSERT_LABEL, (rid, run_id, label, now)).rowcount == 1}

        return self._call(work)

    def run_rows(self, run_id: str) -> RunRows:
        def work(execute: Callable) -> RunRows:
            predictions = execute(f"SELECT {PREDICTION_COLUMNS} FROM experiment_predictions WHERE run_id = ? "
                                  "ORDER BY created_at, request_id", (run_id,)).fetchall()
            labels = execute("SELECT request_id, label FROM experiment_labels WHERE run_id = ? ORDER BY seq",
                             (run_id,)).fetchall()
            return RunRows(predictions, labels)

        return self._call(work)


def _run(row: Sequence) -> Run:
    run_id, _, definition, started_at, ended_at, end_reason = row
    return Run(run_id, Experiment.model_validate_json(definition), started_at, ended_at, end_reason)


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
