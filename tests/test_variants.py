"""The service's cascade and combine rules, against training's (the contract between them)."""

import numpy as np
import pytest
import torch

from model_store import CombineRule
from service.variants import combine, log_softmax
from training.combine import combine_logits

LOGITS = np.random.default_rng(0).normal(scale=4, size=(3, 5, 4))  # stages x images x classes


@pytest.mark.parametrize("rule", list(CombineRule))
def test_service_combine_matches_training(rule):
    served = log_softmax(combine(log_softmax(LOGITS), rule))
    trained = torch.log_softmax(combine_logits(torch.tensor(LOGITS), rule), -1).numpy()
    np.testing.assert_allclose(np.exp(served), np.exp(trained), atol=1e-6)


def test_service_mean_prob_is_finite_where_probabilities_underflow():
    logits = np.array([[[500.0, 0.0, -420.0]], [[480.0, 10.0, -430.0]]])
    assert np.isfinite(combine(log_softmax(logits), CombineRule.MEAN_PROB)).all()
