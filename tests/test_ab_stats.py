"""Assignment and the statistics of the A/B report, against hand computations and simulation.

The A/A matrices run through the functions the report calls (``compare_arms``, ``paired_sequential``,
``sample_ratio``; ``test_the_report_gives_what_the_statistics_give`` shows the report adds nothing of
its own) with the traffic of ``service.experiments.simulate``. The script runs every cell; the test
runs a subset, 1,000 runs each, chosen to cover every split, user shape, arrival and the extreme
settings at least once, plus the two long-run cells where the Wald variance failed (each user's
labels arriving together), within a minute.
"""

from __future__ import annotations

import math
import time
from functools import cache

import numpy as np
import pytest
from scipy.special import gammaln
from scipy.stats import binomtest

from service.experiments import simulate
from service.experiments.definition import Arm, Experiment
from service.experiments.report import build_report
from service.experiments.state import Run, RunRows
from service.experiments.stats import (
    arm_accuracy,
    compare_arms,
    mcnemar_exact,
    paired_sequential,
    sample_ratio,
    wilson,
)

ALPHA = 0.05


def experiment(**overrides) -> Experiment:
    fields = {"name": "ens-vs-student", "arms": [Arm(name="ensemble", variant="e", weight=7), Arm(name="student", variant="s", weight=3)]}
    return Experiment(**{**fields, **overrides})


