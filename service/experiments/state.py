"""Where experiments keep what happened, and what happens while that store is away or slow.

Tables (SQLite by default, PostgreSQL when a database URL is set, so replicas share one truth):
``experiment_runs`` (one row per run of an experiment: a create or replace starts a run, a replace
or delete ends it; ``source`` says whether the experiments file or the admin API started it),
``experiment_predictions`` (one row per recorded answer: run, arm, variant and its version, a hash
of the assignment key, top-1 and its probability, latency; the shadow's answer joins the same row)
and ``experiment_labels`` (append-only: a request's first label stands; ``seq`` is the order labels
were committed in, which never changes, and labels are taken only while their run is live).

Failure contract (psycopg's pool is the model):
- Predictions and shadow results go into a bounded in-memory buffer that one writer thread commits
  in batches. While the database is away the buffer holds them and the writer reconnects with
  exponential backoff (connecting, creating the schema and writing all count as "away"); a failed
  batch is retried, never dropped. Rows the database itself rejects are isolated by bisection and
  only they are dropped; a full buffer drops new records. Both are counted, never silent.
- ``up`` is the writer's view: true after a successful connect or batch, false after a failure.
  While it is false the synchronous calls fail at once (``StateUnavailable``: 503 + Retry-After)
  instead of tying up a thread; each synchronous call has a statement timeout on the server and
  the caller's own deadline.
- Everything a client is told succeeded (a label "recorded", a run created or ended) is committed
  before the answer.
- Retention deletes, in bounded chunks and in transactions of their own, the rows of runs that
  ended more than ``retention_s`` ago; a live run's evidence is never deleted.
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

from pydantic import ValidationError

from ..errors import ServiceError
from .definition import Experiment

log = logging.getLogger("committee.experiments")

RETRY_AFTER_S = 5
EXPIRY_EVERY_S = 600.0
EXPIRY_CHUNK = 10_000
CLOSE_DRAIN_S = 10.0  # at shutdown, the writer commits what is buffered for this long at most
LABEL_LOCK = 727336  # PostgreSQL advisory lock: label inserts and run changes, one at a time


class StateUnavailable(ServiceError):
    """The experiment database cannot be reached now; named and routed predictions are unaffected."""

    status = 503
    headers = {"Retry-After": str(RETRY_AFTER_S)}


def _schema(postgres: bool) -> list[str]:
    seq = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY" if postgres else "INTEGER PRIMARY KEY AUTOINCREMENT"
    return [
        """CREATE TABLE IF NOT EXISTS experiment_runs (
            run_id TEXT PRIMARY KEY, name TEXT NOT NULL, definition TEXT NOT NULL, source TEXT NOT NULL,
            started_at DOUBLE PRECISION NOT NULL, ended_at DOUBLE PRECISION, end_reason TEXT)""",
        # at most one live run per name: two replicas creating at once cannot both win
        "CREATE UNIQUE INDEX IF NOT EXISTS experiment_runs_live ON experiment_runs (name) WHERE ended_at IS NULL",
        """CREATE TABLE IF NOT EXISTS experiment_predictions (
            request_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, arm TEXT NOT NULL, variant TEXT NOT NULL,
            version INTEGER NOT NULL, assignment_key BIGINT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
            latency_ms REAL NOT NULL, top1 INTEGER NOT NULL, top1_prob REAL NOT NULL,
            shadow_variant TEXT, shadow_version INTEGER, shadow_top1 INTEGER, shadow_kl REAL, shadow_latency_ms REAL,
            shadow_at DOUBLE PRECISION)""",
        "CREATE INDEX IF NOT EXISTS experiment_predictions_run ON experiment_predictions (run_id, created_at)",
        f"""CREATE TABLE IF NOT EXISTS experiment_labels (
            seq {seq}, request_id TEXT NOT NULL UNIQUE, run_id TEXT NOT NULL, label INTEGER NOT NULL,
            labelled_at DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS experiment_labels_run ON experiment_labels (run_id, seq)",
    ]


INSERT_PREDICTION = """INSERT INTO experiment_predictions (request_id, run_id, arm, variant, version, assignment_key,
    created_at, latency_ms, top1, top1_prob) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING"""
