import torch

from training.adaptive import HeadConfig, fit_combination_head, train_head
from training.combine import PooledFeatures
from training.inputs import Images, input_spec
from training.members import build_member


def test_head_training_leaves_member_weights_unchanged():
    torch.manual_seed(0)
    members = [build_member("committee_cnet", 3, 1, phi=-2) for _ in range(2)]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in members]
    features = PooledFeatures(members)
    images = Images(torch.randint(0, 256, (60, 1, 12, 12), dtype=torch.uint8), torch.arange(60) % 3)
    result = fit_combination_head(features, images, images, input_spec(1, 12, [0.5], [0.25]), 3,
                                  HeadConfig(max_epochs=3, seeds=2))
    assert result.head.in_features == features.num_features
    for member, saved in zip(members, before):
        for key, value in member.state_dict().items():
            assert torch.equal(value, saved[key]), key  # BN running stats too: features run in eval mode


def test_head_learns_separable_features_and_keeps_best_validation_f1():
    torch.manual_seed(0)
    y = torch.arange(300) % 3
    x = torch.nn.functional.one_hot(y, 3).float() * 3 + 0.3 * torch.randn(300, 3)
    result = train_head(x, y, x, y, 3, HeadConfig(lr=5e-2, max_epochs=30, patience=10), seed=0)
    assert result.val_weighted_f1 > 0.95
    assert result.epochs_run <= 30