def interleave(a: list[bool], b: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """(in_a, correct) with A's and B's outcomes alternating, A first."""
    assert len(a) == len(b)
    return np.array([True, False] * len(a)), np.array([x for pair in zip(a, b) for x in pair])


def mixture_half_width(v: float, tau: float = 0.05, alpha: float = ALPHA) -> float:
    return math.sqrt(v * (v + tau**2) / tau**2 * (2 * math.log(1 / alpha) + math.log((v + tau**2) / v)))


# ---- assignment -------------------------------------------------------------------------------------
def test_assignment_follows_the_weights_within_statistical_bounds():
    e = experiment()
    n = 20_000
    share = sum(e.assign(f"user-{i}").name == "ensemble" for i in range(n)) / n
    sd = math.sqrt(0.7 * 0.3 / n)
    assert abs(share - 0.7) < 4 * sd, share


def test_assignment_is_sticky_and_depends_on_the_experiment():
    a, again = experiment(), experiment()
    keys = [f"k{i}" for i in range(500)]
    assert [a.assign(k).name for k in keys] == [again.assign(k).name for k in keys]
    other = experiment(name="another")
    assert [a.assign(k).name for k in keys] != [other.assign(k).name for k in keys]  # not the same split everywhere


def test_arm_names_must_be_distinct():
    with pytest.raises(ValueError, match="distinct"):
        experiment(arms=[Arm(name="x", variant="e"), Arm(name="x", variant="s")])


# ---- one arm -----------------------------------------------------------------------------------------
def test_wilson_interval_by_hand():
    # 90/100: centre (0.9 + 1.96²/200) / (1 + 1.96²/100); half-width 1.96 sqrt(0.09/100 + 1.96²/40000) / (1 + 1.96²/100)
    z = 1.959964
    centre = (0.9 + z * z / 200) / (1 + z * z / 100)
    half = z * math.sqrt(0.9 * 0.1 / 100 + z * z / 40000) / (1 + z * z / 100)
    assert wilson(90, 100) == pytest.approx((centre - half, centre + half))
    assert wilson(90, 100) == pytest.approx((0.8256, 0.9448), abs=1e-4)
    assert wilson(0, 0) is None and wilson(10, 10)[1] == pytest.approx(1.0)


def test_arm_accuracy_design_effect_by_hand_for_one_request_per_key():
    # 90 of 100 right, each request its own key: Σ(s_k - p n_k)² = 90 * 0.1² + 10 * 0.9² = 9;
    # CR1 = 100/99 * 9 / 100² ; leverage bound 1 / (1 - 1/100)² ; binomial variance 0.9 * 0.1 / 100
    arm = arm_accuracy(np.arange(100) < 90, np.arange(100))
    robust = 100 / 99 * 9 / 100**2 / 0.99**2
    assert arm.design_effect == pytest.approx(robust / (0.09 / 100))
    assert arm.ci95 == pytest.approx(wilson(0.9 * 100 / arm.design_effect, 100 / arm.design_effect))
    assert (arm.labelled, arm.correct, arm.keys, arm.accuracy) == (100, 90, 100, 0.9)


def test_arm_accuracy_counts_keys_not_requests():
    # 10 users x 150 requests, 6 all right and 4 all wrong: the data are worth about 10 observations, not 1,500
    key = np.repeat(np.arange(10), 150)
    arm = arm_accuracy(key < 6, key)
    assert arm.accuracy == pytest.approx(0.6)
    assert arm.design_effect > 100
    low, high = arm.ci95
    assert low < 0.35 and high > 0.8  # Wilson over 1,500 independent requests would be 0.575-0.625


def test_an_all_right_arm_gets_one_observation_per_key():
    key = np.repeat(np.arange(10), 150)
    arm = arm_accuracy(np.ones(1500, bool), key)
    assert arm.design_effect is None and arm.ci95 == pytest.approx(wilson(10, 10))


# ---- A against B: hand computations -------------------------------------------------------------------
def test_compare_arms_at_a_single_look_by_hand():
    # 100 per arm, alternating, each request its own key; min_samples 100: one look, at the last label.
    # A 90/100 right, B 70/100. Residuals about the pooled rate 160/200 = 0.8 (the rate of both arms
    # under θ = 0): A Σr² = 90 * 0.2² + 10 * 0.8² = 10, B Σr² = 70 * 0.2² + 30 * 0.8² = 22, each
    # * 100/99 / 100² / 0.99². Floor: smoothed (160 + 1) / (200 + 2), p̄(1 - p̄)/100 — above A's estimate.
    in_a, correct = interleave([True] * 90 + [False] * 10, [True] * 70 + [False] * 30)
    c = compare_arms(in_a, correct, np.arange(200), ALPHA, min_samples=100, min_keys=10)
    pooled = 161 / 202
    v_a = max(100 / 99 * 10 / 100**2 / 0.99**2, pooled * (1 - pooled) / 100)
    v_b = max(100 / 99 * 22 / 100**2 / 0.99**2, pooled * (1 - pooled) / 100)
    assert v_a == pytest.approx(pooled * (1 - pooled) / 100)  # the floor is in force for A
    v = v_a + v_b
    assert c.looks == 1 and c.difference == pytest.approx(0.2)
    assert c.standard_error == pytest.approx(math.sqrt(v)) and c.z == pytest.approx(0.2 / math.sqrt(v))
    assert c.p_value == pytest.approx(math.erfc(0.2 / math.sqrt(2 * v)))
    half = mixture_half_width(v)
    assert c.confidence_sequence == pytest.approx((0.2 - half, 0.2 + half))
    log_lambda = 0.5 * math.log(v / (v + 0.0025)) + 0.0025 * 0.04 / (2 * v * (v + 0.0025))
    assert c.always_valid_p == pytest.approx(math.exp(-log_lambda))
    # one fixed-n look says p = 0.001; the always-valid verdict (p = 0.16) wants more data before calling it
    assert c.p_value < 0.002 and c.always_valid_p > 0.15 and c.decision == "no difference yet"


def test_compare_arms_sums_requests_per_key_by_hand():
    # A: key 1 (3 requests, 2 right), key 2 (1, 0), key 3 (2, 2); B: key 4 (2, 1), key 5 (2, 0), key 6 (1, 1)
    in_a = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0], bool)
    correct = np.array([1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 1], bool)
    key = np.array([1, 1, 1, 2, 3, 3, 4, 4, 5, 5, 6])
    c = compare_arms(in_a, correct, key, ALPHA, min_samples=5, min_keys=3)
    p_a, p_b, p = 4 / 6, 2 / 5, 6 / 11  # residuals about the pooled rate p
    r_a = (2 - 3 * p) ** 2 + (0 - p) ** 2 + (2 - 2 * p) ** 2
    r_b = (1 - 2 * p) ** 2 + (0 - 2 * p) ** 2 + (1 - p) ** 2
    robust_a = 3 / 2 * r_a / 36 / (1 - 3 / 6) ** 2  # largest key: 3 of A's 6 requests
    robust_b = 3 / 2 * r_b / 25 / (1 - 2 / 5) ** 2
    pooled = 7 / 13
    v = max(robust_a, pooled * (1 - pooled) / 6) + max(robust_b, pooled * (1 - pooled) / 5)
    assert c.difference == pytest.approx(p_a - p_b) and c.standard_error == pytest.approx(math.sqrt(v))
    assert c.keys == (3, 3) and c.labelled == (6, 5)


