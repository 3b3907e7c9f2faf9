import asyncio
import threading
import time

import numpy as np
import pytest

from service.batcher import DynamicBatcher
from service.errors import DeadlineExceeded, InferenceFailed, QueueFull, ShuttingDown


class Recorder:
    """A run function that records batch sizes and doubles its input."""

    def __init__(self, delay: float = 0.0, fail_when=lambda rows: False):
        self.sizes: list[int] = []
        self.delay = delay
        self.fail_when = fail_when
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, rows: np.ndarray) -> list[np.ndarray]:
        self.gate.wait(5)
        self.sizes.append(len(rows))
        if self.delay:
            time.sleep(self.delay)
        if self.fail_when(rows):
            raise RuntimeError("boom")
        return [rows * 2]


def run(coro):
    return asyncio.run(coro)


async def blocked(max_queue_size: int = 8, observer=None) -> tuple[Recorder, DynamicBatcher, asyncio.Future]:
    """A batcher (batches of 1) whose first batch is stuck in the runtime until ``rec.gate.set()``."""
    rec = Recorder()
    rec.gate.clear()
    b = DynamicBatcher(rec, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=max_queue_size, observer=observer)
    blocker = asyncio.ensure_future(b.submit(np.zeros((1, 1)), far()))
    await asyncio.sleep(0.05)  # taken into the stuck batch
    return rec, b, blocker


def far():
    return time.monotonic() + 30


def test_concurrent_requests_share_a_batch_and_get_their_own_rows():
    async def main():
        rec = Recorder()
        b = DynamicBatcher(rec, max_batch_size=8, max_queue_delay_s=0.05, max_queue_size=64)
        results = await asyncio.gather(*(b.submit(np.full((1, 2), i, np.float32), far()) for i in range(5)))
        await b.close()
        return rec, results

    rec, results = run(main())
    assert rec.sizes == [5]
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r.outputs[0], np.full((1, 2), 2 * i))
        assert r.batch_sizes == (5,)


def test_batch_is_cut_at_max_batch_size_without_waiting():
    async def main():
        rec = Recorder()
        b = DynamicBatcher(rec, max_batch_size=4, max_queue_delay_s=10.0, max_queue_size=64)
        started = time.monotonic()
        await asyncio.gather(*(b.submit(np.zeros((1, 1)), far()) for _ in range(8)))
        elapsed = time.monotonic() - started
        await b.close()
        return rec, elapsed

    rec, elapsed = run(main())
    assert rec.sizes == [4, 4]
    assert elapsed < 5  # never waited for the 10 s delay


def test_a_lone_request_runs_after_the_queue_delay():
    async def main():
        b = DynamicBatcher(Recorder(), max_batch_size=32, max_queue_delay_s=0.05, max_queue_size=64)
        result = await b.submit(np.zeros((1, 1)), far())
        await b.close()
        return result

    result = run(main())
    assert 0.04 <= result.queue_s < 1.0


def test_large_request_is_split_across_batches_and_reassembled():
    async def main():
        rec = Recorder()
        b = DynamicBatcher(rec, max_batch_size=4, max_queue_delay_s=0.0, max_queue_size=64)
        rows = np.arange(10, dtype=np.float32).reshape(10, 1)
        result = await b.submit(rows, far())
        await b.close()
        return rec, result, rows

    rec, result, rows = run(main())
    assert rec.sizes == [4, 4, 2] and result.batch_sizes == (4, 4, 2)
    np.testing.assert_array_equal(result.outputs[0], rows * 2)


def test_full_queue_refuses_at_once():
    async def main():
        rec = Recorder()
        rec.gate.clear()  # the first batch blocks, so the queue fills behind it
        b = DynamicBatcher(rec, max_batch_size=2, max_queue_delay_s=0.0, max_queue_size=4)
        first = asyncio.ensure_future(b.submit(np.zeros((2, 1)), far()))
        await asyncio.sleep(0.05)  # taken into the blocked batch
        waiting = asyncio.ensure_future(b.submit(np.zeros((4, 1)), far()))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="4 images queued \\(limit 4\\)"):
            await b.submit(np.zeros((1, 1)), far())
        rec.gate.set()
        await asyncio.gather(first, waiting)
        await b.close()

    run(main())


