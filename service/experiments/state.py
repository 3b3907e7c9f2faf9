"""Where experiments keep what happened: assignments with their predictions (top-k only), shadow
results, labelled feedback, and experiments created through the admin routes.

SQLite by default (standard library, WAL mode, a file under the state directory), PostgreSQL when a
database URL is set (psycopg 3), so replicas behind one Service share experiments: a prediction
served by one replica and the feedback posted to another join in the report. One writer thread
batches every write (the event loop never waits on the database); reads open their own connection
in a worker thread. Rows older than the retention setting are deleted as the writer goes.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger("committee.experiments")

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS experiments (
        name TEXT PRIMARY KEY, definition TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS predictions (
        request_id TEXT PRIMARY KEY, experiment TEXT NOT NULL, arm TEXT NOT NULL, variant TEXT NOT NULL,
        assignment_key TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, latency_ms DOUBLE PRECISION NOT NULL,
        top1 INTEGER NOT NULL, top_k TEXT NOT NULL,
        shadow_variant TEXT, shadow_top1 INTEGER, shadow_top_k TEXT, shadow_kl DOUBLE PRECISION,
        shadow_latency_ms DOUBLE PRECISION)""",
    "CREATE INDEX IF NOT EXISTS predictions_by_experiment ON predictions (experiment, created_at)",
    """CREATE TABLE IF NOT EXISTS feedback (
        request_id TEXT PRIMARY KEY, label INTEGER NOT NULL, created_at DOUBLE PRECISION NOT NULL)""",
]

INSERT_PREDICTION = """INSERT INTO predictions (request_id, experiment, arm, variant, assignment_key, created_at,
    latency_ms, top1, top_k) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING"""
UPDATE_SHADOW = """UPDATE predictions SET shadow_variant = ?, shadow_top1 = ?, shadow_top_k = ?, shadow_kl = ?,
    shadow_latency_ms = ? WHERE request_id = ?"""
UPSERT_FEEDBACK = """INSERT INTO feedback (request_id, label, created_at) VALUES (?, ?, ?)
    ON CONFLICT (request_id) DO UPDATE SET label = excluded.label, created_at = excluded.created_at"""
UPSERT_EXPERIMENT = """INSERT INTO experiments (name, definition, created_at) VALUES (?, ?, ?)
    ON CONFLICT (name) DO UPDATE SET definition = excluded.definition"""
DELETE_EXPERIMENT = "DELETE FROM experiments WHERE name = ?"
EXPIRE = ["DELETE FROM feedback WHERE request_id IN (SELECT request_id FROM predictions WHERE created_at < ?)",
          "DELETE FROM predictions WHERE created_at < ?"]


@dataclass(frozen=True)
class Prediction:
    request_id: str
    experiment: str
    arm: str
    variant: str
    key: str
    latency_ms: float
    top1: int
    top_k: list[tuple[int, float]]
    created_at: float


@dataclass(frozen=True)
class ShadowResult:
    request_id: str
    variant: str
    top1: int
    top_k: list[tuple[int, float]]
    kl: float  # KL(primary || shadow) of their class probabilities
    latency_ms: float


@dataclass(frozen=True)
class Outcome:
    """One assignment as the report needs it (label None: no feedback yet)."""

    arm: str
    latency_ms: float
    top1: int
    shadow_top1: int | None
    shadow_kl: float | None
    label: int | None
    labelled_at: float | None