UPDATE_SHADOW = """UPDATE experiment_predictions SET shadow_variant = ?, shadow_version = ?, shadow_top1 = ?,
    shadow_kl = ?, shadow_latency_ms = ?, shadow_at = ? WHERE request_id = ?"""
LIVE_RUN = "EXISTS (SELECT 1 FROM experiment_runs r WHERE r.run_id = {run} AND r.ended_at IS NULL)"
RUN_COLUMNS = "run_id, name, definition, source, started_at, ended_at, end_reason"
EXPIRED_RUNS = "SELECT run_id FROM experiment_runs WHERE ended_at < ?"


@dataclass(frozen=True)
class Run:
    """One run of an experiment: its definition as it was, and whether it is still live."""

    run_id: str
    experiment: Experiment
    started_at: float
    ended_at: float | None = None
    end_reason: str | None = None
    source: str = "admin"

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
    key: int  # a 52-bit hash of the assignment key: the unit of analysis, never the user's identifier itself
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
    at: float  # unix time the shadow answered


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
    """A run's recorded answers as the report reads them: one all-numeric tuple per answer, in the
    order answered (for an ended run only what happened before it ended), with its label if any.
    Columns: arm index (the definition's order; -1 another arm), version, key hash, latency ms,
    top-1, shadow version (-1: none), shadow top-1 (-1), shadow KL (-1), shadow time (NO_TIME),
    label (-1), label sequence number (-1), label time (NO_TIME)."""

    rows: list[tuple]


NO_TIME = 1e300  # stands for "never" in the numeric columns


class Database:
    """Connections and dialect: SQLite (a file) or PostgreSQL (a URL). Connecting gives up after
    ``connect_timeout_s``; a statement after ``statement_timeout_s`` (PostgreSQL, set per session
    so poolers in transaction mode accept it); TCP keepalives find a dead peer."""

    def __init__(self, url: str | None, sqlite_path: Path, connect_timeout_s: float = 3.0,
                 statement_timeout_s: float = 10.0) -> None:
        self.url = url
        self.sqlite_path = sqlite_path
        self.connect_timeout_s = connect_timeout_s
        self.statement_timeout_s = statement_timeout_s
        # rows the database refuses (dropped one by one); every other error means "away" (retried)
        self.rejects: tuple[type[BaseException], ...] = (sqlite3.IntegrityError, sqlite3.DataError,
                                                         sqlite3.InterfaceError, OverflowError)
        self.transient: tuple[type[BaseException], ...] = (sqlite3.OperationalError,)
        if url is not None:
            import psycopg

            self.rejects = (psycopg.DataError, psycopg.IntegrityError)
            self.transient = (psycopg.OperationalError, psycopg.InterfaceError)

    @property
    def postgres(self) -> bool:
        return self.url is not None

    @property
    def kind(self) -> str:
        return "postgresql" if self.postgres else "sqlite"

    def connect(self) -> Any:
        if self.url is None:
            self.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.sqlite_path, timeout=self.connect_timeout_s, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            return conn
        import psycopg

        conn = psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, round(self.connect_timeout_s)),
                               keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3)
        try:
            conn.execute(f"SET statement_timeout = {int(self.statement_timeout_s * 1000)}")
            conn.execute(f"SET lock_timeout = {int(self.statement_timeout_s * 1000)}")
        except BaseException:
            conn.close()
            raise
        return conn

    def sql(self, statement: str) -> str:
        return statement if self.url is None else statement.replace("?", "%s")

    def transaction(self, conn: Any, work: Callable[[Callable[..., Any]], Any], write: bool = True) -> Any:
        """Run ``work(execute)`` in one transaction; ``execute(sql, args)`` returns a cursor. A
        SQLite write transaction takes the write lock at once (writes queue instead of failing
        half-way); a read transaction takes none (WAL readers never block the writer)."""
        if self.url is None:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                result = work(lambda statement, args=(): conn.execute(statement, args))
                conn.execute("COMMIT")
                return result
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        with conn.transaction():
            return work(lambda statement, args=(): conn.execute(self.sql(statement), args))

    def serialise(self, execute: Callable[..., Any]) -> None:
        """Take the label lock for this transaction (SQLite's BEGIN IMMEDIATE already holds it).
        PostgreSQL hands out identity values before commit: serialised label inserts make ``seq``
        order commit order, and a run cannot end between a label's check and its insert."""
        if self.postgres:
            execute(f"SELECT pg_advisory_xact_lock({LABEL_LOCK})")

    def insert_labels(self, execute: Callable[..., Any], rows: list[tuple[str, str, int]], now: float) -> set[str]:
        """Insert (request id, run id, label) rows in order, each only while its run is live and
        the request has no label yet; the ids inserted."""
        if self.postgres:
            ids, runs, labels = (list(c) for c in zip(*rows)) if rows else ([], [], [])
            return {r[0] for r in execute(
                f"""INSERT INTO experiment_labels (request_id, run_id, label, labelled_at)
                    SELECT u.request_id, u.run_id, u.label, ? FROM unnest(?::text[], ?::text[], ?::int[])
                        WITH ORDINALITY AS u(request_id, run_id, label, position)
                    WHERE {LIVE_RUN.format(run='u.run_id')} ORDER BY u.position
                    ON CONFLICT (request_id) DO NOTHING RETURNING request_id""", (now, ids, runs, labels)).fetchall()}
        return {rid for rid, run_id, label in rows if execute(
            f"""INSERT INTO experiment_labels (request_id, run_id, label, labelled_at)
                SELECT ?, ?, ?, ? WHERE {LIVE_RUN.format(run='?')} ON CONFLICT (request_id) DO NOTHING""",
            (rid, run_id, label, now, run_id)).rowcount == 1}

    def chunk_delete(self, table: str) -> str:
        """Delete at most EXPIRY_CHUNK rows of ``table`` that belong to expired runs."""
        row = "ctid" if self.postgres else "rowid"
        return (f"DELETE FROM {table} WHERE {row} IN (SELECT {row} FROM {table} WHERE run_id IN ({EXPIRED_RUNS}) "
                f"LIMIT {EXPIRY_CHUNK})")