class Drops:
    """An observer that keeps what the batcher dropped."""

    def __init__(self):
        self.seen: list[tuple[str, int]] = []

    def batch_done(self, size, compute_s): pass
    def queue_depth(self, images): pass
    def shed(self, reason): pass

    def dropped(self, reason, requests):
        self.seen.append((reason, requests))


def test_request_past_its_deadline_is_dropped_before_running():
    drops = Drops()

    async def main():
        rec, b, blocker = await blocked(observer=drops)
        late = asyncio.ensure_future(b.submit(np.ones((1, 1)), time.monotonic() + 0.05))
        await asyncio.sleep(0.1)
        rec.gate.set()
        with pytest.raises(DeadlineExceeded, match="passed its deadline"):
            await late
        await blocker
        await b.close()
        return rec

    rec = run(main())
    assert rec.sizes == [1]  # the late request never ran
    assert drops.seen == [("expired", 1)]


def test_failing_batch_fails_only_its_callers_and_the_loop_goes_on():
    async def main():
        rec = Recorder(fail_when=lambda rows: (rows < 0).any())
        b = DynamicBatcher(rec, max_batch_size=8, max_queue_delay_s=0.0, max_queue_size=64)
        with pytest.raises(InferenceFailed, match="failed for a batch of 1 images$"):
            await b.submit(-np.ones((1, 1)), far())
        ok = await b.submit(np.ones((1, 1)), far())
        await b.close()
        return ok

    assert run(main()).outputs[0][0, 0] == 2


def test_close_drains_queued_work_then_refuses():
    async def main():
        rec = Recorder(delay=0.02)
        b = DynamicBatcher(rec, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=64)
        pending = [asyncio.ensure_future(b.submit(np.zeros((1, 1)), far())) for _ in range(5)]
        await asyncio.sleep(0)
        await b.close()
        done = await asyncio.gather(*pending)
        with pytest.raises(ShuttingDown):
            await b.submit(np.zeros((1, 1)), far())
        return done

    assert len(run(main())) == 5


def test_cancelled_caller_is_dropped_from_its_batch():
    async def main():
        rec, b, blocker = await blocked()
        gone = asyncio.ensure_future(b.submit(np.zeros((1, 1)), far()))
        await asyncio.sleep(0.01)
        gone.cancel()
        rec.gate.set()
        await blocker
        await b.close()
        return rec

    assert run(main()).sizes == [1]


@pytest.mark.parametrize("kwargs, message", [
    ({"max_batch_size": 0}, "max_batch_size must be an integer >= 1"),
    ({"max_queue_delay_s": -1}, "max_queue_delay_s must be >= 0"),
    ({"max_queue_size": 2}, "max_queue_size \\(2\\) must be >= max_batch_size \\(8\\)"),
])
def test_arguments_are_validated_with_what_is_allowed(kwargs, message):
    async def main():
        args = {"max_batch_size": 8, "max_queue_delay_s": 0.0, "max_queue_size": 64, **kwargs}
        DynamicBatcher(Recorder(), **args)

    with pytest.raises(ValueError, match=message):
        run(main())


def test_rows_of_two_shapes_in_one_batch_fail_their_callers_and_later_requests_are_served():
    async def main():
        rec = Recorder()
        b = DynamicBatcher(rec, max_batch_size=8, max_queue_delay_s=0.05, max_queue_size=64)
        results = await asyncio.gather(b.submit(np.zeros((1, 2)), far()), b.submit(np.zeros((1, 3)), far()),
                                       return_exceptions=True)
        later = await asyncio.wait_for(b.submit(np.ones((1, 2)), far()), 5)
        await b.close()
        return results, later

    results, later = run(main())
    assert all(isinstance(r, InferenceFailed) for r in results)
    np.testing.assert_array_equal(later.outputs[0], [[2, 2]])