# ---- A against B: behaviour ---------------------------------------------------------------------------
def test_no_look_before_both_arms_have_min_samples_labels_and_min_keys_keys():
    in_a, correct = interleave([True] * 50, [False] * 50)
    assert compare_arms(in_a, correct, np.arange(100), ALPHA, min_samples=51, min_keys=2) is None
    five_users = np.arange(100) % 10  # 5 keys per arm
    assert compare_arms(in_a, correct, five_users, ALPHA, min_samples=10, min_keys=6) is None
    assert compare_arms(in_a, correct, five_users, ALPHA, min_samples=10, min_keys=5) is not None


def test_standard_error_counts_keys_not_requests():
    rng = np.random.default_rng(1)
    in_a = rng.random(3000) < 0.5
    user = rng.integers(0, 60, 3000) * 2 + in_a  # 60 users per arm, each with one arm
    correct = rng.random(60 * 2)[user] < 0.8  # a user's requests all right or all wrong
    per_request = compare_arms(in_a, correct, np.arange(3000), ALPHA, 30, 10)
    per_user = compare_arms(in_a, correct, user, ALPHA, 30, 10)
    assert per_user.standard_error > 5 * per_request.standard_error


def test_ten_sticky_users_per_arm_all_right_or_all_wrong_get_no_verdict():
    # issue 16, case 1: the old analysis said "A better", always-valid p = 2.5e-202
    rng = np.random.default_rng(16)
    user = np.repeat(np.arange(20), 150)
    in_a, correct = user < 10, (user < 6) | ((user >= 10) & (user < 14))  # 6/10 against 4/10
    order = rng.permutation(3000)
    c = compare_arms(in_a[order], correct[order], user[order], ALPHA, min_samples=30, min_keys=10)
    assert c.difference == pytest.approx(0.2)
    assert c.decision == "no difference yet" and c.always_valid_p > 0.5 and c.p_value > 0.05
    low, high = c.confidence_sequence
    assert low < -0.2 and high > 0.6


def test_a_real_difference_is_found_in_the_right_direction():
    rng = np.random.default_rng(3)
    in_a = rng.random(4000) < 0.5
    correct = np.where(in_a, rng.random(4000) < 0.92, rng.random(4000) < 0.85)
    key = np.arange(4000)
    assert compare_arms(in_a, correct, key, ALPHA, 30, 10).decision == "A better"
    assert compare_arms(~in_a, correct, key, ALPHA, 30, 10).decision == "B better"


def test_the_confidence_sequence_only_narrows_as_labels_arrive():
    in_a, correct, key = simulate.ab_run(np.random.default_rng(5), 1500, 0.5, simulate.SHAPES[1], 0.9, 0.8)
    previous, previous_p = (-math.inf, math.inf), 1.0
    for t in range(200, 1501, 50):
        c = compare_arms(in_a[:t], correct[:t], key[:t], ALPHA, 30, 10)
        assert previous[0] <= c.confidence_sequence[0] and c.confidence_sequence[1] <= previous[1]
        assert c.always_valid_p <= previous_p
        previous, previous_p = c.confidence_sequence, c.always_valid_p


def test_a_verdict_stands_when_a_later_look_alone_would_contain_zero():
    # 200 labels per arm: A all right, B 3 in 4; then 100 more: A 7 in 10, B 19 in 20. The last look's own
    # interval straddles 0; the running intersection keeps what the earlier looks established.
    a = [True] * 200 + [i % 10 < 7 for i in range(100)]
    b = [i % 4 != 0 for i in range(200)] + [i % 20 != 0 for i in range(100)]
    in_a, correct = interleave(a, b)
    c = compare_arms(in_a, correct, np.arange(600), ALPHA, 30, 10)
    last_alone = c.difference - mixture_half_width(c.standard_error**2)
    assert last_alone < 0 < c.confidence_sequence[0] and c.decision == "A better"


