"""Assignment and the statistics of the A/B report, against hand computations and simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.experiments.definition import Arm, Experiment
from service.experiments.report import build_report
from service.experiments.state import Outcome
from service.experiments.stats import always_valid, mcnemar_exact, two_proportion_z, wilson


def experiment(**overrides) -> Experiment:
    fields = {"name": "ens-vs-student", "arms": [Arm(name="ensemble", variant="e", weight=7), Arm(name="student", variant="s", weight=3)]}
    return Experiment(**{**fields, **overrides})


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


# ---- statistics against hand computations --------------------------------------------------------------
def test_wilson_interval_by_hand():
    # 90/100: centre (0.9 + 1.96²/200) / (1 + 1.96²/100); half-width 1.96 sqrt(0.09/100 + 1.96²/40000) / (1 + 1.96²/100)
    z = 1.959964
    centre = (0.9 + z * z / 200) / (1 + z * z / 100)
    half = z * math.sqrt(0.9 * 0.1 / 100 + z * z / 40000) / (1 + z * z / 100)
    assert wilson(90, 100) == pytest.approx((centre - half, centre + half))
    assert wilson(90, 100) == pytest.approx((0.8256, 0.9448), abs=1e-4)
    assert wilson(0, 0) is None and wilson(10, 10)[1] == pytest.approx(1.0)


def test_two_proportion_z_by_hand():
    # pooled p = 0.85, se = sqrt(0.85 * 0.15 * (1/100 + 1/100)) = 0.0504975; z = 0.1 / se = 1.98030
    z, p = two_proportion_z(90, 100, 80, 100)
    assert z == pytest.approx(1.98030, abs=1e-4)
    assert p == pytest.approx(0.04767, abs=1e-4)


def test_mcnemar_exact_by_hand():
    # 10 vs 2 discordant: 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096
    assert mcnemar_exact(10, 2) == pytest.approx(2 * 79 / 4096)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_always_valid_lambda_by_hand():
    # one look, 100 per arm: A 90 right, B 70 right (in_a alternating so both reach min_samples together)
    in_a = np.array([True, False] * 100)
    a_right = [True] * 90 + [False] * 10
    b_right = [True] * 70 + [False] * 30
    correct = np.array([x for pair in zip(a_right, b_right) for x in pair])
    v = always_valid(in_a, correct, alpha=0.05, tau=0.05, min_samples=100)
    p1, p2 = 90.5 / 101, 70.5 / 101
    var = p1 * (1 - p1) / 100 + p2 * (1 - p2) / 100
    lam = math.sqrt(var / (var + 0.0025)) * math.exp(0.0025 * 0.2**2 / (2 * var * (var + 0.0025)))
    assert v.p_value == pytest.approx(1 / lam) and v.difference == pytest.approx(0.2)
    # 1/Λ = 0.069: the always-valid test wants more data where one fixed-n z-test (p = 0.0007) would not
    assert v.p_value == pytest.approx(0.069, abs=0.001) and v.decision == "no difference yet"
    assert two_proportion_z(90, 100, 70, 100)[1] < 0.001
    assert v.interval[0] < 0 < v.interval[1]


# ---- simulation: peeking ------------------------------------------------------------------------------
def test_always_valid_verdict_keeps_its_error_rate_under_peeking_and_the_naive_test_does_not():
    """A/A experiments (both arms 90 % accurate), read after every labelled request (mSPRT) or
    every 100 (naive z-test, stopping at the first p < 0.05)."""
    rng = np.random.default_rng(7)
    runs, n, alpha = 400, 3000, 0.05
    always_false, naive_false = 0, 0
    for _ in range(runs):
        in_a = rng.random(n) < 0.5
        correct = rng.random(n) < 0.9
        verdict = always_valid(in_a, correct, alpha, tau=0.05)
        always_false += verdict is not None and verdict.decision != "no difference yet"
        n1, n2 = np.cumsum(in_a), np.cumsum(~in_a)
        s1, s2 = np.cumsum(in_a & correct), np.cumsum(~in_a & correct)
        naive_false += any(two_proportion_z(int(s1[k]), int(n1[k]), int(s2[k]), int(n2[k]))[1] < alpha
                           for k in range(99, n, 100))
    assert always_false / runs <= alpha, always_false / runs
    assert naive_false / runs > 2 * alpha, naive_false / runs


def test_always_valid_verdict_finds_a_real_difference():
    rng = np.random.default_rng(3)
    in_a = rng.random(4000) < 0.5
    correct = np.where(in_a, rng.random(4000) < 0.92, rng.random(4000) < 0.85)
    assert always_valid(in_a, correct, 0.05, 0.05).decision == "A better"
    assert always_valid(~in_a, correct, 0.05, 0.05).decision == "B better"


# ---- the report --------------------------------------------------------------------------------------
def test_report_counts_arms_and_pairs_from_outcomes():
    e = experiment(shadow="s")
    outcomes = [
        Outcome("ensemble", 10.0, 1, 1, 0.01, 1, 1.0),   # both right
        Outcome("ensemble", 20.0, 1, 2, 0.50, 1, 2.0),   # primary only right
        Outcome("ensemble", 30.0, 3, 2, 0.40, 2, 3.0),   # shadow only right
        Outcome("student", 5.0, 0, None, None, 1, 4.0),  # wrong, no shadow pair
        Outcome("student", 6.0, 2, None, None, None, None),  # no feedback yet
    ]
    r = build_report(e, outcomes)
    ens, stu = r.arms
    assert (ens.requests, ens.labelled, ens.correct, ens.p50_ms) == (3, 3, 2, 20.0)
    assert (stu.requests, stu.labelled, stu.correct, stu.accuracy) == (2, 1, 0, 0.0)
    assert r.comparison.difference == pytest.approx(2 / 3) and r.comparison.verdict.startswith("no difference yet")
    p = r.paired
    assert (p.pairs, p.labelled_pairs, p.primary_only_correct, p.shadow_only_correct) == (3, 3, 1, 1)
    assert p.agreement == pytest.approx(1 / 3) and p.mean_kl == pytest.approx(0.91 / 3) and p.mcnemar_p == 1.0
