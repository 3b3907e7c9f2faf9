"""Admission by expected completion (after Clipper, NSDI 2017, and "Fail at Scale", ACM Queue 2015).

A request is admitted when it is expected to complete before its deadline: the images ahead of it on
the runner (queued and computing) plus its own, over the runner's measured throughput. A burst that
fits is queued in full, however large (up to ``max_queue_size``); a request that would not make it is
refused at once, because computing an answer nobody waits for any more takes cores from the requests
that can still make theirs. The refusal says when to come back: when the backlog ahead has drained.

An operator may cap the queue wait below the deadline (``max_queue_wait_ms``); 0 leaves the deadline
as the only budget. Nothing is refused while the throughput is unmeasured or nothing is ahead: the
wait is then the request's own compute, which no refusal would save.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


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
