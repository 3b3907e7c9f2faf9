import numpy as np
import pytest

from model_store import Confidence
from training.cascade import NEVER, accuracy_drop_bound, confidence, fit_thresholds, simulate, stage_probs


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
    from training.cascade import manifest_threshold

    for kind in Confidence:
        written = manifest_threshold(NEVER, kind)
        assert np.isfinite(written) and written > kind.ceiling
    assert manifest_threshold(0.8, Confidence.MAX_PROB) == 0.8