def test_looks_that_contradict_each_other_are_reported_as_inconsistent():
    # A far better for 600 labels, then far worse for 6,000: no θ is in every look's interval
    in_a, correct = interleave([True] * 300 + [False] * 3000, [False] * 300 + [True] * 3000)
    c = compare_arms(in_a, correct, np.arange(len(in_a)), ALPHA, 30, 10)
    assert c.decision == "inconsistent" and c.confidence_sequence is None and c.always_valid_p < ALPHA


def test_compare_arms_rejects_inputs_of_different_lengths_and_min_keys_below_two():
    with pytest.raises(ValueError, match="same length"):
        compare_arms(np.ones(3, bool), np.ones(3, bool), np.arange(2), ALPHA, 1, 2)
    with pytest.raises(ValueError, match="min_keys"):
        compare_arms(np.ones(3, bool), np.ones(3, bool), np.arange(3), ALPHA, 1, 1)


def test_a_report_over_100k_outcomes_of_20k_keys_takes_well_under_a_third_of_a_second():
    rng = np.random.default_rng(0)
    key = rng.integers(0, 20_000, 100_000)
    in_a, correct = key % 2 == 0, rng.random(100_000) < 0.9
    compare_arms(in_a, correct, key, ALPHA, 30, 10)  # warm
    started = time.perf_counter()
    c = compare_arms(in_a, correct, key, ALPHA, 30, 10)
    assert time.perf_counter() - started < 0.3 and c.looks > 99_000


# ---- A/A: the uneven split, and the matrix ---------------------------------------------------------
@cache
def ninety_ten_split() -> list:
    """Issue 16, case 2 (the old verdict: 8.5 % false positives): A/A, 90/10, min_samples 30, a look
    after every one of 2,000 labels, 1,000 runs."""
    rng = np.random.default_rng(90)
    return [compare_arms(*simulate.ab_run(rng, 2000, 0.9, simulate.SHAPES[0], 0.9), ALPHA, 30, 10) for _ in range(1000)]


def test_a_90_10_split_read_after_every_label_keeps_the_false_positive_rate():
    false = sum(c.decision != "no difference yet" for c in ninety_ten_split())
    assert false / 1000 <= ALPHA + 2 * math.sqrt(ALPHA * (1 - ALPHA) / 1000), false


def test_every_verdict_comes_with_an_interval_on_its_side_of_zero():
    verdicts = [c for c in ninety_ten_split() if c.decision in ("A better", "B better")]
    assert all((c.confidence_sequence[0] > 0) == (c.decision == "A better") for c in verdicts)
    assert all(c.confidence_sequence[0] > 0 or c.confidence_sequence[1] < 0 for c in verdicts)


ONE, HEAVY = simulate.SHAPES
UNIFORM, BATCHED, STAGGERED = simulate.ARRIVALS
# (split, users, arrival, accuracy, labels, tau): a subset of the script's matrix
ARM_CELLS = [
    ("50/50", ONE, UNIFORM, 0.6, 2000, simulate.TAU),
    ("95/5", ONE, UNIFORM, 0.9, 2000, simulate.TAU),
    ("50/50", HEAVY, BATCHED, 0.9, 2000, simulate.TAU),
    ("80/20", HEAVY, BATCHED, 0.6, 2000, simulate.TAU),
    ("80/20", HEAVY, STAGGERED, 0.98, 2000, simulate.TAU),
    ("95/5", HEAVY, UNIFORM, 0.6, 2000, simulate.TAU),
    ("95/5", HEAVY, STAGGERED, 0.9, 2000, simulate.TAU),
    ("95/5", HEAVY, BATCHED, 0.9, 2000, simulate.TAUS[1]),  # the largest tau the definition allows
    ("80/20", HEAVY, UNIFORM, 0.9, 2000, simulate.TAUS[0]),  # the smallest
    ("95/5", HEAVY, BATCHED, 0.6, 2000, simulate.TAU),
    ("95/5", HEAVY, BATCHED, 0.98, 2000, simulate.TAU),
    ("50/50", HEAVY, STAGGERED, 0.6, 2000, simulate.TAU),
    ("95/5", HEAVY, BATCHED, 0.9, 20_000, simulate.TAU),  # the Wald variance gave 0.08 here
    ("80/20", HEAVY, BATCHED, 0.9, 20_000, simulate.TAU),
]


