"""The statistics of an A/B report, small and checkable by hand.

- Wilson score interval for one arm's online accuracy (Wilson 1927).
- Two-proportion z-test (pooled) for the difference between arms: valid for ONE look at a
  pre-set sample size, shown for reference.
- McNemar's exact test on the discordant pairs of a paired comparison (both models saw the same
  requests: a shadow and labelled feedback): a two-sided binomial test with p = 1/2.
- The always-valid verdict: the mixture sequential probability ratio test (mSPRT) of Johari,
  Koomen, Pekelis and Walsh, "Always Valid Inference: Continuous Monitoring of A/B Tests",
  Operations Research 70(3), 2022. For an estimate θ̂ ~ N(θ, V) of the accuracy difference and a
  normal mixture θ ~ N(0, τ²) over alternatives, the likelihood ratio against θ = 0 is
      Λ = sqrt(V / (V + τ²)) · exp(τ² θ̂² / (2 V (V + τ²))),
  and p = min over looks of 1/Λ is a p-value that stays valid however often it is read: reading it
  after every request does not raise the false-positive rate above α (the A/A simulation test).
  Its confidence sequence is the set of θ with Λ(θ) < 1/α. V uses the observed proportions, so the
  guarantee is asymptotic; verdicts wait for ``min_samples`` labelled requests per arm. Variances use
  add-half smoothing, so an arm at 0 % or 100 % still has some.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def normal_sf(x: float) -> float:
    return 0.5 * math.erfc(x / math.sqrt(2))


def two_proportion_z(s1: int, n1: int, s2: int, n2: int) -> tuple[float, float] | None:
    """(z, two-sided p) of H0: p1 = p2 with the pooled variance."""
    if n1 == 0 or n2 == 0:
        return None
    pooled = (s1 + s2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (s1 / n1 - s2 / n2) / se
    return z, 2 * normal_sf(abs(z))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact p of McNemar's test: b, c are the discordant pairs (A right and B wrong, and
    the reverse); under H0 each discordant pair falls either way with probability 1/2."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Verdict:
    decision: str  # "A better", "B better", "no difference yet"
    difference: float  # accuracy of A minus B
    p_value: float  # always-valid: the smallest 1/Λ over the looks so far
    interval: tuple[float, float]  # the confidence sequence at 1 - alpha, at this look
    alpha: float
    tau: float
    method: str = "mSPRT (Johari et al. 2022), normal mixture"


def always_valid(in_a: np.ndarray, correct: np.ndarray, alpha: float, tau: float, min_samples: int = 30) -> Verdict | None:
    """The verdict after the labelled outcomes so far, in the order they arrived (``in_a``: the
    outcome is arm A's; ``correct``: the prediction was right). The p-value is the running minimum
    of 1/Λ over every prefix with ``min_samples`` per arm, recomputed from the whole sequence, so
    it does not depend on when anyone looked."""
    in_a, correct = np.asarray(in_a, bool), np.asarray(correct, bool)
    n1, n2 = np.cumsum(in_a), np.cumsum(~in_a)
    s1, s2 = np.cumsum(in_a & correct), np.cumsum(~in_a & correct)
    ready = (n1 >= min_samples) & (n2 >= min_samples)
    if not ready.any():
        return None
    n1, n2, s1, s2 = n1[ready], n2[ready], s1[ready], s2[ready]
    p1, p2 = (s1 + 0.5) / (n1 + 1), (s2 + 0.5) / (n2 + 1)
    v = p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2
    theta = s1 / n1 - s2 / n2
    t2 = tau * tau
    log_lambda = 0.5 * np.log(v / (v + t2)) + t2 * theta**2 / (2 * v * (v + t2))
    p = float(min(1.0, np.exp(-log_lambda.max())))
    last_v, last_theta = float(v[-1]), float(theta[-1])
    half = math.sqrt(last_v * (last_v + t2) / t2 * (2 * math.log(1 / alpha) + math.log((last_v + t2) / last_v)))
    decision = "no difference yet" if p > alpha else ("A better" if last_theta > 0 else "B better")
    return Verdict(decision, last_theta, p, (last_theta - half, last_theta + half), alpha, tau)
