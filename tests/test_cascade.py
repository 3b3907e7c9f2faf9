from functools import cache

import numpy as np
import pytest

from model_store import Confidence
from training.cascade import (
    NEVER, accuracy_drop_bound, confidence, fit_thresholds, manifest_threshold, operating_points, simulate, stage_probs,
)


def _members(rng, n=2000, m=3, k=5, skill=(1.5, 1.8, 2.0)):
    """Synthetic member probabilities: noisy logits that favour the true class by ``skill``."""
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(m, n, k))
    for j in range(m):
        logits[j, np.arange(n), labels] += skill[j]
    e = np.exp(logits)
    return e / e.sum(-1, keepdims=True), labels


def test_confidence_scores():
    p = np.array([[0.7, 0.2, 0.1]])
    assert confidence(p, Confidence.MAX_PROB)[0] == pytest.approx(0.7)
    assert confidence(p, Confidence.MARGIN)[0] == pytest.approx(0.5)
    assert confidence(p, Confidence.NEG_ENTROPY)[0] == pytest.approx(np.sum(p * np.log(p)))


def test_stage_k_averages_the_first_k_members():
    probs = np.array([[[1.0, 0.0]], [[0.0, 1.0]], [[0.5, 0.5]]])
    np.testing.assert_allclose(stage_probs(probs)[:, 0], [[1, 0], [0.5, 0.5], [0.5, 0.5]])


def test_simulate_exits_confident_images_early_and_counts_flops():
    probs = np.array([
        [[0.95, 0.05], [0.6, 0.4]],
        [[0.9, 0.1], [0.2, 0.8]],
    ])  # 2 members x 2 images
    out = simulate(probs, [10.0, 30.0], [0.9], Confidence.MAX_PROB)
    assert out.exit_stage.tolist() == [0, 1]
    assert out.flops.tolist() == [10.0, 40.0]
    np.testing.assert_allclose(out.probs[1], [0.4, 0.6])
    assert out.members_per_image() == 1.5
    with pytest.raises(ValueError, match="2 stages need 1 thresholds"):
        simulate(probs, [1, 1], [], Confidence.MAX_PROB)


@pytest.mark.parametrize("kind", list(Confidence))
def test_fitted_thresholds_meet_the_tolerance_on_the_data_they_were_fit_on(kind):
    probs, labels = _members(np.random.default_rng(0))
    flops = [1.0, 1.0, 1.0]
    thresholds = fit_thresholds(probs, labels, flops, kind, tolerance=0.002)
    full = (stage_probs(probs)[-1].argmax(-1) == labels).mean()
    out = simulate(probs, flops, thresholds, kind)
    assert (out.probs.argmax(-1) == labels).mean() >= full - 0.002
    assert out.flops.mean() < 3.0  # it found something cheaper than running every member


def test_zero_tolerance_cascade_is_never_less_accurate_and_looser_is_cheaper():
    probs, labels = _members(np.random.default_rng(1))
    costs = []
    for tolerance in (0.0, 0.02):
        t = fit_thresholds(probs, labels, [1.0, 1.0, 1.0], tolerance=tolerance)
        costs.append(simulate(probs, [1.0, 1.0, 1.0], t, Confidence.MAX_PROB).flops.mean())
    assert costs[1] <= costs[0]


def test_thresholds_depend_only_on_the_data_given():
    """Fitting sees validation arrays only: changing 'test' data cannot change the thresholds."""
    rng = np.random.default_rng(2)
    val_probs, val_labels = _members(rng)
    before = fit_thresholds(val_probs, val_labels, [1, 2, 3])
    _members(rng)  # a 'test' set drawn afterwards plays no part
    assert fit_thresholds(val_probs, val_labels, [1, 2, 3]) == before
    assert len(before) == 2 and all(t == NEVER or 0 <= t <= 1 for t in before)