@pytest.mark.parametrize(("split", "shape", "arrival", "base", "labels", "tau"), ARM_CELLS,
                         ids=["-".join(map(str, cell)) for cell in ARM_CELLS])
def test_aa_arms_false_verdicts_stay_within_alpha_plus_two_standard_errors(split, shape, arrival, base, labels, tau):
    cell = simulate.aa_arms(split, shape, base, runs=1000, labels=labels, min_samples=simulate.LEAST_SAMPLES,
                            min_keys=simulate.LEAST_KEYS, tau=tau, arrival=arrival)
    assert cell.ok, (cell.name, cell.rate, cell.bound)
    assert cell.looked > 800  # a cell without looks would pass for nothing


def test_the_matrix_reads_the_definitions_defaults_and_extremes():
    defaults = Experiment(name="x", arms=[Arm(name="a", variant="v")])
    assert (simulate.MIN_SAMPLES, simulate.MIN_KEYS, simulate.TAU) == (defaults.min_samples, defaults.min_keys, defaults.tau)
    assert (simulate.LEAST_SAMPLES, simulate.LEAST_KEYS) == (defaults.min_samples, defaults.min_keys)
    for field, value in (("min_samples", simulate.LEAST_SAMPLES - 1), ("min_keys", simulate.LEAST_KEYS - 1),
                         ("tau", simulate.TAUS[0] / 2), ("tau", simulate.TAUS[1] * 2)):
        with pytest.raises(ValueError, match=field):
            experiment(**{field: value})


# (test, users, arrival, accuracy, labels): exact: models equally accurate on every key; keyed: each
# key's pairs fall 0.7/0.3 one way
PAIRED_CELLS = [
    ("exact", ONE, UNIFORM, 0.98, 2000),
    ("exact", HEAVY, UNIFORM, 0.9, 2000),
    ("keyed", ONE, UNIFORM, 0.6, 2000),
    ("keyed", HEAVY, UNIFORM, 0.9, 2000),
    ("keyed", HEAVY, BATCHED, 0.6, 2000),
    ("keyed", HEAVY, STAGGERED, 0.9, 2000),
    ("keyed", HEAVY, BATCHED, 0.6, 20_000),  # the Wald variance gave 0.075 here
]


@pytest.mark.parametrize(("test", "shape", "arrival", "base", "labels"), PAIRED_CELLS,
                         ids=["-".join(map(str, cell)) for cell in PAIRED_CELLS])
def test_aa_paired_false_verdicts_stay_within_alpha_plus_two_standard_errors(test, shape, arrival, base, labels):
    keyed = test == "keyed"
    cell = simulate.aa_paired(shape, base, runs=1000, labels=labels, interaction=0.2 if keyed else 0.0, keyed=keyed,
                              arrival=arrival)
    assert cell.ok, (cell.name, cell.rate, cell.bound)


SRM_CELLS = [(split, keys) for split in simulate.SPLITS for keys in (300, 2_000, 20_000)]


@pytest.mark.parametrize(("split", "keys"), SRM_CELLS, ids=[f"{a}-{b}" for a, b in SRM_CELLS])
def test_aa_sample_ratio_false_mismatches_stay_within_alpha_plus_two_standard_errors(split, keys):
    cell = simulate.aa_sample_ratio(split, keys, runs=1000)
    assert cell.ok, (cell.name, cell.rate, cell.bound)


def test_a_two_point_difference_is_found_in_most_experiments_of_20k_one_request_users():
    right, wrong = simulate.power(simulate.SHAPES[0], 20_000, runs=200)
    assert right >= 0.8 and wrong == 0


# ---- sample ratio -----------------------------------------------------------------------------------------
def test_sample_ratio_bayes_factor_by_hand():
    # 3 new keys all in arm 0 of 50/50; prior Dirichlet(50, 50): BF_t = Γ(100)/Γ(100+t) Γ(50+t)/Γ(50) / 0.5^t
    bf = [math.exp(gammaln(100) - gammaln(100 + t) + gammaln(50 + t) - gammaln(50)) / 0.5**t for t in (1, 2, 3)]
    srm = sample_ratio(np.zeros(3, int), [1, 1], ALPHA)
    assert srm.p_value == pytest.approx(1 / max(bf)) and bf[2] == pytest.approx(2 * 2 * 2 * 50 * 51 * 52 / (100 * 101 * 102))
    assert (srm.observed, srm.expected_share, srm.mismatch) == ([3, 0], [0.5, 0.5], False)


