import numpy as np
import pytest
import torch

from training.evaluate import classification_metrics, expected_calibration_error, flops_per_image
from training.inputs import input_spec


def test_perfect_confident_predictions_score_perfectly():
    probs = np.eye(3)[[0, 1, 2, 1]]
    m = classification_metrics(probs, np.array([0, 1, 2, 1]))
    assert m["accuracy"] == 1 and m["weighted_f1"] == 1 and m["ece"] == 0 and m["brier"] == 0
    assert m["nll"] == pytest.approx(0, abs=1e-9)


def test_metrics_match_hand_computation():
    probs = np.array([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1], [0.2, 0.8]])
    labels = np.array([0, 0, 1, 1])
    m = classification_metrics(probs, labels)
    assert m["accuracy"] == 0.5
    assert m["nll"] == pytest.approx(-np.log([0.7, 0.4, 0.1, 0.8]).mean())
    assert m["brier"] == pytest.approx(np.mean([2 * 0.3**2, 2 * 0.6**2, 2 * 0.9**2, 2 * 0.2**2]))


def test_ece_uses_fifteen_equal_width_bins():
    # Two images at confidence 0.9 (one right), two at 0.6 (both right): |0.5-0.9|*0.5 + |1-0.6|*0.5
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4)


def test_flops_count_two_per_multiply_add():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 10, bias=False))
    assert flops_per_image(model, input_spec(1, 4, [0.0], [1.0])) == 2 * 16 * 10
