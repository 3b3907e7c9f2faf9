"""The statistics of an A/B report: pure functions, numpy arrays in, frozen dataclasses out.

**The unit of analysis is the unit of randomisation.** Assignment hashes an assignment *key* (a
user), so keys, not requests, are the independent units: one user's requests share the user's
images, habits and luck. Every variance here is cluster-robust over keys: the per-request accuracy
p̂ = S/N of an arm is a ratio of two per-key sums (right answers s_k, requests n_k), and the delta
method gives

    Var(p̂) ≈ K/(K-1) · Σ_k (s_k - p̂ n_k)² / N² / (1 - h)²      (CR1 over K keys, leverage bound)

(Deng, Knoblich & Lu, "Applying the Delta Method in Metric Analytics", KDD 2018; Cameron & Miller,
"A Practitioner's Guide to Cluster-Robust Inference", J. Human Resources 50(2), 2015), with h the
largest key's share of the arm's requests: an upper bound of the jackknife (CR3) correction for
few or dominant clusters (MacKinnon, Nielsen & Webb, "Cluster-robust inference: A guide to
empirical practice", J. Econometrics 232(2), 2023). A request without a key is its own cluster.
The three sums Σn_k², Σs_k n_k, Σs_k² are updated per outcome from the key's count so far (a
group-wise cumulative count), so the variance at *every* prefix of the label sequence costs a few
numpy passes: 100k outcomes of 20k keys take about 30 ms.

**The verdict** (``compare_arms``) is a confidence sequence for θ = accuracy(A) - accuracy(B): the
normal-mixture boundary of the mixture SPRT (Johari, Koomen, Pekelis & Walsh, "Always Valid
Inference", Operations Research 70(3), 2022; Robbins 1970), which with a consistent variance is the
asymptotic confidence sequence of Waudby-Smith, Arnold, Wu, Howard & Ramdas, "Time-uniform central
limit theory and asymptotic confidence sequences", Annals of Statistics 2024 (arXiv:2103.06476):

    |θ̂_t - θ| ≤ sqrt( V_t (V_t + τ²)/τ² · (2 log(1/α) + log((V_t + τ²)/V_t)) )   at every look t.

What is reported is the *running intersection* of these intervals over every look so far; the
decision reads its sign, and there is no verdict while it contains 0. The always-valid p is the
smallest 1/Λ_t(0) over the looks (so p ≤ α exactly when the interval excludes 0).

**V_t is the variance under θ = 0** (a score-type variance): each arm's keys' residuals are taken
about the *pooled* rate p̄ = S/N of both arms, Σ_k (s_k - p̄ n_k)², not about the arm's own mean.
About its own mean (the Wald variance) a small arm of heavy users looks less variable than it is:
with each user's labels arriving together, a 95/5 A/A of heavy users gave 8 % false verdicts at
20,000 labels and 11.5 % at 60,000, and even a single look at the end had |z| > 1.96 in 8.7 % of
runs; about the pooled rate, 0.6 %. The residuals about the pooled rate are never smaller (each
arm's own mean minimises its sum of squares), so the interval is at least as wide as the Wald
one; for a difference of a few points the two differ by the between-arm term (p̂_arm - p̄)² Σn_k²,
which is small (power is unchanged, measured). It is not the inverted score test: that interval
(the θ whose own variance does not reject them) is not an interval when an arm has a few dominant
keys (a hypothesis far from θ̂ implies a variance so large that the mixture cannot reject it), and
costs a root-finding per look; the verdict, which is what the guarantee is about, is the score
test of θ = 0 either way.

Three guards keep small and lopsided arms from breaking it (each measured by ``simulate.py``;
docs/ab-testing.md has the numbers):

- the leverage bound above;
- a look needs ``min_samples`` labelled requests and ``min_keys`` keys in each arm (the definition
  allows no fewer than 30 and 10: the settings the A/A matrix checks);
- each arm's part of V_t is at least p̃(1-p̃)/N_arm with p̃ = (S+1)/(N+2) pooled over both arms:
  the variance the arm would have if its requests were independent at the pooled rate; a
  cluster-robust estimate below it comes from too few keys (an arm that happens to be all right at
  98 % accuracy has an estimated variance of 0; measured without the floor, a 95/5 A/A with heavy
  users gave 10-13 % false verdicts). Add-one smoothing keeps p̃ off 0 and 1.

**Fixed-n numbers** (the z-test, McNemar) are valid for one look at a sample size fixed in advance
only; they are shown for reference, never for the verdict.

**Sample ratio** (``sample_ratio``): the Dirichlet-multinomial mixture Bayes factor of Lindon &
Malek, "Anytime-Valid Inference for Multinomial Count Data", NeurIPS 2022, over the arms of new
keys: a nonnegative martingale under H0, so p = min(1, 1/max BF) is exact by Ville's inequality.

**Paired** (``paired_sequential``): the discordant pairs of a shadow comparison against a fair coin.
Without keys, the beta-binomial mixture martingale (Robbins 1970; the "betting" view of
Waudby-Smith & Ramdas, JRSS-B 2024): exact by Ville's inequality, no plug-in variance, if pairs are
independent. With keys (what the report uses), the arms' machinery: the primary's share of the
pairs, its variance cluster-robust with residuals about ½ (the share under H0), the normal mixture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import betaln, xlogy
from scipy.stats import binom

Z95 = 1.959964
SRM_CONCENTRATION = 100.0  # Dirichlet prior = 100 x the configured weights (Lindon & Malek's default)
PAIRED_PRIOR = 10.0  # Beta(10, 10) over the share of discordant pairs the primary wins: sd 0.11 around 1/2

ARMS_METHOD = (
    "difference of per-request accuracies; variance under no difference: cluster-robust over assignment keys "
    "with residuals about the pooled rate (delta method, CR1 with a leverage bound: Deng, Knoblich & Lu, KDD 2018; "
    "MacKinnon, Nielsen & Webb 2023), floored at the binomial variance of the pooled rate (add-one smoothed); "
    "verdict: running intersection of the normal-mixture confidence sequence, tau={tau} "
    "(Johari et al., Operations Research 2022; Waudby-Smith et al., Annals of Statistics 2024), "
    "looks once both arms have {min_samples} labels and {min_keys} keys; z and p_value: one look at a fixed "
    "sample size only"
)
SRM_METHOD = ("Dirichlet-multinomial mixture sequential test over new keys, prior 100 x weights "
              "(Lindon & Malek, NeurIPS 2022); always valid, exact")
PAIRED_METHOD = (f"beta-binomial mixture martingale over discordant pairs, Beta({PAIRED_PRIOR:g}, {PAIRED_PRIOR:g}) "
                 "(Robbins 1970); always valid, exact by Ville's inequality if pairs are independent; running "
                 "intersection")
PAIRED_KEYED_METHOD = (
    "share of discordant pairs won by the primary; variance under H0: cluster-robust over assignment keys with "
    "residuals about 1/2 (delta method, CR1 with a leverage bound), floored at 1/(4n); verdict: running "
    "intersection of the normal-mixture confidence sequence, tau={tau} (Johari et al. 2022; Waudby-Smith et al. "
    "2024), looks once there are {min_pairs} pairs "
    "from {min_keys} keys; always valid, asymptotic in keys")


# ---- one arm --------------------------------------------------------------------------------------------
def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval (Wilson 1927) for successes out of n independent trials. Non-integer
    ``successes`` and ``n`` are allowed: an effective sample size after a design effect."""
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class ArmAccuracy:
    labelled: int
    correct: int
    keys: int  # distinct assignment keys among the labelled requests (a keyless request counts as one)
    accuracy: float | None  # per-request: correct / labelled
    ci95: tuple[float, float] | None  # Wilson at the effective sample size labelled / design_effect
    design_effect: float | None  # cluster-robust variance / binomial variance; None when not estimable
    method: str = ("per-request accuracy; 95 % interval: Wilson at the effective sample size n / design effect, "
                   "design effect = cluster-robust (delta method, CR1 with a leverage bound) over binomial variance, at least 1 "
                   "(Korn & Graubard, Survey Methodology 1998); n_eff = keys when the accuracy is 0 or 1")


