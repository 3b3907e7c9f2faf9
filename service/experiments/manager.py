"""Running experiments: live runs (the database is the source of truth, refreshed every few
seconds, so every replica serves the same definitions), sticky assignment, sampled recording, the
shadow arm, append-only feedback and cached reports.

The shadow runs off the response path: after the primary answer its first image goes into the
experiment's bounded queue (bounded in jobs and, across experiments, in bytes), and one worker per
experiment runs the shadow variant through the same batchers as live traffic, but only while its
runner admits the work and has no full batch of live work waiting: under load the shadow is
dropped first (counted), it never delays or fails a primary answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from ..errors import BadRequest, NotFound, ServiceError, Unprocessable
from ..metrics import ServiceMetrics
from ..preprocess import PixelLimits, images_to_rows
from ..registry import Registry
from ..variants import Variant, leased, log_softmax
from .definition import Arm, Experiment, load_experiments
from .report import Report, build_report
from .state import ExperimentState, Prediction, Run, ShadowResult, StateUnavailable

log = logging.getLogger("committee.experiments")
T = TypeVar("T")
REPORTS_CACHED = 64
MAX_KEY_CHARS = 256
DB_THREADS = 4  # database calls in flight at once (each thread keeps one connection) ...
DB_WAITING = 32  # ... and calls waiting for one; beyond: 503 at once, never a blocked event loop or thread pool
RECENT_ID_S = 30.0  # a request id this young may still be on its way to the database from another replica


@dataclass
class ShadowJob:
    run: Run
    request_id: str
    files: list[tuple[str, bytes]]
    primary_log_probs: np.ndarray  # the first image's log-probabilities
    deadline: float

    @property
    def bytes(self) -> int:
        return sum(len(data) for _, data in self.files)


@dataclass(frozen=True)
class FeedbackResult:
    statuses: list[str]
    recorded: int


# Per-item answers of POST /v1/feedback. Only the first three are not the client's mistake.
RECORDED = "recorded"
ALREADY = "already labelled"
NOT_YET = "not recorded yet"
CLIENT_ERRORS = ("unknown request id", "unknown label", "already labelled with", "experiment run ended")
RUN_ENDED = "experiment run ended: its evidence is closed"


def new_request_id() -> str:
    """32 hex digits: milliseconds since the epoch, then randomness. The time lets feedback tell an
    id that may still be on its way from another replica's buffer from one that never existed."""
    return f"{int(time.time() * 1000):012x}{uuid.uuid4().hex[:20]}"


def request_id_age_s(request_id: str) -> float | None:
    if len(request_id) != 32:
        return None
    try:
        return time.time() - int(request_id[:12], 16) / 1000
    except ValueError:
        return None