def test_a_failing_loop_fails_its_waiters_and_restarts():
    async def main():
        b = DynamicBatcher(Recorder(), max_batch_size=8, max_queue_delay_s=0.0, max_queue_size=64)
        original = b._take_batch
        calls = {"n": 0}

        def broken_once():
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("a bug in the loop")
            return original()

        b._take_batch = broken_once
        with pytest.raises(InferenceFailed, match="the batcher of model failed"):
            await asyncio.wait_for(b.submit(np.zeros((1, 2)), far()), 5)
        served = await asyncio.wait_for(b.submit(np.ones((1, 2)), far()), 5)
        await b.close()
        return served

    np.testing.assert_array_equal(run(main()).outputs[0], [[2, 2]])


def test_submit_never_waits_past_the_deadline_even_if_the_runtime_hangs():
    async def main():
        rec = Recorder()
        rec.gate.clear()  # the runtime hangs until released
        b = DynamicBatcher(rec, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=8)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="passed its deadline"):
            await b.submit(np.zeros((1, 1)), time.monotonic() + 0.2)
        waited = time.monotonic() - started
        rec.gate.set()
        await b.close()
        return waited

    assert run(main()) < 2


def test_a_burst_that_fits_the_deadline_is_admitted_in_full_and_one_that_does_not_is_refused_at_once():
    async def main():
        rec, b, blocker = await blocked(max_queue_size=64)
        b.throughput.observe(1, 0.1)  # 100 ms per image, as measured; one image is computing now
        burst = [asyncio.ensure_future(b.submit(np.zeros((1, 1)), far())) for _ in range(40)]
        await asyncio.sleep(0.01)
        assert b.queued_images == 40  # 4.1 s of work, inside the 30 s deadline: all of it queues
        started = time.monotonic()
        with pytest.raises(QueueFull, match="expected completion in 4200 ms is past the") as refused:
            await b.submit(np.zeros((1, 1)), time.monotonic() + 1.0)
        assert time.monotonic() - started < 0.05  # at once, not after queueing
        assert refused.value.headers["Retry-After"] == "5"  # the 4.1 s backlog, rounded up
        b.max_queue_wait_s = 0.25  # an operator's cap below the deadline refuses too
        with pytest.raises(QueueFull, match="past the 250 ms"):
            await b.submit(np.zeros((1, 1)), far())
        b.max_queue_wait_s = 0.0
        b.throughput.observe(1, 0.0001)  # faster now: refusals stop (not a lockout)
        b.throughput.seconds_per_image = 0.001
        late_fitting = asyncio.ensure_future(b.submit(np.zeros((1, 1)), time.monotonic() + 1.0))
        rec.gate.set()
        await asyncio.gather(blocker, *burst, late_fitting)
        await b.close()
        return rec

    assert run(main()).sizes == [1] * 42  # every admitted request ran


def test_a_batch_that_started_in_time_is_answered_late_not_dropped():
    async def main():
        rec = Recorder(delay=0.3)
        b = DynamicBatcher(rec, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=8)
        started = time.monotonic()
        result = await b.submit(np.ones((1, 1)), time.monotonic() + 0.1)
        await b.close()
        return time.monotonic() - started, result

    elapsed, result = run(main())
    assert elapsed >= 0.3 and result.outputs[0].tolist() == [[2.0]]


def test_instances_run_batches_concurrently():
    async def main():
        rec = Recorder(delay=0.2)
        b = DynamicBatcher(rec, max_batch_size=1, max_queue_delay_s=0.0, max_queue_size=8, instances=4)
        started = time.monotonic()
        await asyncio.gather(*(b.submit(np.zeros((1, 1)), far()) for _ in range(4)))
        elapsed = time.monotonic() - started
        await b.close()
        return elapsed

    assert run(main()) < 0.6  # four 0.2 s batches, one after another, would take 0.8 s
