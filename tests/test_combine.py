import numpy as np
import pytest
import torch

from model_store import CombineRule
from training.combine import AdaptiveEnsemble, Ensemble, PooledFeatures, combine_logits

LOGITS = torch.tensor([
    [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
    [[0.0, 3.0, 0.0], [0.0, 2.0, 0.0]],
    [[1.0, 0.0, 0.5], [0.0, 0.0, 4.0]],
])  # 3 members x 2 images x 3 classes


def test_mean_prob_averages_probabilities():
    expected = torch.softmax(LOGITS, -1).mean(0)
    assert torch.allclose(torch.softmax(combine_logits(LOGITS, CombineRule.MEAN_PROB), -1), expected)


def test_mean_logit_is_normalised_geometric_mean():
    p = torch.softmax(LOGITS, -1).numpy()
    geo = np.exp(np.log(p).mean(0))
    geo /= geo.sum(-1, keepdims=True)
    got = torch.softmax(combine_logits(LOGITS, CombineRule.MEAN_LOGIT), -1).numpy()
    np.testing.assert_allclose(got, geo, rtol=1e-5)


def test_vote_gives_vote_shares_and_splits_ties():
    logits = torch.tensor([[[1.0, 1.0, 0.0]], [[0.0, 2.0, 0.0]]])  # member 1 ties classes 0 and 1
    share = torch.softmax(combine_logits(logits, CombineRule.VOTE), -1)
    assert torch.allclose(share, torch.tensor([[0.25, 0.75, 0.0]]), atol=1e-5)


def test_ensemble_module_runs_members_and_combines():
    members = [torch.nn.Linear(4, 3) for _ in range(3)]
    x = torch.randn(5, 4)
    ensemble = Ensemble(members, CombineRule.MEAN_PROB)
    expected = combine_logits(torch.stack([m(x) for m in members]), CombineRule.MEAN_PROB)
    assert torch.allclose(ensemble(x), expected)
    with pytest.raises(ValueError, match="at least one member"):
        Ensemble([], CombineRule.VOTE)


def test_adaptive_ensemble_freezes_members():
    from training.members import build_member

    members = [build_member("committee_cnet", 10, 1, phi=-2) for _ in range(2)]
    features = PooledFeatures(members)
    model = AdaptiveEnsemble(features, torch.nn.Linear(features.num_features, 10))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["head.weight", "head.bias"]
    assert model(torch.randn(2, 1, 21, 21)).shape == (2, 10)


def test_mean_prob_stays_finite_where_every_member_underflows():
    # class 2 is ~1e-400 likely for every member: log(mean(softmax)) is -inf, the log-space form is not
    logits = torch.tensor([[[500.0, 0.0, -420.0]], [[480.0, 10.0, -430.0]]])
    combined = combine_logits(logits, CombineRule.MEAN_PROB)
    assert torch.isfinite(combined).all()
    assert combined[0, 2].item() == pytest.approx(-910.0 + np.log(0.5), abs=0.01)  # log((e^-920 + e^-910) / 2)
    soft = torch.softmax(combined, -1)
    kl = torch.nn.functional.kl_div(torch.log_softmax(torch.zeros(1, 3), -1), soft, reduction="batchmean")
    assert torch.isfinite(kl)  # the distillation loss no longer turns NaN
