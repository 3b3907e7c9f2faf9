"""Dynamic batching in front of one model runtime.

Semantics: requests queue in arrival order. A batch is cut as soon as ``max_batch_size`` images
are waiting, or ``max_queue_delay`` after the first waiting image arrived, whichever comes first;
it runs off the event loop (in a worker thread), and each caller gets its own rows back. While a
batch computes, the next one gathers, so under load batches fill up on their own.

- The queue is bounded (``max_queue_size`` images): ``submit`` raises ``QueueFull`` at once.
- A request larger than ``max_batch_size`` is split into chunks that ride in separate batches.
- A request whose deadline passes before its batch starts is dropped from it (``DeadlineExceeded``);
  a caller that went away (cancelled) is dropped too.
- A failing batch fails only its own callers (``InferenceFailed``); the loop goes on.
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

from .errors import DeadlineExceeded, InferenceFailed, QueueFull, ShuttingDown

log = logging.getLogger("committee.batcher")

RunBatch = Callable[[np.ndarray], list[np.ndarray]]


class BatchObserver(Protocol):
    """Receives what the batcher measures (metrics live elsewhere)."""

    def batch_done(self, size: int, compute_s: float) -> None: ...
    def queue_depth(self, images: int) -> None: ...


class _NullObserver:
    def batch_done(self, size: int, compute_s: float) -> None:
        pass

    def queue_depth(self, images: int) -> None:
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


@dataclass(frozen=True)
class _ChunkResult:
    outputs: list[np.ndarray]
    queue_s: float
    compute_s: float
    batch_size: int


class DynamicBatcher:
    def __init__(
        self,
        run: RunBatch,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        name: str = "model",
        observer: BatchObserver | None = None,
    ) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        if max_queue_delay_s < 0:
            raise ValueError(f"max_queue_delay_s must be >= 0, got {max_queue_delay_s!r}")
        if max_queue_size < max_batch_size:
            raise ValueError(f"max_queue_size ({max_queue_size}) must be >= max_batch_size ({max_batch_size})")
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.name = name
        self._observer = observer or _NullObserver()
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        # One thread per model: batches of one session run one after another, never concurrently.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{name}")

    @property
    def queued_images(self) -> int:
        return self._queued_rows

    async def submit(self, rows: np.ndarray, deadline: float) -> BatchResult:
        """Queue ``rows`` (images x ...) and wait for their outputs. ``deadline`` is monotonic time."""
        if self._closing:
            raise ShuttingDown(f"model {self.name} is shutting down")
        n = len(rows)
        if n == 0:
            raise ValueError("submit needs at least one row")
        if self._queued_rows + n > self.max_queue_size:
            raise QueueFull(
                f"model {self.name} has {self._queued_rows} images queued (limit {self.max_queue_size}); retry shortly"
            )
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
        try:
            results: list[_ChunkResult] = await asyncio.gather(*(c.future for c in chunks))
        except BaseException:
            for c in chunks:  # the caller gave up or one chunk failed: the others need not run
                c.future.cancel()
            raise
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
        finally:
            self._executor.shutdown(wait=True)

    # ---- the loop ------------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
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
            batch = self._take_batch()
            if batch:
                await self._execute(batch, loop)

    def _take_batch(self) -> list[_Pending]:
        """Pop whole items in order while they fit, dropping expired and cancelled ones."""
        now = time.monotonic()
        batch: list[_Pending] = []
        size = 0
        while self._queue:
            head = self._queue[0]
            if head.future.done():  # cancelled by its caller
                self._pop()
                continue
            if head.deadline <= now:
                self._pop()
                head.future.set_exception(DeadlineExceeded(
                    f"request to {self.name} waited {now - head.enqueued:.3f} s and passed its deadline before running"
                ))
                continue
            if size + len(head.rows) > self.max_batch_size:
                break
            batch.append(self._pop())
            size += len(head.rows)
        self._observer.queue_depth(self._queued_rows)
        return batch

    def _pop(self) -> _Pending:
        item = self._queue.popleft()
        self._queued_rows -= len(item.rows)
        return item

    async def _execute(self, batch: list[_Pending], loop: asyncio.AbstractEventLoop) -> None:
        rows = batch[0].rows if len(batch) == 1 else np.concatenate([p.rows for p in batch])
        started = time.monotonic()
        try:
            outputs = await loop.run_in_executor(self._executor, self._run, rows)
        except Exception as exc:  # the runtime failed: tell exactly this batch's callers
            log.exception("batch of %d images on %s failed", len(rows), self.name)
            error = InferenceFailed(f"inference on {self.name} failed for a batch of {len(rows)} images: {exc}")
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(error)
            return
        compute_s = time.monotonic() - started
        self._observer.batch_done(len(rows), compute_s)
        offset = 0
        for p in batch:
            n = len(p.rows)
            if not p.future.done():
                p.future.set_result(_ChunkResult([o[offset : offset + n] for o in outputs], started - p.enqueued, compute_s, len(rows)))
            offset += n