def test_drop_bound_counts_only_discordant_images():
    ensemble = np.array([True] * 90 + [False] * 10)
    cascade = ensemble.copy()
    cascade[:4] = False  # 4 images the cascade loses
    cascade[95] = True  # 1 it gains
    assert accuracy_drop_bound(cascade, ensemble, z=0) == pytest.approx(3 / 100)
    assert accuracy_drop_bound(cascade, ensemble, z=2) == pytest.approx(3 / 100 + 2 * np.sqrt(5) / 100)
    assert accuracy_drop_bound(ensemble, ensemble, z=5) == 0


def test_a_safety_margin_never_makes_the_cascade_cheaper():
    probs, labels = _members(np.random.default_rng(3))
    costs = [simulate(probs, [1, 1, 1], fit_thresholds(probs, labels, [1, 1, 1], tolerance=0.002, z=z), Confidence.MAX_PROB).flops.mean()
             for z in (0.0, 1.645, 3.0)]
    assert costs[0] <= costs[1] <= costs[2] <= 3.0


def test_never_is_written_as_a_finite_threshold_no_confidence_reaches():
    for kind in Confidence:
        written = manifest_threshold(NEVER, kind)
        assert np.isfinite(written) and written > kind.ceiling
    assert manifest_threshold(0.8, Confidence.MAX_PROB) == 0.8


@cache  # each call fits seven cascades; the tests only read the result
def _staircase(seed=4, looser=(0.005, 0.01, 0.02, 0.05, 0.1, 1.0), kind=Confidence.MAX_PROB):
    rng = np.random.default_rng(seed)
    (val, val_labels), (test, test_labels) = _members(rng), _members(rng)
    return operating_points(val, val_labels, test, test_labels, [1.0, 2.0, 4.0], kind, 0.002, list(looser), z=1.645), (val, val_labels)


def test_operating_point_0_is_the_cascade_fit_at_the_served_tolerance():
    points, (val, labels) = _staircase()
    fitted = fit_thresholds(val, labels, [1.0, 2.0, 4.0], Confidence.MAX_PROB, tolerance=0.002, z=1.645)
    assert points[0].thresholds == [manifest_threshold(t, Confidence.MAX_PROB) for t in fitted]
    assert points[0].tolerance == 0.002


def test_operating_points_get_strictly_cheaper_down_to_every_image_exiting_at_stage_1():
    points, _ = _staircase()
    costs = [p.members_per_image for p in points]
    assert len(points) >= 3 and all(a > b for a, b in zip(costs, costs[1:]))
    assert costs[-1] == pytest.approx(1.0) and points[-1].reach == [1.0, 0.0, 0.0]
    assert all(a < b for a, b in zip([p.tolerance for p in points], [p.tolerance for p in points][1:]))


@pytest.mark.parametrize("kind", list(Confidence))
def test_each_operating_point_keeps_its_tolerance_on_validation(kind):
    points, (val, labels) = _staircase(kind=kind)
    full = (stage_probs(val)[-1].argmax(-1) == labels).mean()
    for p in points:
        assert p.val_accuracy >= full - p.tolerance - 1e-12
        again = simulate(val, [1.0, 2.0, 4.0], p.thresholds, kind)  # manifest-encoded thresholds run as fitted
        assert again.members_per_image() == p.members_per_image


def test_reach_starts_at_every_image_and_never_grows():
    points, _ = _staircase()
    for p in points:
        assert p.reach[0] == 1.0 and all(a >= b for a, b in zip(p.reach, p.reach[1:]))
        assert sum(p.reach) == pytest.approx(p.members_per_image)  # an image runs every stage it reaches


def test_only_looser_tolerances_than_the_served_one_add_points():
    points, _ = _staircase(looser=(0.0, 0.001, 0.002))
    assert [p.tolerance for p in points] == [0.002]


def test_a_looser_tolerance_that_buys_nothing_adds_no_point():
    points, _ = _staircase(looser=(0.0020001, 1.0))  # too close to 0.002 to move any threshold
    assert [p.tolerance for p in points] == [0.002, 1.0]