def test_sample_ratio_flags_an_arm_that_loses_a_tenth_of_its_keys():
    rng = np.random.default_rng(4)
    arms = (rng.random(20_000) < 0.45 / 0.95).astype(int)
    assert sample_ratio(arms, [1, 1], ALPHA).mismatch
    assert not sample_ratio((rng.random(20_000) < 0.5).astype(int), [1, 1], ALPHA).mismatch


def test_sample_ratio_rejects_weights_that_are_not_positive_and_unknown_arms():
    with pytest.raises(ValueError, match="positive"):
        sample_ratio(np.zeros(3, int), [1, 0], ALPHA)
    with pytest.raises(ValueError, match="arm indices"):
        sample_ratio(np.array([0, 2]), [1, 1], ALPHA)


# ---- paired -------------------------------------------------------------------------------------------------
def test_paired_sequential_mixture_by_hand():
    # 5 discordant pairs all won by the primary; Beta(10, 10) mixture: M_t = B(10 + t, 10) / B(10, 10) / 0.5^t
    def log_beta(x, y):
        return math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)

    m = [math.exp(log_beta(10 + t, 10) - log_beta(10, 10)) / 0.5**t for t in range(1, 6)]
    v = paired_sequential(np.ones(5, bool), ALPHA)
    assert v.always_valid_p == pytest.approx(min(1.0, 1 / max(m)))
    assert (v.discordant, v.primary_only, v.shadow_only, v.share, v.decision) == (5, 5, 0, 1.0, "no difference yet")


def test_paired_sequential_finds_the_better_model():
    rng = np.random.default_rng(2)
    wins = rng.random(2000) < 0.6
    assert paired_sequential(wins, ALPHA).decision == "primary better"
    assert paired_sequential(~wins, ALPHA).decision == "shadow better"
    low, high = paired_sequential(wins, ALPHA).confidence_sequence
    assert 0.5 < low < 0.6 < high


def test_keyed_paired_test_counts_users_not_pairs():
    # one user whose 500 discordant pairs all went to the primary, among 20 users split evenly
    key = np.concatenate([np.zeros(500, int), np.arange(1, 21)])
    right = np.concatenate([np.ones(500, bool), np.arange(20) % 2 == 0])
    assert paired_sequential(right, ALPHA).decision == "primary better"  # the exact test assumes independent pairs
    assert paired_sequential(right, ALPHA, key).decision == "no difference yet"


def test_the_exact_paired_test_needs_keys_when_models_differ_by_user():
    """Measured limitation (docs): heavy users, each key's pairs 0.7/0.3 one way or the other."""
    exact = simulate.aa_paired(simulate.SHAPES[1], 0.9, runs=1000, interaction=0.2)
    assert not exact.ok, exact.rate


def test_mcnemar_exact_by_hand():
    # 10 vs 2 discordant: 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096
    assert mcnemar_exact(10, 2) == pytest.approx(2 * 79 / 4096)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_mcnemar_exact_of_16k_discordant_pairs_is_scipys_binomial_test():
    assert mcnemar_exact(8_150, 7_850) == pytest.approx(binomtest(8_150, 16_000, 0.5).pvalue, rel=1e-9)
    assert mcnemar_exact(8_150, 7_850) == pytest.approx(0.0176, abs=1e-3)