class Database:
    """Connections and dialect: SQLite (a file) or PostgreSQL (a URL)."""

    def __init__(self, url: str | None, sqlite_path: Path) -> None:
        self.url = url
        self.sqlite_path = sqlite_path
        if url is None:
            sqlite_path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def kind(self) -> str:
        return "sqlite" if self.url is None else "postgresql"

    def connect(self) -> Any:
        if self.url is None:
            conn = sqlite3.connect(self.sqlite_path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            return conn
        import psycopg

        return psycopg.connect(self.url, autocommit=True)

    def sql(self, statement: str) -> str:
        return statement if self.url is None else statement.replace("?", "%s")

    def run(self, conn: Any, statements: Iterable[tuple[str, tuple]]) -> None:
        """Execute in one transaction."""
        if self.url is None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement, args in statements:
                    conn.execute(statement, args)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        else:
            with conn.transaction():
                for statement, args in statements:
                    conn.execute(self.sql(statement), args)

    def query(self, statement: str, args: tuple = ()) -> list[tuple]:
        conn = self.connect()
        try:
            return list(conn.execute(self.sql(statement), args).fetchall())
        finally:
            conn.close()


class _Flush:
    def __init__(self) -> None:
        self.done = threading.Event()


class ExperimentState:
    def __init__(self, database: Database, retention_s: float, batch: int = 500) -> None:
        self.db = database
        self.retention_s = retention_s
        self.batch = batch
        self._queue: queue.Queue = queue.Queue()
        conn = database.connect()
        try:
            database.run(conn, ((s, ()) for s in SCHEMA))
        finally:
            conn.close()
        self._writer = threading.Thread(target=self._write_loop, name="experiment-writer", daemon=True)
        self._writer.start()

    # ---- writes (non-blocking: queued for the writer thread) ----------------------------------
    def record_prediction(self, p: Prediction) -> None:
        self._queue.put((INSERT_PREDICTION, (p.request_id, p.experiment, p.arm, p.variant, p.key, p.created_at,
                                             p.latency_ms, p.top1, json.dumps(p.top_k))))

    def record_shadow(self, s: ShadowResult) -> None:
        self._queue.put((UPDATE_SHADOW, (s.variant, s.top1, json.dumps(s.top_k), s.kl, s.latency_ms, s.request_id)))

    def record_feedback(self, request_id: str, label: int) -> None:
        self._queue.put((UPSERT_FEEDBACK, (request_id, label, time.time())))

    def save_experiment(self, name: str, definition: dict) -> None:
        self._queue.put((UPSERT_EXPERIMENT, (name, json.dumps(definition), time.time())))

    def delete_experiment(self, name: str) -> None:
        self._queue.put((DELETE_EXPERIMENT, (name,)))

    def flush(self, timeout: float = 30) -> None:
        """Block until everything queued before this call is committed (call it off the loop)."""
        marker = _Flush()
        self._queue.put(marker)
        if not marker.done.wait(timeout):
            raise TimeoutError("the experiment writer did not catch up")

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(30)

    def _write_loop(self) -> None:
        conn = self.db.connect()
        last_expiry = 0.0
        try:
            while True:
                try:
                    first = self._queue.get(timeout=5)
                except queue.Empty:
                    first = ()
                items = [first] if first != () else []
                while len(items) < self.batch:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                statements = [i for i in items if isinstance(i, tuple)]
                if time.monotonic() - last_expiry > 60:
                    cutoff = time.time() - self.retention_s
                    statements += [(s, (cutoff,)) for s in EXPIRE]
                    last_expiry = time.monotonic()
                if statements:
                    try:
                        self.db.run(conn, statements)
                    except Exception:  # keep serving; the report will miss these rows, the log says why
                        log.exception("experiment state: %d writes failed", len(statements))
                        conn = self._reconnect(conn)
                for item in items:
                    if isinstance(item, _Flush):
                        item.done.set()
                if None in items:
                    return
        finally:
            conn.close()

    def _reconnect(self, conn: Any) -> Any:
        try:
            conn.close()
        except Exception:
            pass
        return self.db.connect()

    # ---- reads (blocking: call them in a worker thread) ----------------------------------------
    def outcomes(self, experiment: str) -> list[Outcome]:
        rows = self.db.query(
            """SELECT p.arm, p.latency_ms, p.top1, p.shadow_top1, p.shadow_kl, f.label, f.created_at
               FROM predictions p LEFT JOIN feedback f ON f.request_id = p.request_id
               WHERE p.experiment = ? ORDER BY p.created_at""", (experiment,))
        return [Outcome(*r) for r in rows]

    def predictions_of(self, request_ids: list[str]) -> dict[str, tuple[str, str, str, int]]:
        """request id -> (experiment, arm, variant, top-1 class) for the ids that exist."""
        found: dict[str, tuple[str, str, str, int]] = {}
        for start in range(0, len(request_ids), 500):
            chunk = request_ids[start:start + 500]
            marks = ", ".join("?" * len(chunk))
            for rid, exp, arm, variant, top1 in self.db.query(
                    f"SELECT request_id, experiment, arm, variant, top1 FROM predictions WHERE request_id IN ({marks})", tuple(chunk)):
                found[rid] = (exp, arm, variant, top1)
        return found

    def saved_experiments(self) -> dict[str, dict]:
        return {name: json.loads(d) for name, d in self.db.query("SELECT name, definition FROM experiments")}