def key_digest(key: str) -> int:
    """What the database keeps of an assignment key: enough to group a user's requests, not the
    key. 52 bits, so the report's float64 columns hold it exactly (collisions among 10^5 keys: ~1e-6)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:13], 16)


class FeedbackRefused(Unprocessable):
    """No item of a feedback call was recorded, each because of the client's input."""

    def __init__(self, message: str, results: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.body = {"results": results}


class FeedbackNotYet(StateUnavailable):
    """No item was recorded and some answers are still on their way to the database: retry."""

    def __init__(self, message: str, results: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.body = {"results": results}


class Experiments:
    def __init__(self, state: ExperimentState, registry: Registry, metrics: ServiceMetrics, pixel_limits: PixelLimits, *,
                 experiments_file: Path | None, refresh_s: float, report_cache_s: float, flush_timeout_s: float,
                 call_timeout_s: float, shadow_queue_size: int, shadow_max_bytes: int, shadow_timeout_s: float) -> None:
        self.state = state
        self.registry = registry
        self.metrics = metrics
        self.pixel_limits = pixel_limits
        self.file_experiments = load_experiments(experiments_file) if experiments_file else []
        self.refresh_s = refresh_s
        self.report_cache_s = report_cache_s
        self.flush_timeout_s = flush_timeout_s
        self.call_timeout_s = call_timeout_s
        self.shadow_queue_size = shadow_queue_size
        self.shadow_max_bytes = shadow_max_bytes
        self.shadow_timeout_s = shadow_timeout_s
        self.live: dict[str, Run] = {}  # name -> live run, as last read from the database
        self.synced = False  # the live runs have been read at least once
        self._file_applied = False
        self._queues: dict[str, asyncio.Queue[ShadowJob]] = {}  # by run id
        self._workers: dict[str, asyncio.Task] = {}
        self._shadow_bytes = 0
        self._reports: OrderedDict[tuple[str, str | None], tuple[float, Report]] = OrderedDict()
        self._report_locks: dict[tuple[str, str | None], asyncio.Lock] = {}
        self._definitions = asyncio.Lock()  # refresh, create and delete apply in the order they read
        self._refresher: asyncio.Task | None = None
        self._first_sync = asyncio.Event()
        self._db_pool = ThreadPoolExecutor(DB_THREADS, thread_name_prefix="experiment-db")
        self._db_calls = 0
        self._shadow_failure_logged = 0.0

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the writer and the refresher, and give the first read of the live runs up to
        ``flush_timeout_s``: a reachable database serves experiments from the first request, one
        that is down delays the start by that much and no more."""
        self.state.start()
        self._refresher = asyncio.create_task(self._refresh_loop())
        try:
            await asyncio.wait_for(self._first_sync.wait(), self.flush_timeout_s)
        except TimeoutError:
            log.warning("experiments: the state database is not reachable yet; experiment routes answer 503 until it is")

    async def close(self) -> None:
        tasks = [t for t in (self._refresher, *self._workers.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._workers.clear()
        await asyncio.to_thread(self.state.close)
        self._db_pool.shutdown(wait=False, cancel_futures=True)

    async def _db(self, call: Callable[..., T], *args: Any) -> T:
        """A synchronous state call on the database threads, never on the event loop or the
        thread pool that decodes images: at most DB_THREADS run and DB_WAITING wait; the caller
        waits at most ``call_timeout_s`` (a hung database answers 503, it never holds a request)."""
        if self._db_calls >= DB_THREADS + DB_WAITING:
            raise StateUnavailable("the experiment database is busy: too many calls waiting for it; retry shortly")
        self._db_calls += 1
        try:
            future = asyncio.get_running_loop().run_in_executor(self._db_pool, call, *args)
            return await asyncio.wait_for(future, self.call_timeout_s)
        except TimeoutError:
            raise self.state.unavailable(f"no answer within {self.call_timeout_s:g} s") from None
        finally:
            self._db_calls -= 1

    async def _flushed(self) -> None:
        """Wait (on the loop, holding no thread) until what was buffered before now is written;
        503 after ``flush_timeout_s``."""
        target = self.state.enqueued
        deadline = time.monotonic() + self.flush_timeout_s
        while self.state.done < target:
            if not self.state.up or time.monotonic() > deadline:
                raise self.state.unavailable()
            await asyncio.sleep(0.005)

    async def _refresh_loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except StateUnavailable:
                pass  # keep serving the runs last read; the writer logs the outage
            except Exception:
                log.exception("experiments: refresh failed")
            await asyncio.sleep(self.refresh_s if self.synced else min(self.refresh_s, 0.1))

    async def refresh(self) -> None:
        """Apply the experiments file once, then read the live runs (another replica may have
        created, replaced or deleted some). A file definition starts a run only the first time
        the database sees it (by content): restarts and other replicas do not undo what an
        operator changed through the admin API since."""
        async with self._definitions:
            if not self._file_applied:
                for experiment in self.file_experiments:
                    await self._db(self.state.start_run, experiment, "replaced by the experiments file", file_source(experiment))
                self._file_applied = True
                if self.file_experiments:
                    log.info("experiments file: %s", ", ".join(e.name for e in self.file_experiments))
            self._adopt(await self._db(self.state.live_runs))

    def _adopt(self, runs: list[Run]) -> None:
        fresh = {run.experiment.name: run for run in runs}
        for name, run in self.live.items():
            if name not in fresh or fresh[name].run_id != run.run_id:
                self._stop_shadow(run.run_id)
        for run in fresh.values():
            self._start_series(run)
        self.live, self.synced = fresh, True
        self._first_sync.set()

    def _start_series(self, run: Run) -> None:
        experiment = run.experiment
        # series exist from the start (at 0), so ratios and rates are defined before the first event
        for arm in experiment.arms:
            self.metrics.experiment_assignments.labels(experiment.name, arm.name)
        if experiment.shadow and run.run_id not in self._workers:
            self.metrics.shadow_agreements.labels(experiment.name)
            for outcome in ("done", "dropped", "failed"):
                self.metrics.shadow_runs.labels(experiment.name, outcome)
            self._queues[run.run_id] = asyncio.Queue(self.shadow_queue_size)
            self._workers[run.run_id] = asyncio.create_task(self._shadow_worker(run.run_id))

    def _stop_shadow(self, run_id: str) -> None:
        worker = self._workers.pop(run_id, None)
        if worker:
            worker.cancel()
        queue = self._queues.pop(run_id, None)
        while queue is not None and not queue.empty():
            self._shadow_bytes -= queue.get_nowait().bytes

    # ---- definitions ----------------------------------------------------------------------------
    def running(self, name: str) -> Run:
        """The live run of ``name`` (hot path: a dict lookup, no database)."""
        run = self.live.get(name)
        if run is None:
            if not self.synced:
                raise self.state.unavailable()
            raise NotFound(f"experiment {name!r} does not exist; GET /v1/experiments lists them")
        return run

    async def create(self, experiment: Experiment) -> Run:
        """Start a run (the previous run of the name, if any, ends and is archived)."""
        self.check_labels(experiment)
        async with self._definitions:
            run = await self._db(self.state.start_run, experiment)
            assert run is not None
            previous = self.live.get(experiment.name)
            self._adopt([r for r in self.live.values() if r.experiment.name != experiment.name] + [run])
        log.info("experiment %s: run %s started%s", experiment.name, run.run_id,
                 f" (run {previous.run_id} archived)" if previous else "")
        return run

    async def delete(self, name: str) -> Run:
        async with self._definitions:
            ended = await self._db(self.state.end_run, name, "deleted")
            if ended is None:
                raise NotFound(f"experiment {name!r} has no live run; GET /v1/experiments lists them")
            self._adopt([r for r in self.live.values() if r.experiment.name != name])
        return ended

    async def listed(self) -> list[Run]:
        """The database's live runs (and this replica adopts them)."""
        await self.refresh()
        return list(self.live.values())

    def check_labels(self, experiment: Experiment) -> None:
        """Every served variant of the experiment answers in the same label set (else the
        comparison would compare different questions)."""
        label_sets = {}
        for name in experiment.variants():
            try:
                label_sets[name] = tuple(self.registry.get(name).manifest.labels)
            except ServiceError:
                continue  # not served (yet): its requests answer 404/503 until it is
        if len(set(label_sets.values())) > 1:
            raise BadRequest(f"experiment {experiment.name!r}: its variants do not share one label set: {sorted(label_sets)}")

    # ---- serving ------------------------------------------------------------------------------
    def assign(self, run: Run, key: str) -> Arm:
        if len(key) > MAX_KEY_CHARS:
            raise BadRequest(f"the assignment key ({run.experiment.key_header}) has {len(key)} characters; "
                             f"at most {MAX_KEY_CHARS} are allowed")
        arm = run.experiment.assign(key, run.run_id)
        self.metrics.experiment_assignments.labels(run.experiment.name, arm.name).inc()
        return arm

    def record(self, run: Run, arm: Arm, key: str, variant: Variant, logits: np.ndarray, latency_s: float,
               files: list[tuple[str, bytes]]) -> str | None:
        """Record the primary answer (its first image) when the key is sampled, and hand the image
        to the shadow, if any. Returns the answer's request id (generated here, never the
        client's), or None when the key is not recorded."""
        if not run.experiment.records(key, run.run_id):
            return None
        request_id = new_request_id()
        log_probs = log_softmax(logits[:1].astype(np.float64))
        top1 = int(log_probs[0].argmax())
        self.state.record_prediction(Prediction(
            request_id, run.run_id, arm.name, variant.manifest.name, variant.manifest.version, key_digest(key),
            1000 * latency_s, top1, round(float(np.exp(log_probs[0, top1])), 6), time.time()))
        shadow = run.experiment.shadow
        if shadow is not None and shadow != arm.variant:  # nothing to compare with itself
            self._offer_shadow(ShadowJob(run, request_id, files[:1], log_probs, time.monotonic() + self.shadow_timeout_s))
        return request_id

    def _offer_shadow(self, job: ShadowJob) -> None:
        name = job.run.experiment.name
        queue = self._queues.get(job.run.run_id)
        if queue is None or queue.full() or self._shadow_bytes + job.bytes > self.shadow_max_bytes:
            self.metrics.shadow_runs.labels(name, "dropped").inc()
            return
        self._shadow_bytes += job.bytes
        queue.put_nowait(job)

    async def _shadow_worker(self, run_id: str) -> None:
        queue = self._queues[run_id]
        while True:
            job = await queue.get()
            self._shadow_bytes -= job.bytes
            name = job.run.experiment.name
            try:
                outcome = await self._run_shadow(job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failed shadow is counted (and logged once a minute); the primary already answered
                outcome = "failed"
                if time.monotonic() - self._shadow_failure_logged > 60:
                    self._shadow_failure_logged = time.monotonic()
                    log.warning("shadow %s of experiment %s failed: %s (further failures this minute are only counted)",
                                job.run.experiment.shadow, name, exc)
            self.metrics.shadow_runs.labels(name, outcome).inc()

    async def _run_shadow(self, job: ShadowJob) -> str:
        """Run one shadow job when its runners can take it without delaying live work: each admits
        the image and none has a full batch of live work waiting; else drop it."""
        variant = self.registry.get(job.run.experiment.shadow)  # type: ignore[arg-type]
        for runner in variant.runners:
            batcher = runner.batcher
            if batcher.queued_images >= batcher.max_batch_size or not batcher.admits(1, job.deadline):
                return "dropped"
        model = variant.manifest.name
        started = time.perf_counter()
        outcome = "error"
        try:
            with leased(variant):
                rows = await asyncio.to_thread(images_to_rows, job.files, variant.manifest.input, self.pixel_limits)
                prediction = await variant.predict(rows, job.deadline)
            outcome = "ok"
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(model, "shadow", outcome).inc()
            self.metrics.request_duration.labels(model, "shadow").observe(elapsed)
        shadow = log_softmax(prediction.logits.astype(np.float64))[0]
        primary = job.primary_log_probs[0]
        kl = float((np.exp(primary) * (primary - shadow)).sum())
        if int(shadow.argmax()) == int(primary.argmax()):
            self.metrics.shadow_agreements.labels(job.run.experiment.name).inc()
        self.state.record_shadow(ShadowResult(job.request_id, model, variant.manifest.version, int(shadow.argmax()), kl,
                                              1000 * elapsed, time.time()))
        return "done"

    # ---- feedback and reports --------------------------------------------------------------------
    async def feedback(self, items: list[tuple[str, str | int]]) -> FeedbackResult:
        """Record true labels (class name, any case, or index) for request ids. Append-only: a
        request's first label stands, and a run that ended takes none. Every "recorded" is
        committed before this returns. When no item is recorded, the call is refused: 422 with the
        reasons when they are the client's, 503 when some answers are still on their way."""
        await self._flushed()  # answers given here just now are in the database
        known = await self._db(self.state.recorded, list(dict.fromkeys(rid for rid, _ in items)))
        statuses: list[str] = []
        planned: dict[str, tuple[str, int]] = {}  # request id -> (run id, label): the first occurrence
        for rid, label in items:
            found = known.get(rid)
            if found is None:
                age = request_id_age_s(rid)
                recent = age is not None and -5 < age < RECENT_ID_S
                statuses.append(f"{NOT_YET}: answered {age:.0f} s ago; retry shortly" if recent else "unknown request id")
                continue
            if not found.live:
                statuses.append(RUN_ENDED)
                continue
            index = self._label_index(found.variant, label)
            if isinstance(index, str):
                statuses.append(index)
                continue
            earlier = found.label if found.label is not None else planned.get(rid, (None, None))[1]
            statuses.append(RECORDED if earlier is None else _already(earlier, index))
            planned.setdefault(rid, (found.run_id, index))
        inserted, existing = await self._db(self.state.add_labels, [(rid, run, label) for rid, (run, label) in planned.items()])
        counted: set[str] = set()
        for i, (rid, _) in enumerate(items):
            if statuses[i] != RECORDED or rid in counted:
                continue
            if rid not in inserted:  # another replica labelled it, or the run ended, between our read and our write
                statuses[i] = _already(existing[rid], planned[rid][1]) if rid in existing else RUN_ENDED
                continue
            counted.add(rid)
            found = known[rid]
            self.metrics.feedback.labels(found.experiment, found.arm,
                                         "correct" if found.top1 == planned[rid][1] else "wrong").inc()
        recorded = sum(s == RECORDED for s in statuses)
        if recorded == 0:
            results = [{"request_id": rid, "status": s} for (rid, _), s in zip(items, statuses)]
            more = " (and more; see results)" if len(items) > 1 else ""
            if any(s.startswith(NOT_YET) for s in statuses):
                raise FeedbackNotYet(f"no label was recorded: some answers are not in the experiment database yet{more}", results)
            if any(s.startswith(CLIENT_ERRORS) for s in statuses):
                raise FeedbackRefused(f"no label was recorded: {statuses[0]}{more}", results)
        return FeedbackResult(statuses, recorded)

    def _label_index(self, variant: str, label: str | int) -> int | str:
        try:
            labels = self.registry.get(variant).manifest.labels
        except ServiceError:
            labels = None
        if isinstance(label, int):
            if labels is not None and not 0 <= label < len(labels):
                return f"unknown label index {label} (the model has {len(labels)} classes)"
            return label
        if labels is None:
            return f"unknown label {label!r} (the variant is not served: send the index)"
        folded = [name.casefold() for name in labels]
        if label.casefold() not in folded:
            return f"unknown label {label!r}; labels are {labels}"
        return folded.index(label.casefold())

    async def report(self, name: str, run_id: str | None = None) -> Report:
        """The report of the run ``run_id`` of ``name`` (default: its live run, else its last
        one), computed at most once per ``report_cache_s`` for each, however many ask at once."""
        key = (name, run_id)
        lock = self._report_locks.setdefault(key, asyncio.Lock())
        try:
            return await self._report(key, lock)
        finally:
            if key not in self._reports:  # an unknown name leaves nothing behind
                self._report_locks.pop(key, None)

    async def _report(self, key: tuple[str, str | None], lock: asyncio.Lock) -> Report:
        name, run_id = key
        async with lock:  # single flight per report: a burst of reads costs one computation
            cached = self._reports.get(key)
            if cached is not None and time.monotonic() - cached[0] < self.report_cache_s:
                return cached[1]
            run = await self._db(self.state.find_run, name, run_id)
            if run is None:
                raise NotFound(f"experiment {name!r} has no run {run_id!r}" if run_id else
                               f"experiment {name!r} does not exist; GET /v1/experiments lists them")
            if run.live:
                await self._flushed()
            rows = await self._db(self.state.run_rows, run)
            report = await asyncio.to_thread(build_report, run, rows)
            self._reports[key] = (time.monotonic(), report)
            self._reports.move_to_end(key)
            while len(self._reports) > REPORTS_CACHED:
                evicted, _ = self._reports.popitem(last=False)
                self._report_locks.pop(evicted, None)
            return report


def _already(earlier: int, wanted: int) -> str:
    return ALREADY if earlier == wanted else f"already labelled with {earlier}; the first label stands"


def file_source(experiment: Experiment) -> str:
    """The source of a run started by the experiments file: the content the file sets (defaults
    left out, so a new version that adds a field does not restart file-defined runs)."""
    definition = json.dumps(experiment.model_dump(mode="json", exclude_unset=True), sort_keys=True)
    return "file:" + hashlib.sha256(definition.encode()).hexdigest()[:16]
