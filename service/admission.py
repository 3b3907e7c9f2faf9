"""Admission by expected completion (after Clipper, NSDI 2017, and "Fail at Scale", ACM Queue 2015).

A request is admitted when it is expected to complete before its deadline: the images ahead of it on
the runner (queued and computing) plus its own, over the runner's measured throughput. A burst that
fits is queued in full, however large (up to ``max_queue_size``); a request that would not make it is
refused at once, because computing an answer nobody waits for any more takes cores from the requests
that can still make theirs. The refusal says when to come back: when the backlog ahead has drained.

The same rule holds for the server as a whole (``ServerLoad``): the requests in flight over the
rate they leave at, which covers what a model queue does not see (parsing, decoding, the loop).

An operator may cap the queue wait below the deadline (``max_queue_wait_ms``); 0 leaves the deadline
as the only budget. Nothing is refused while the throughput is unmeasured or nothing is ahead: the
wait is then the request's own compute, which no refusal would save.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Refusal:
    wait_s: float  # expected time until the request's images would have run
    budget_s: float  # what was left of the deadline (or the operator's cap)
    retry_after_s: int  # whole seconds until the backlog ahead has drained, at least 1


def expected_completion_s(ahead_images: int, images: int, seconds_per_image: float, instances: int) -> float:
    """Seconds until ``images`` more, queued behind ``ahead_images``, have run on ``instances``."""
    return (ahead_images + images) * seconds_per_image / instances


def judge(ahead_images: int, images: int, seconds_per_image: float | None, instances: int,
          time_left_s: float, cap_s: float = 0.0) -> Refusal | None:
    """None to admit; else why not. ``cap_s``: the operator's queue-wait cap (0: none)."""
    if seconds_per_image is None or ahead_images == 0:
        return None
    wait = expected_completion_s(ahead_images, images, seconds_per_image, instances)
    budget = min(time_left_s, cap_s) if cap_s else time_left_s
    if wait <= budget:
        return None
    drain = expected_completion_s(ahead_images, 0, seconds_per_image, instances)
    return Refusal(wait, budget, max(1, math.ceil(drain)))


class ServerLoad:
    """Requests inside the server and the rate they leave at while it is busy.

    On a CPU server the model is rarely the bottleneck: parsing, decoding and the event loop are, and
    a model queue that looks empty says nothing of the requests ahead of a new one in those. By
    Little's law a new request waits about (requests in flight) / (departure rate); the rate is an
    exponential moving average of the gaps between departures, each gap counted from the later of
    the previous departure and the moment the leaving request's body was in, so neither idle time
    nor a slowly uploading request passes for work. What this misses (a loop busy with refusals and
    connections) is learnt from admitted requests: a moving average of measured - expected, each
    sample at most ``max_miss_s``, fading with a half-life so that a burst's lesson does not refuse
    the quiet traffic after it.
    """

    def __init__(self, weight: float = 0.05, correction_half_life_s: float = 5.0, max_miss_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.weight = weight
        self.correction_half_life_s = correction_half_life_s
        self.max_miss_s = max_miss_s
        self.clock = clock
        self.inflight = 0
        self.seconds_per_request: float | None = None
        self._last = 0.0  # the last departure
        self._correction = (0.0, 0.0)  # (seconds, when last updated)

    def arrived(self) -> float:
        """Count a request in; returns its arrival time (give it back to ``departed``)."""
        self.inflight += 1
        return self.clock()

    def departed(self, arrived_at: float) -> None:
        """``arrived_at``: when the request could first be worked on (its body in). A gap is learnt
        only when another request was waiting behind the leaving one: a request alone measures its
        own run time, not the rate the server clears a queue at (other cores may be idle)."""
        now = self.clock()
        if self.inflight > 1:
            gap = now - max(self._last, arrived_at)
            current = self.seconds_per_request
            self.seconds_per_request = gap if current is None else current + self.weight * (gap - current)
        self.inflight -= 1
        self._last = now

    def correction(self) -> float:
        value, at = self._correction
        return value * 0.5 ** ((self.clock() - at) / self.correction_half_life_s) if value else 0.0

    def learn(self, expected_s: float, measured_s: float) -> None:
        """An admitted request took ``measured_s`` where ``expected_s`` (correction included) was expected."""
        current = self.correction()
        miss = min(measured_s - (expected_s - current), self.max_miss_s)  # one slow request teaches little
        self._correction = (current + self.weight * (miss - current), self.clock())

    def expected_completion_s(self, counted: bool = False) -> float:
        """When one request more (or, ``counted``, one already in flight) would leave (0 before any has)."""
        return max(0.0, (self.inflight + (not counted)) * (self.seconds_per_request or 0.0) + self.correction())

    def wait_ahead_s(self) -> float:
        """For a request already counted: the wait for the requests ahead of it, its own service left out."""
        return max(0.0, self.expected_completion_s(counted=True) - (self.seconds_per_request or 0.0))

    def overloaded(self, refusal: Refusal) -> str:
        """What a refused client is told (by the early shed and the data plane alike)."""
        return (f"the server is overloaded: {self.inflight} requests in flight, expected completion in "
                f"{1000 * refusal.wait_s:.0f} ms is past the {1000 * refusal.budget_s:.0f} ms left to the request; "
                f"retry in {refusal.retry_after_s} s")

    def judge(self, time_left_s: float, counted: bool = False) -> Refusal | None:
        """Refuse when the server's backlog outlasts the request's deadline (never an idle server)."""
        wait = self.expected_completion_s(counted)
        if self.inflight <= counted or wait <= time_left_s:
            return None
        return Refusal(wait, time_left_s, max(1, math.ceil(wait)))