def arm_accuracy(correct: np.ndarray, key: np.ndarray) -> ArmAccuracy:
    """Accuracy of one arm's labelled requests (``correct``: bool per request; ``key``: int cluster
    code per request, one code per assignment key) with a 95 % interval that counts keys, not
    requests, as the independent units. With one key, or an accuracy of exactly 0 or 1, the design
    effect cannot be estimated: the interval then uses one observation per key (the most the data
    can be worth if each key answered the same throughout)."""
    correct, key = np.asarray(correct, bool), np.asarray(key)
    n = len(correct)
    if n == 0:
        return ArmAccuracy(0, 0, 0, None, None, None)
    _, cluster = np.unique(key, return_inverse=True)
    n_k = np.bincount(cluster)
    s_k = np.bincount(cluster, weights=correct)
    keys, right = len(n_k), int(correct.sum())
    p = right / n
    binomial = p * (1 - p) / n
    if keys < 2 or binomial == 0:
        return ArmAccuracy(n, right, keys, p, wilson(p * keys, keys), None)
    sums = {"N": n, "S": right, "K": keys, "NN": float(n_k @ n_k), "SN": float(s_k @ n_k), "SS": float(s_k @ s_k),
            "largest": int(n_k.max())}
    design_effect = float(_robust_variance(sums)) / binomial
    n_eff = n / max(1.0, design_effect)
    return ArmAccuracy(n, right, keys, p, wilson(p * n_eff, n_eff), design_effect)


