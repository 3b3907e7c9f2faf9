"""Dynamic batching in front of one model runtime.

Semantics: requests queue in arrival order. A batch is cut as soon as ``max_batch_size`` images
are waiting, or ``max_queue_delay`` after the first waiting image arrived, whichever comes first;
it runs off the event loop (in a worker thread), and each caller gets its own rows back. While a
batch computes, the next one gathers, so under load batches fill up on their own. Up to
``instances`` batches run at once (ONNX Runtime sessions are thread-safe).

- The queue is bounded (``max_queue_size`` images): ``submit`` raises ``QueueFull`` at once. It also
  refuses at once a request not expected to complete before its deadline (see ``admission``): a
  burst that fits is queued in full, one that does not costs its refusals nothing but the check.
- A request larger than ``max_batch_size`` is split into chunks that ride in separate batches.
- A request whose deadline passes before its batch starts is dropped from it, never computed
  (``DeadlineExceeded``, counted as ``expired``). One whose batch started in time is answered even
  if it finishes late (its compute is spent; the caller counts the late answer), but ``submit``
  never waits more than ``late_grace_s`` past the deadline, whatever happens to the batch. A caller
  that went away (cancelled) is dropped too; rows computed for a caller that left meanwhile are
  counted as ``abandoned``.
- A failing batch (the runtime raises, or its rows cannot be stacked) fails only its own callers
  (``InferenceFailed``); the loop goes on. Should the loop itself fail, every waiter is failed and
  the loop restarts, so no request is ever left hanging.
- ``close()`` refuses new work, lets everything queued finish, then stops the loop.

All times come from the monotonic clock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from . import admission
from .errors import DeadlineExceeded, InferenceFailed, QueueFull, ShuttingDown

log = logging.getLogger("committee.batcher")

RunBatch = Callable[[np.ndarray], list[np.ndarray]]


class BatchObserver(Protocol):
    """Receives what the batcher measures (metrics live elsewhere)."""

    def batch_done(self, size: int, compute_s: float) -> None: ...
    def queue_depth(self, images: int) -> None: ...
    def shed(self, reason: str) -> None: ...
    def dropped(self, reason: str, requests: int) -> None: ...


class _NullObserver:
    def batch_done(self, size: int, compute_s: float) -> None:
        pass

    def queue_depth(self, images: int) -> None:
        pass

    def shed(self, reason: str) -> None:
        pass

    def dropped(self, reason: str, requests: int) -> None:
        pass


@dataclass(frozen=True)
class BatchResult:
    outputs: list[np.ndarray]  # one array per model output, rows of this request only
    queue_s: float  # longest wait of any of the request's chunks before its batch started
    compute_s: float  # summed compute time of the batches the request rode in
    batch_sizes: tuple[int, ...]


@dataclass
class _Pending:
    rows: np.ndarray
    enqueued: float
    deadline: float
    future: asyncio.Future = field(repr=False)
    started: bool = False  # taken into a batch


@dataclass(frozen=True)
class _ChunkResult:
    outputs: list[np.ndarray]
    queue_s: float
    compute_s: float
    batch_size: int


class Throughput:
    """Seconds per image of recent (at least half-full) batches, an exponential moving average, for
    expected waits. Seeded at load time by a warm-up batch (see ``warm_up``)."""

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.seconds_per_image: float | None = None

    def observe(self, images: int, compute_s: float) -> None:
        sample = compute_s / images
        current = self.seconds_per_image
        self.seconds_per_image = sample if current is None else current + self.weight * (sample - current)


class DynamicBatcher:
    def __init__(
        self,
        run: RunBatch,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        max_queue_wait_s: float = 0.0,
        instances: int = 1,
        late_grace_s: float = 1.0,
        name: str = "model",
        observer: BatchObserver | None = None,
    ) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        if max_queue_delay_s < 0:
            raise ValueError(f"max_queue_delay_s must be >= 0, got {max_queue_delay_s!r}")
        if max_queue_size < max_batch_size:
            raise ValueError(f"max_queue_size ({max_queue_size}) must be >= max_batch_size ({max_batch_size})")
        if max_queue_wait_s < 0:
            raise ValueError(f"max_queue_wait_s must be >= 0 (0: the deadline only), got {max_queue_wait_s!r}")
        if not isinstance(instances, int) or instances < 1:
            raise ValueError(f"instances must be an integer >= 1, got {instances!r}")
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.max_queue_wait_s = max_queue_wait_s
        self.instances = instances
        self.late_grace_s = late_grace_s
        self.name = name
        self.throughput = Throughput()
        self._observer = observer or _NullObserver()
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._running = 0  # batches computing now
        self._running_rows = 0  # ... and their images
        self._wakeup = asyncio.Event()
        self._slot_free = asyncio.Event()
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=instances, thread_name_prefix=f"batch-{name}")
        self._batches: set[asyncio.Task] = set()
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name=f"batcher-{name}")

    async def warm_up(self, sample: np.ndarray) -> None:
        """Run one full batch of ``sample`` rows now (first runs are slow: allocation, kernel choice)
        and a second one to seed the throughput estimate before any request is admitted."""
        rows = np.repeat(sample[:1], self.max_batch_size, axis=0)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._run, rows)
        started = time.monotonic()
        await loop.run_in_executor(self._executor, self._run, rows)
        self.throughput.observe(len(rows), time.monotonic() - started)

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def queued_images(self) -> int:
        return self._queued_rows

    @property
    def images_ahead(self) -> int:
        """Images a new request would wait for: queued, and in the batches computing now."""
        return self._queued_rows + self._running_rows

    def admit(self, images: int, deadline: float) -> None:
        """Raise at once (``QueueFull``/``ShuttingDown``) if ``images`` more should not queue now.
        Cheap: callers use it before they parse a request body."""
        refusal = self._refusal(images, deadline)
        if refusal is not None:
            reason, error = refusal
            if reason:
                self._observer.shed(reason)
            raise error

    def admits(self, images: int, deadline: float) -> bool:
        """Whether ``admit`` would let ``images`` in now, without counting a refusal (for optional
        work such as a shadow, which is not load shed from anyone)."""
        return self._refusal(images, deadline) is None

    def _refusal(self, images: int, deadline: float) -> tuple[str | None, Exception] | None:
        if self._closing:
            return None, ShuttingDown(f"model {self.name} is shutting down")
        if self._queued_rows + images > self.max_queue_size:
            return "queue_full", QueueFull(
                f"model {self.name} has {self._queued_rows} images queued (limit {self.max_queue_size}); retry shortly")
        late = admission.judge(self.images_ahead, images, self.throughput.seconds_per_image, self.instances,
                               deadline - time.monotonic(), self.max_queue_wait_s)
        if late is not None:
            return "expected_wait", QueueFull(
                f"model {self.name} is overloaded: expected completion in {1000 * late.wait_s:.0f} ms is past the "
                f"{1000 * late.budget_s:.0f} ms left to the request; retry in {late.retry_after_s} s", late.retry_after_s)
        return None

    async def submit(self, rows: np.ndarray, deadline: float, admit: bool = True) -> BatchResult:
        """Queue ``rows`` (images x ...) and wait for their outputs, at most until ``deadline``
        (monotonic time). ``admit=False``: the request was admitted already (a cascade's later
        stage): only a closing batcher or a full queue refuse it."""
        n = len(rows)
        if n == 0:
            raise ValueError("submit needs at least one row")
        if admit:
            self.admit(n, deadline)
        elif self._closing or self._queued_rows + n > self.max_queue_size:
            self.admit(n, deadline)  # raises, saying which
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        chunks = []
        for start in range(0, n, self.max_batch_size):
            pending = _Pending(rows[start : start + self.max_batch_size], now, deadline, loop.create_future())
            self._queue.append(pending)
            chunks.append(pending)
        self._queued_rows += n
        self._observer.queue_depth(self._queued_rows)
        self._wakeup.set()
        futures = [c.future for c in chunks]
        try:
            _, waiting = await asyncio.wait(futures, timeout=max(0.0, deadline - time.monotonic()),
                                            return_when=asyncio.FIRST_EXCEPTION)
            if waiting and all(c.started for c in chunks if c.future in waiting):  # computing: worth its answer
                _, waiting = await asyncio.wait(futures, timeout=self.late_grace_s, return_when=asyncio.FIRST_EXCEPTION)
            failed = next((f.exception() for f in futures if f.done() and not f.cancelled() and f.exception()), None)
            if failed is not None:
                raise failed
            if waiting:
                raise DeadlineExceeded(f"request to {self.name} passed its deadline after {time.monotonic() - now:.3f} s")
            results: list[_ChunkResult] = [f.result() for f in futures]
        finally:
            for c in chunks:  # the caller gave up, timed out or one chunk failed: the others need not run
                c.future.cancel()
        outputs = [np.concatenate([r.outputs[i] for r in results]) for i in range(len(results[0].outputs))]
        return BatchResult(
            outputs,
            queue_s=max(r.queue_s for r in results),
            compute_s=sum(r.compute_s for r in results),
            batch_sizes=tuple(r.batch_size for r in results),
        )

    async def close(self) -> None:
        """Refuse new work, finish what is queued, stop."""
        self._closing = True
        self._wakeup.set()
        try:
            await self._task
            await asyncio.gather(*self._batches, return_exceptions=True)
        finally:
            self._executor.shutdown(wait=True)

    # ---- the loop ------------------------------------------------------------------------
    async def _supervise(self) -> None:
        """Run the loop; if it ever fails, fail every waiter (none may hang) and start it again."""
        while True:
            try:
                await self._loop()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("batcher loop of %s failed; failing its %d queued requests and restarting", self.name, len(self._queue))
                error = InferenceFailed(f"the batcher of {self.name} failed ({type(exc).__name__}); retry the request")
                while self._queue:
                    item = self._pop()
                    if not item.future.done():
                        item.future.set_exception(error)
                self._observer.queue_depth(self._queued_rows)

    async def _loop(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Wait until the batch is full or the first image has waited max_queue_delay.
            cut_at = self._queue[0].enqueued + self.max_queue_delay_s
            while self._queued_rows < self.max_batch_size and not self._closing:
                remaining = cut_at - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            # Wait for a free instance; the batch keeps gathering meanwhile.
            while self._running >= self.instances:
                self._slot_free.clear()
                await self._slot_free.wait()
            batch = self._take_batch()
            if batch:
                self._running += 1
                task = asyncio.get_running_loop().create_task(self._execute(batch))
                self._batches.add(task)
                task.add_done_callback(self._batch_finished)

    def _batch_finished(self, task: asyncio.Task) -> None:
        self._batches.discard(task)
        self._running -= 1
        self._slot_free.set()

    def _take_batch(self) -> list[_Pending]:
        """Pop whole items in order while they fit, dropping expired and cancelled ones."""
        now = time.monotonic()
        batch: list[_Pending] = []
        size = 0
        while self._queue:
            head = self._queue[0]
            if head.deadline <= now:  # expired: its caller has had (or is about to get) DeadlineExceeded
                self._pop()
                if not head.future.done():
                    head.future.set_exception(DeadlineExceeded(
                        f"request to {self.name} waited {now - head.enqueued:.3f} s and passed its deadline before running"))
                self._observer.dropped("expired", 1)
                continue
            if head.future.done():  # its caller went away
                self._pop()
                continue
            if size + len(head.rows) > self.max_batch_size:
                break
            head.started = True
            batch.append(self._pop())
            size += len(head.rows)
        self._observer.queue_depth(self._queued_rows)
        return batch

    def _pop(self) -> _Pending:
        item = self._queue.popleft()
        self._queued_rows -= len(item.rows)
        return item

    async def _execute(self, batch: list[_Pending]) -> None:
        size = sum(len(p.rows) for p in batch)
        self._running_rows += size
        try:
            await self._compute(batch, size)
        finally:
            self._running_rows -= size

    async def _compute(self, batch: list[_Pending], size: int) -> None:
        started = time.monotonic()
        try:
            # Stacking is inside the guard: rows that cannot meet in one batch fail their callers only.
            rows = batch[0].rows if len(batch) == 1 else np.concatenate([p.rows for p in batch])
            outputs = await asyncio.get_running_loop().run_in_executor(self._executor, self._run, rows)
        except Exception:  # tell exactly this batch's callers; the details go to the log only
            log.exception("batch of %d images on %s failed", size, self.name)
            error = InferenceFailed(f"inference on {self.name} failed for a batch of {size} images")
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(error)
            return
        compute_s = time.monotonic() - started
        if 2 * size >= self.max_batch_size:  # a queue that matters is served in full batches: time those
            self.throughput.observe(size, compute_s)
        self._observer.batch_done(size, compute_s)
        offset = abandoned = 0
        for p in batch:
            n = len(p.rows)
            if p.future.done():  # its caller timed out or went away while this batch computed
                abandoned += 1
            else:
                p.future.set_result(_ChunkResult([o[offset : offset + n] for o in outputs], started - p.enqueued, compute_s, size))
            offset += n
        if abandoned:
            self._observer.dropped("abandoned", abandoned)