# ---- the report --------------------------------------------------------------------------------------
def test_report_counts_arms_and_pairs_from_recorded_rows():
    e = experiment(shadow="s")
    no = 1e300  # "never" in the numeric columns
    # arm index, version, key, latency ms, top-1, shadow version, shadow top-1, shadow KL, shadow time,
    # label, label seq, label time (see state.RunRows)
    rows = [
        (0, 1, 11, 10.0, 1, 1, 1, 0.01, 1.0, 1, 1, 5.0),   # both right
        (0, 1, 12, 20.0, 1, 1, 2, 0.50, 1.0, 1, 2, 5.0),   # primary only right
        (0, 1, 13, 30.0, 3, 1, 2, 0.40, 1.0, 2, 3, 5.0),   # shadow only right
        (1, 1, 14, 5.0, 0, -1, -1, -1, no, 1, 4, 5.0),     # wrong, not shadowed (its arm serves the shadow's variant)
        (1, 1, 15, 6.0, 2, -1, -1, -1, no, -1, -1, no),    # no feedback yet
    ]
    r = build_report(Run("run", e, 0.0), RunRows(rows))
    ens, stu = r.arms
    assert (ens.requests, ens.labelled, ens.correct, ens.p50_ms, ens.keys) == (3, 3, 2, 20.0, 3)
    assert (stu.requests, stu.labelled, stu.correct, stu.accuracy) == (2, 1, 0, 0.0)
    assert r.comparison.difference == pytest.approx(2 / 3) and r.comparison.verdict.startswith("no difference yet")
    (p,) = r.paired  # only the ensemble arm is shadowed: the student arm is the shadow's own variant
    assert (p.arm, p.pairs, p.labelled_pairs, p.primary_only_correct, p.shadow_only_correct) == ("ensemble", 3, 3, 1, 1)
    assert p.agreement == pytest.approx(1 / 3) and p.mean_kl == pytest.approx(0.91 / 3) and p.mcnemar_p == 1.0
    assert r.sample_ratio.keys == [3, 2]


def test_a_pair_whose_shadow_answered_after_its_label_stays_out_of_the_sequence():
    e = experiment(shadow="s")
    rows = [(0, 1, 11, 10.0, 1, 1, 2, 0.5, 9.0, 1, 1, 5.0)]  # shadow at t=9, label at t=5
    (p,) = build_report(Run("run", e, 0.0), RunRows(rows)).paired
    assert (p.pairs, p.labelled_pairs) == (1, 0)


def test_a_rollback_restarts_the_comparison_window():
    """v1, then v2, then v1 again on arm A: only what came after the rollback is compared."""
    e = experiment()
    no = 1e300
    versions = [1, 1, 2, 2, 1, 1]
    rows = [(i % 2, versions[i] if i % 2 == 0 else 1, 100 + i, 1.0, 0, -1, -1, -1, no, 0, i + 1, 5.0) for i in range(6)]
    # arm A (index 0) answered rows 0, 2, 4: versions 1, 2, 1; arm B rows 1, 3, 5
    r = build_report(Run("run", e, 0.0), RunRows(rows))
    ens, stu = r.arms
    assert (ens.version, ens.requests) == (1, 1) and stu.requests == 1  # from A's first v1 answer after its v2 ones: rows 4, 5
    assert [v.version for v in ens.earlier_versions] == [2]


def test_the_report_gives_what_the_statistics_give():
    """The A/A matrix calls the statistics directly; on recorded rows (answers in the order answered,
    labels in their own order, by sequence number) the report gives the same verdict, always-valid p,
    interval, z and SRM p as ``compare_arms`` and ``sample_ratio`` on the same outcomes."""
    rng = np.random.default_rng(6)
    in_a, correct, key = simulate.ab_run(rng, 20_000, 0.5, HEAVY, 0.92, 0.84, arrival=BATCHED)  # in label order
    answered = rng.permutation(len(key))  # row r of the run is the answer to the outcome answered[r]
    no = 1e300
    rows = [(0 if in_a[i] else 1, 1, 1_000 + int(key[i]), 5.0, int(correct[i]), -1, -1, -1, no, 1, int(i) + 1, 5.0)
            for i in answered]
    e = experiment(arms=[Arm(name="ensemble", variant="e"), Arm(name="student", variant="s")])
    r = build_report(Run("run", e, 0.0), RunRows(rows))

    c = compare_arms(in_a, correct, key, e.alpha, e.min_samples, e.min_keys, e.tau)
    _, first = np.unique(key[answered], return_index=True)
    srm = sample_ratio((~in_a[answered][np.sort(first)]).astype(int), [1, 1], e.alpha)
    assert c.decision == "A better" and r.comparison.verdict == c.decision
    assert r.comparison.always_valid_p == pytest.approx(c.always_valid_p, rel=1e-9)
    assert r.comparison.confidence_sequence == pytest.approx(c.confidence_sequence, rel=1e-9)
    assert r.comparison.z == pytest.approx(c.z, rel=1e-9)
    assert r.sample_ratio.p_value == pytest.approx(srm.p_value, rel=1e-9)
    assert r.sample_ratio.keys == srm.observed and r.sample_ratio.mismatch == srm.mismatch