class ExperimentState:
    """The experiment database behind a buffered writer and short synchronous calls.

    ``start()`` begins connecting in the background: a server whose database is down still starts.
    Synchronous calls block (run them in a worker thread); each thread keeps one connection.
    """

    def __init__(self, database: Database, retention_s: float, buffer_rows: int, batch: int = 500,
                 on_drop: Callable[[str, int], None] = lambda reason, count: None,
                 expiry_every_s: float = EXPIRY_EVERY_S) -> None:
        self.db = database
        self.retention_s = retention_s
        self.expiry_every_s = expiry_every_s
        self.buffer_rows = buffer_rows
        self.batch = batch
        self._on_drop = on_drop
        self._buffer: deque[tuple[str, tuple]] = deque()
        self._cond = threading.Condition()
        self.enqueued = 0  # records ever buffered
        self.done = 0  # records that left the buffer (committed, or rejected by the database)
        self._closing = False
        self._schema_ready = False
        self.up = False
        self.last_error: str | None = None
        self._writer: threading.Thread | None = None
        self._local = threading.local()
        self._connections: list[Any] = []
        self._connections_lock = threading.Lock()
        self._bad_rows_logged = 0.0

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._writer = threading.Thread(target=self._write_loop, name="experiment-writer", daemon=True)
        self._writer.start()

    def close(self, drain_s: float = CLOSE_DRAIN_S) -> None:
        """Commit what is buffered (for up to ``drain_s``), stop the writer, close every connection."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._writer is not None:
            self._writer.join(self.close_budget_s(drain_s))
        with self._cond:
            lost = len(self._buffer)
            self._buffer.clear()
        if lost:
            self._on_drop("closing", lost)
            log.error("experiment state: %d buffered records were not written before shutdown (%s)",
                      lost, self.last_error or "database unreachable")
        with self._connections_lock:
            for conn in self._connections:
                _close_quietly(conn)
            self._connections.clear()

    def close_budget_s(self, drain_s: float = CLOSE_DRAIN_S) -> float:
        """The longest ``close`` takes (what a pod's termination grace period must leave room for)."""
        return drain_s + self.db.connect_timeout_s + 5

    # ---- buffered writes (never block, never raise) ------------------------------------------------
    def record_prediction(self, p: Prediction) -> bool:
        return self._enqueue(INSERT_PREDICTION, (p.request_id, p.run_id, p.arm, p.variant, p.version, p.key, p.created_at,
                                                 p.latency_ms, p.top1, p.top1_prob))

    def record_shadow(self, s: ShadowResult) -> bool:
        return self._enqueue(UPDATE_SHADOW, (s.variant, s.version, s.top1, s.kl, s.latency_ms, s.at, s.request_id))

    def _enqueue(self, statement: str, args: tuple) -> bool:
        with self._cond:
            reason = "closing" if self._closing else "buffer_full" if len(self._buffer) >= self.buffer_rows else None
            if reason is None:
                self._buffer.append((statement, args))
                self.enqueued += 1
                self._cond.notify_all()
                return True
        self._on_drop(reason, 1)
        return False

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def flush(self, timeout: float) -> None:
        """Block until every record buffered before this call has left the buffer; raise
        ``StateUnavailable`` when that takes longer than ``timeout``."""
        with self._cond:
            target = self.enqueued
            if not self._cond.wait_for(lambda: self.done >= target, timeout):
                raise self.unavailable()

    def unavailable(self, reason: str | None = None) -> StateUnavailable:
        why = reason or self.last_error or "not connected yet"
        return StateUnavailable(
            f"the experiment database ({self.db.kind}) is unavailable: {why}; {len(self._buffer)} records are "
            "buffered; named and routed predictions are unaffected; retry shortly")

    # ---- the writer -----------------------------------------------------------------------------
    def _write_loop(self) -> None:
        conn: Any = None
        backoff = 0.5
        next_expiry = time.monotonic() + min(5.0, self.expiry_every_s)
        while True:
            with self._cond:
                # idle and connected: wake every few seconds for expiry; disconnected: the backoff paces
                self._cond.wait_for(lambda: self._buffer or self._closing,
                                    timeout=min(5.0, self.expiry_every_s) if conn is not None else 0)
                batch = [self._buffer[i] for i in range(min(self.batch, len(self._buffer)))]
                closing = self._closing
            if closing and (not batch or conn is None and self.last_error is not None and backoff >= 2):
                break
            if conn is not None and not batch and time.monotonic() < next_expiry:
                continue
            try:
                if conn is None:
                    conn = self._connect()
                rejected = self._commit(conn, batch)
            except Exception as exc:  # connecting, the schema or the batch: the database is away; keep everything
                conn = self._lost(conn, exc)
                with self._cond:  # wait out the backoff; close() cuts it short
                    self._cond.wait_for(lambda: self._closing, timeout=backoff)
                backoff = min(2 * backoff, 10.0)
                continue
            backoff = 0.5
            self.up, self.last_error = True, None
            if rejected:
                self._on_drop("rejected", rejected)
            with self._cond:
                for _ in batch:
                    self._buffer.popleft()
                self.done += len(batch)
                self._cond.notify_all()
            if time.monotonic() >= next_expiry:
                next_expiry = time.monotonic() + self.expiry_every_s
                self._expire(conn)
        _close_quietly(conn)

    def _commit(self, conn: Any, batch: list[tuple[str, tuple]]) -> int:
        """Commit ``batch`` in one transaction; rows the database rejects (not a connection
        problem) are found by bisection and only they are dropped. Returns how many were."""
        if not batch:
            return 0
        try:
            self.db.transaction(conn, lambda execute: [execute(s, a) for s, a in batch])
            return 0
        except self.db.rejects as exc:
            if len(batch) == 1:
                if time.monotonic() - self._bad_rows_logged > 60:
                    self._bad_rows_logged = time.monotonic()
                    log.error("experiment state: the database rejected a record (%s); dropped", exc)
                return 1
            middle = len(batch) // 2
            return self._commit(conn, batch[:middle]) + self._commit(conn, batch[middle:])

    def _expire(self, conn: Any) -> None:
        """Delete the rows of runs that ended more than ``retention_s`` ago, a chunk per transaction."""
        cutoff = (time.time() - self.retention_s,)
        try:
            for table in ("experiment_labels", "experiment_predictions"):
                while self.db.transaction(conn, lambda execute: execute(self.db.chunk_delete(table), cutoff).rowcount) \
                        == EXPIRY_CHUNK:
                    pass
            self.db.transaction(conn, lambda execute: execute(
                "DELETE FROM experiment_runs WHERE ended_at < ?", cutoff))
        except Exception as exc:  # retention is housekeeping: it never stops the writes
            log.warning("experiment state: retention failed (%s); next try in %.0f s", exc, self.expiry_every_s)

    def _connect(self) -> Any:
        conn = self.db.connect()
        try:
            if not self._schema_ready:
                schema = _schema(self.db.postgres)
                self.db.transaction(conn, lambda execute: [execute(s) for s in schema])
                self._schema_ready = True
        except BaseException:
            _close_quietly(conn)
            raise
        if self.last_error is not None or not self.up:
            log.info("experiment state: connected to %s", self.db.kind)
        self.up, self.last_error = True, None
        return conn

    def _lost(self, conn: Any, exc: BaseException) -> None:
        first_line = _first_line(exc)
        if self.up or self.last_error is None:
            log.warning("experiment state: %s unavailable (%s); %d records buffered, reconnecting with backoff",
                        self.db.kind, first_line, len(self._buffer))
        self.up, self.last_error = False, first_line
        _close_quietly(conn)
        return None

    # ---- synchronous calls (worker threads) -------------------------------------------------------
    def _call(self, work: Callable[[Callable[..., Any]], Any], write: bool = False) -> Any:
        """``work`` in one transaction on this thread's connection. Fails at once while the writer
        finds the database away; a connection the database dropped is replaced once."""
        if not self.up or not self._schema_ready:
            raise self.unavailable()
        for attempt in (1, 2):
            conn, fresh = self._thread_connection()
            try:
                return self.db.transaction(conn, work, write)
            except self.db.transient as exc:
                self._drop_thread_connection()
                if fresh or attempt == 2:
                    raise self.unavailable(_first_line(exc)) from None
        raise AssertionError("unreachable")

    def _thread_connection(self) -> tuple[Any, bool]:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, False
        try:
            conn = self.db.connect()
        except self.db.transient as exc:
            raise self.unavailable(_first_line(exc)) from None
        self._local.conn = conn
        with self._connections_lock:
            self._connections.append(conn)
        return conn, True

    def _drop_thread_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        with self._connections_lock:
            if conn in self._connections:
                self._connections.remove(conn)
        _close_quietly(conn)

    def live_runs(self) -> list[Run]:
        """The live runs; a definition this version cannot read is skipped with a log line."""
        rows = self._call(lambda execute: execute(
            f"SELECT {RUN_COLUMNS} FROM experiment_runs WHERE ended_at IS NULL ORDER BY name").fetchall())
        return [run for run in map(_run_or_none, rows) if run is not None]

    def start_run(self, experiment: Experiment, reason: str = "replaced", source: str = "admin") -> Run | None:
        """End the live run of the experiment's name (if any) and start a new one. A ``source``
        other than "admin" (the experiments file: "file:<hash>") starts a run only once: if any
        run of that name came from that very source, nothing changes (an operator may have
        deleted or replaced it since) and the live run, if any, is returned."""
        definition = json.dumps(experiment.model_dump(mode="json"), sort_keys=True)

        def work(execute: Callable[..., Any]) -> Run | None:
            self.db.serialise(execute)
            live = execute(f"SELECT {RUN_COLUMNS} FROM experiment_runs WHERE name = ? AND ended_at IS NULL",
                           (experiment.name,)).fetchone()
            if source != "admin" and execute("SELECT 1 FROM experiment_runs WHERE name = ? AND source = ?",
                                             (experiment.name, source)).fetchone():
                return _run_or_none(live) if live else None
            now = time.time()
            execute("UPDATE experiment_runs SET ended_at = ?, end_reason = ? WHERE name = ? AND ended_at IS NULL",
                    (now, reason, experiment.name))
            run = Run(uuid.uuid4().hex, experiment, now, source=source)
            execute("INSERT INTO experiment_runs (run_id, name, definition, source, started_at) VALUES (?, ?, ?, ?, ?)",
                    (run.run_id, experiment.name, definition, source, now))
            return run

        return self._call(work, write=True)

    def end_run(self, name: str, reason: str) -> Run | None:
        """End the live run of ``name``; None when there is none."""
        def work(execute: Callable[..., Any]) -> Run | None:
            self.db.serialise(execute)
            live = execute(f"SELECT {RUN_COLUMNS} FROM experiment_runs WHERE name = ? AND ended_at IS NULL",
                           (name,)).fetchone()
            if live is None:
                return None
            now = time.time()
            execute("UPDATE experiment_runs SET ended_at = ?, end_reason = ? WHERE run_id = ?", (now, reason, live[0]))
            return _run_or_none((*live[:5], now, reason))

        return self._call(work, write=True)

    def find_run(self, name: str, run_id: str | None = None) -> Run | None:
        """The run ``run_id`` of ``name``, or its latest run (live, else the last one ended)."""
        if run_id is not None:
            query, args = f"SELECT {RUN_COLUMNS} FROM experiment_runs WHERE name = ? AND run_id = ?", (name, run_id)
        else:
            query, args = (f"SELECT {RUN_COLUMNS} FROM experiment_runs WHERE name = ? "
                           "ORDER BY ended_at IS NOT NULL, started_at DESC LIMIT 1"), (name,)
        row = self._call(lambda execute: execute(query, args).fetchone())
        return None if row is None else _run_or_none(row)

    def recorded(self, request_ids: list[str]) -> dict[str, Recorded]:
        """The recorded answers among ``request_ids``, with their run's state and any label."""
        def work(execute: Callable[..., Any]) -> dict[str, Recorded]:
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

    def add_labels(self, rows: list[tuple[str, str, int]]) -> tuple[set[str], dict[str, int]]:
        """Insert (request id, run id, label) rows in one transaction, in the given order; a
        request that already has a label keeps it, and a run that ended takes none. Returns the
        ids inserted and, for the others, the label they already had (absent: their run ended)."""
        def work(execute: Callable[..., Any]) -> tuple[set[str], dict[str, int]]:
            self.db.serialise(execute)
            inserted = self.db.insert_labels(execute, rows, time.time())
            others = [rid for rid, _, _ in rows if rid not in inserted]
            existing: dict[str, int] = {}
            for chunk in _chunks(others, 500):
                marks = ", ".join("?" * len(chunk))
                existing.update(execute(f"SELECT request_id, label FROM experiment_labels WHERE request_id IN ({marks})",
                                        tuple(chunk)).fetchall())
            return inserted, existing

        return self._call(work, write=True)

    def run_rows(self, run: Run) -> RunRows:
        arms = [arm.name for arm in run.experiment.arms]
        arm_index = "CASE p.arm " + " ".join("WHEN ? THEN ?" for _ in arms) + " ELSE -1 END"
        ended = run.ended_at if run.ended_at is not None else NO_TIME
        query = f"""SELECT {arm_index}, p.version, p.assignment_key, p.latency_ms, p.top1,
                COALESCE(p.shadow_version, -1), COALESCE(p.shadow_top1, -1), COALESCE(p.shadow_kl, -1),
                COALESCE(p.shadow_at, {NO_TIME}), COALESCE(l.label, -1), COALESCE(l.seq, -1),
                COALESCE(l.labelled_at, {NO_TIME})
            FROM experiment_predictions p
            LEFT JOIN experiment_labels l ON l.request_id = p.request_id AND l.labelled_at <= ?
            WHERE p.run_id = ? AND p.created_at <= ? ORDER BY p.created_at, p.request_id"""
        args = (*(x for i, name in enumerate(arms) for x in (name, i)), ended, run.run_id, ended)
        return RunRows(self._call(lambda execute: execute(query, args).fetchall()))

def _run_or_none(row: Sequence) -> Run | None:
    """A run from its row; a definition this version cannot read (written by another version) is
    logged and skipped rather than taking every experiment down."""
    run_id, name, definition, source, started_at, ended_at, end_reason = row
    try:
        raw = json.loads(definition)
        known = {k: v for k, v in raw.items() if k in Experiment.model_fields}
        return Run(run_id, Experiment.model_validate(known), started_at, ended_at, end_reason, source)
    except (ValueError, ValidationError) as exc:
        log.error("experiment %s: run %s has a definition this version cannot read (%s); skipped", name, run_id, exc)
        return None


def _first_line(exc: BaseException) -> str:
    """What a database error says, in one line (psycopg's messages run over several)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _close_quietly(conn: Any) -> None:
    if conn is not None:
        try:
            conn.close()
        except Exception:
            pass