# ---- A against B --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Comparison:
    difference: float  # per-request accuracy of A minus B, at the last look
    z: float  # difference / standard_error: for ONE look at a sample size fixed in advance only
    p_value: float  # two-sided, of z: for one look at a fixed sample size only
    standard_error: float  # sqrt of the floored cluster-robust variance of the difference under no difference
    confidence_sequence: tuple[float, float] | None  # running intersection at 1 - alpha; None when empty
    always_valid_p: float  # smallest 1/Λ(0) over the looks so far
    decision: str  # "A better" | "B better" | "no difference yet" | "inconsistent"
    looks: int  # labels at which both arms had min_samples labels and min_keys keys
    labelled: tuple[int, int]  # A, B
    keys: tuple[int, int]  # A, B
    alpha: float
    tau: float
    method: str


@dataclass(frozen=True)
class _Path:
    """The statistics at every look (one entry per label from the first look on)."""

    theta: np.ndarray
    variance: np.ndarray
    lower: np.ndarray  # running intersection of the confidence sequence
    upper: np.ndarray
    log_lambda: np.ndarray  # log Λ_t(0), the mixture likelihood ratio against θ = 0
    first: int  # index of the first look in the label sequence
    labelled: tuple[int, int]
    keys: tuple[int, int]


def _cluster_history(code: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each outcome (in arrival order): how many outcomes and right answers its cluster had
    before it. ``code`` is a (n, 2) key of the cluster; a stable sort groups each cluster in order."""
    order = np.lexsort(code.T[::-1])
    grouped = code[order]
    starts = np.ones(len(order), bool)
    starts[1:] = np.any(grouped[1:] != grouped[:-1], axis=1)
    position = np.arange(len(order))
    first = np.maximum.accumulate(np.where(starts, position, 0))
    right = correct[order].astype(np.int64)
    before = np.cumsum(right) - right
    n_prev, s_prev = np.empty_like(position), np.empty_like(position)
    n_prev[order] = position - first
    s_prev[order] = before - before[first]
    return n_prev, s_prev


def _arm_sums(mask: np.ndarray, x: np.ndarray, n_prev: np.ndarray, s_prev: np.ndarray) -> dict[str, np.ndarray]:
    """Running sums of one arm after every outcome: N, S, K, the three cluster sums and the
    largest key's requests."""
    m = mask.astype(np.int64)
    return {
        "N": np.cumsum(m), "S": np.cumsum(m * x), "K": np.cumsum(m * (n_prev == 0)),
        "NN": np.cumsum(m * (2 * n_prev + 1)),  # Σ n_k²: (n+1)² - n²
        "SN": np.cumsum(m * (s_prev + x * (n_prev + 1))),  # Σ s_k n_k: (s+x)(n+1) - s n
        "SS": np.cumsum(m * x * (2 * s_prev + 1)),  # Σ s_k²: (s+x)² - s², x ∈ {0, 1}
        "largest": np.maximum.accumulate(m * (n_prev + 1)),  # requests of the arm's largest key
    }


def _robust_variance(sums: dict, rate: np.ndarray | float | None = None) -> np.ndarray | float:
    """Cluster-robust variance of an arm's accuracy S/N from its sums (arrays: one value per
    outcome; or scalars), with the keys' residuals s_k - r n_k taken about ``rate`` r (default: the
    arm's own S/N; a score test takes them about the rate its hypothesis gives the arm): CR1
    divided by (1 - h)², h the largest key's share of the arm's requests.
    The jackknife (CR3) divides each key's residual by its own 1 - n_k/N; dividing all of them by
    the largest is an upper bound of it that running sums can carry. It matters when one heavy user
    dominates a small arm: that user's residual is small because the arm's mean is mostly that user
    (measured: without it a 95/5 A/A with heavy users and tau 0.2 gave 8 % false verdicts)."""
    n, k = np.asarray(sums["N"], float), np.asarray(sums["K"], float)
    p = sums["S"] / n if rate is None else rate
    residual = np.maximum(sums["SS"] - 2 * p * sums["SN"] + p * p * sums["NN"], 0.0)  # Σ (s_k - p n_k)²
    leverage = np.minimum(sums["largest"] / n, 0.99)
    with np.errstate(divide="ignore", invalid="ignore"):
        return k / (k - 1) * residual / (n * n) / (1 - leverage) ** 2


def _boundary(variance: np.ndarray, alpha: float, tau: float) -> np.ndarray:
    """Half-width of the normal-mixture confidence sequence at variance V of the estimate."""
    t2 = tau * tau
    return np.sqrt(variance * (variance + t2) / t2 * (2 * math.log(1 / alpha) + np.log1p(t2 / variance)))


def _log_lambda(theta: np.ndarray, variance: np.ndarray, tau: float) -> np.ndarray:
    """log Λ of the normal mixture N(0, tau²) against a difference of 0, for an estimate theta of variance V."""
    t2 = tau * tau
    return 0.5 * np.log(variance / (variance + t2)) + t2 * theta**2 / (2 * variance * (variance + t2))


def _path(in_a: np.ndarray, correct: np.ndarray, key: np.ndarray, alpha: float, min_samples: int,
          min_keys: int, tau: float) -> _Path | None:
    in_a, correct, key = np.asarray(in_a, bool), np.asarray(correct, bool), np.asarray(key)
    if not (len(in_a) == len(correct) == len(key)):
        raise ValueError(f"in_a, correct and key must have the same length, got {len(in_a)}, {len(correct)}, {len(key)}")
    if not 0 < alpha < 1 or tau <= 0:
        raise ValueError(f"alpha must be in (0, 1) and tau > 0, got alpha={alpha}, tau={tau}")
    if min_samples < 1 or min_keys < 2:
        raise ValueError(f"min_samples must be >= 1 and min_keys >= 2, got {min_samples}, {min_keys}")
    if len(in_a) == 0:
        return None
    # a key is a cluster within its arm (assignment is sticky, so a key has one arm)
    n_prev, s_prev = _cluster_history(np.column_stack([key.astype(np.int64), in_a]), correct)
    x = correct.astype(np.int64)
    a, b = _arm_sums(in_a, x, n_prev, s_prev), _arm_sums(~in_a, x, n_prev, s_prev)
    ready = (a["N"] >= min_samples) & (b["N"] >= min_samples) & (a["K"] >= min_keys) & (b["K"] >= min_keys)
    if not ready[-1]:
        return None
    first = int(np.argmax(ready))  # counts only grow: every label from the first look on is a look
    a, b = {k: v[first:] for k, v in a.items()}, {k: v[first:] for k, v in b.items()}
    pooled = (a["S"] + b["S"]) / (a["N"] + b["N"])
    smoothed = (a["S"] + b["S"] + 1) / (a["N"] + b["N"] + 2)
    floor = smoothed * (1 - smoothed)
    # residuals about the pooled rate, the rate of both arms under θ = 0 (a score-type variance)
    variance = (np.maximum(_robust_variance(a, pooled), floor / a["N"])
                + np.maximum(_robust_variance(b, pooled), floor / b["N"]))
    theta = a["S"] / a["N"] - b["S"] / b["N"]
    half = _boundary(variance, alpha, tau)
    return _Path(theta, variance, np.maximum.accumulate(theta - half), np.minimum.accumulate(theta + half),
                 _log_lambda(theta, variance, tau), first,
                 (int(a["N"][-1]), int(b["N"][-1])), (int(a["K"][-1]), int(b["K"][-1])))


def _decision(lower: float, upper: float, better_low: str, better_high: str, null: float) -> str:
    if lower > upper:
        return "inconsistent"
    if lower > null:
        return better_high
    if upper < null:
        return better_low
    return "no difference yet"


def compare_arms(in_a: np.ndarray, correct: np.ndarray, key: np.ndarray, alpha: float, min_samples: int,
                 min_keys: int, tau: float = 0.05) -> Comparison | None:
    """A against B from their labelled outcomes **in the order the labels arrived**: ``in_a`` (bool:
    the outcome is arm A's, else B's), ``correct`` (bool), ``key`` (int cluster code: one code per
    assignment key; give a request without a key a code of its own).

    A look is every label from the first at which both arms have ``min_samples`` labels and
    ``min_keys`` keys; ``None`` before that. The whole sequence is re-evaluated on every call, so
    the verdict does not depend on when anyone asked. ``tau`` is the mixture's scale in accuracy
    points, the size of difference the test is most sensitive to; it must be fixed before the data
    (the A/A matrix checks 0.01, 0.05 and 0.2, the range the definition allows). ``z``,
    ``standard_error`` and the interval use the variance under θ = 0 (residuals about the pooled
    rate; see the module's docstring).

    Guarantee (asymptotic in the number of keys; keys assigned i.i.d. by the hash; outcomes
    independent across keys, arbitrary within a key; measured, not proven, on the traffic shapes of
    ``simulate``, runs of up to 20,000 labels): under A/A the chance that the decision is ever
    anything but "no difference yet", at any look, is at most alpha.
    "inconsistent" means the intervals of two looks did not overlap, which under the assumptions
    happens with probability at most alpha: the traffic changed during the run."""
    path = _path(in_a, correct, key, alpha, min_samples, min_keys, tau)
    if path is None:
        return None
    lower, upper = float(path.lower[-1]), float(path.upper[-1])
    theta, se = float(path.theta[-1]), math.sqrt(float(path.variance[-1]))
    z = theta / se
    return Comparison(
        difference=theta, z=z, p_value=math.erfc(abs(z) / math.sqrt(2)), standard_error=se,
        confidence_sequence=(lower, upper) if lower <= upper else None,
        always_valid_p=float(min(1.0, math.exp(-float(path.log_lambda.max())))),
        decision=_decision(lower, upper, "B better", "A better", 0.0), looks=len(path.theta),
        labelled=path.labelled, keys=path.keys, alpha=alpha, tau=tau,
        method=ARMS_METHOD.format(tau=tau, min_samples=min_samples, min_keys=min_keys),
    )


# ---- the split ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleRatio:
    observed: list[int]  # new keys per arm
    expected_share: list[float]  # the configured weights, normalised
    p_value: float  # always valid: min(1, 1 / max Bayes factor over the keys so far)
    mismatch: bool  # p_value <= alpha: the split is not the configured one; give no verdict
    method: str = SRM_METHOD


def sample_ratio(arm_of_new_keys: np.ndarray, weights: Sequence[float], alpha: float) -> SampleRatio:
    """Always-valid sample-ratio-mismatch test: ``arm_of_new_keys`` is the arm index of each
    assignment key in the order the keys first appeared. Keys are the randomisation unit and the
    assignment hash makes them i.i.d. multinomial under the weights, so the test is exact, with no
    minimum sample size; it is read after every new key. A mismatch means keys are lost or
    re-keyed on one side (a bug, a crash, a bot), and any comparison of the arms is suspect."""
    arms = np.asarray(arm_of_new_keys, np.int64)
    w = np.asarray(weights, float)
    if w.ndim != 1 or len(w) < 2 or np.any(w <= 0):
        raise ValueError(f"weights must be two or more positive numbers, got {list(weights)}")
    if len(arms) and (arms.min() < 0 or arms.max() >= len(w)):
        raise ValueError(f"arm indices must be in 0..{len(w) - 1}, got {arms.min()}..{arms.max()}")
    share = w / w.sum()
    prior = SRM_CONCENTRATION * share
    one_hot = arms[:, None] == np.arange(len(w))
    before = np.cumsum(one_hot, axis=0)[np.arange(len(arms)), arms] - 1  # keys of the same arm before this one
    # BF_t = [Γ(A)/Γ(A+t)] Π Γ(a_j + x_j)/Γ(a_j) / Π share_j^x_j, one factor per new key
    step = np.log(prior[arms] + before) - np.log(prior.sum() + np.arange(len(arms))) - np.log(share[arms])
    best = max(0.0, float(np.cumsum(step).max())) if len(arms) else 0.0
    p = min(1.0, math.exp(-best))
    return SampleRatio(np.bincount(arms, minlength=len(w)).tolist(), share.tolist(), p, p <= alpha)


# ---- paired (shadow) ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairedVerdict:
    discordant: int
    primary_only: int  # discordant pairs the primary got right
    shadow_only: int
    share: float | None  # primary_only / discordant
    confidence_sequence: tuple[float, float] | None  # for the share, running intersection; None when empty
    always_valid_p: float
    decision: str  # "primary better" | "shadow better" | "no difference yet" | "inconsistent"
    alpha: float
    keys: int | None  # distinct keys among the pairs, when keys were given
    method: str


def _log_mixture(b: np.ndarray, c: np.ndarray, q: np.ndarray | float, evidence: np.ndarray) -> np.ndarray:
    """log of the beta-binomial mixture likelihood over the Bernoulli(q) likelihood of b wins and c
    losses; ``evidence`` is the mixture's part, log B(a + b, a + c) - log B(a, a)."""
    return evidence - xlogy(b, q) - xlogy(c, 1 - q)


def _mixture_interval(b: np.ndarray, c: np.ndarray, evidence: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Per look, the q with log mixture ratio below ``level``: an interval around b/n (the log ratio
    is convex in q and at most 0 at b/n), its ends found by bisection, all looks at once."""
    centre = b / (b + c)
    ends = []
    for outer in (np.zeros_like(centre), np.ones_like(centre)):
        inside, outside = centre.copy(), outer
        for _ in range(50):  # 2^-50: below float resolution of q
            mid = (inside + outside) / 2
            out = _log_mixture(b, c, mid, evidence) >= level
            outside, inside = np.where(out, mid, outside), np.where(out, inside, mid)
        ends.append(outside)
    return ends[0], ends[1]


def paired_sequential(primary_right: np.ndarray, alpha: float, key: np.ndarray | None = None, *,
                      min_pairs: int = 30, min_keys: int = 10, tau: float = 0.1) -> PairedVerdict:
    """Always-valid comparison of primary and shadow on the same requests from their discordant
    pairs **in the order their labels arrived** (True: the primary right and the shadow wrong;
    False: the reverse).

    Without ``key``: H0 is that each discordant pair falls either way with probability 1/2,
    independently. The beta-binomial mixture likelihood ratio is a nonnegative martingale under H0,
    so p = min(1, 1/max ratio) is exact at every look, with no minimum sample size. This holds when
    the two models are equally good on every user's requests; if one is better for some users and
    worse for others, one user's pairs are not independent (measured with heavy users, each key's
    pairs falling 0.7/0.3: 10 % false verdicts at alpha 0.05).

    With ``key`` (int cluster code of each pair, as for ``compare_arms``): H0 is that the primary
    wins half of the discordant pairs of the traffic, pairs independent across keys and arbitrary
    within a key. The share's variance is cluster-robust with the keys' residuals b_k - n_k/2 taken
    about ½, the share under H0 (about the observed share, heavy users whose labels arrive together
    and 20,000 labels gave 7.5 % false verdicts), floored at 1/(4n) (its value under H0), and
    the confidence sequence is the same normal mixture as the arms' with scale ``tau``;
    looks start at ``min_pairs`` pairs from ``min_keys`` keys. Asymptotic in the number of keys."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    right = np.asarray(primary_right, bool)
    n = len(right)
    b_total = int(right.sum())
    share = b_total / n if n else None
    if key is not None:
        return _paired_keyed(right, np.asarray(key), alpha, min_pairs, min_keys, tau)
    if n == 0:
        return PairedVerdict(0, 0, 0, None, None, 1.0, "no difference yet", alpha, None, PAIRED_METHOD)
    b = np.cumsum(right).astype(float)
    c = np.arange(1, n + 1) - b
    evidence = betaln(PAIRED_PRIOR + b, PAIRED_PRIOR + c) - betaln(PAIRED_PRIOR, PAIRED_PRIOR)
    p = float(min(1.0, math.exp(-max(0.0, float(_log_mixture(b, c, 0.5, evidence).max())))))
    lower, upper = _mixture_interval(b, c, evidence, math.log(1 / alpha))
    lo, hi = float(lower.max()), float(upper.min())
    return PairedVerdict(n, b_total, n - b_total, share, (lo, hi) if lo <= hi else None, p,
                         _decision(lo, hi, "shadow better", "primary better", 0.5), alpha, None, PAIRED_METHOD)


def _paired_keyed(right: np.ndarray, key: np.ndarray, alpha: float, min_pairs: int, min_keys: int,
                  tau: float) -> PairedVerdict:
    if len(key) != len(right):
        raise ValueError(f"primary_right and key must have the same length, got {len(right)}, {len(key)}")
    if min_pairs < 1 or min_keys < 2 or tau <= 0:
        raise ValueError(f"min_pairs must be >= 1, min_keys >= 2 and tau > 0, got {min_pairs}, {min_keys}, {tau}")
    n, b_total = len(right), int(right.sum())
    method = PAIRED_KEYED_METHOD.format(tau=tau, min_pairs=min_pairs, min_keys=min_keys)
    keys = len(np.unique(key))
    if n < min_pairs or keys < min_keys:
        return PairedVerdict(n, b_total, n - b_total, b_total / n if n else None, None, 1.0, "no difference yet",
                             alpha, keys, method)
    n_prev, s_prev = _cluster_history(np.column_stack([key.astype(np.int64), np.zeros(n, np.int64)]), right)
    sums = _arm_sums(np.ones(n, bool), right.astype(np.int64), n_prev, s_prev)
    first = int(np.argmax((sums["N"] >= min_pairs) & (sums["K"] >= min_keys)))
    sums = {k: v[first:] for k, v in sums.items()}
    share = sums["S"] / sums["N"]
    variance = np.maximum(_robust_variance(sums, 0.5), 0.25 / sums["N"])  # residuals b_k - n_k/2: under H0
    half = _boundary(variance, alpha, tau)
    lo, hi = float(np.max(share - half)), float(np.min(share + half))
    p = float(min(1.0, math.exp(-float(_log_lambda(share - 0.5, variance, tau).max()))))
    return PairedVerdict(n, b_total, n - b_total, b_total / n, (lo, hi) if lo <= hi else None, p,
                         _decision(lo, hi, "shadow better", "primary better", 0.5), alpha, keys, method)


def mcnemar_exact(b: int, c: int) -> float:
    """Fixed-n two-sided exact McNemar p (one look at a sample size fixed in advance only): b and c
    are the discordant pairs (A right and B wrong, and the reverse); under H0 each falls either way
    with probability 1/2, so p = min(1, 2 P(Binomial(b + c, 1/2) <= min(b, c))), in constant time."""
    n = b + c
    if n == 0:
        return 1.0
    return float(min(1.0, 2 * binom.cdf(min(b, c), n, 0.5)))
