import pytest
import timm
import torch

from training.evaluate import flops_per_image
from training.inputs import input_spec
from training.members import CNET, CompoundScale, build_member, image_size_for


def test_compound_scaling_grows_depth_width_and_resolution_together():
    small, big = CompoundScale(0), CompoundScale(2)
    assert big.depth == pytest.approx(1.2**2) and big.width == pytest.approx(1.1**2)
    assert big.image_size(28) == round(28 * 1.15**2) == 37
    assert big.blocks(2) > small.blocks(2) and big.channels(64) > small.channels(64)


def test_each_step_of_phi_roughly_doubles_flops():
    flops = []
    for phi in (0, 1):
        size = image_size_for(CNET, phi, 28)
        flops.append(flops_per_image(build_member(CNET, 10, 1, phi), input_spec(1, size, [0.5], [0.5])))
    assert 1.6 < flops[1] / flops[0] < 3.0


def test_family_is_in_timms_registry_with_the_two_halves_interface():
    model = timm.create_model(CNET, pretrained=False, num_classes=7, in_chans=3, phi=-1)
    x = torch.randn(2, 3, 24, 24)
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pooled.shape == (2, model.num_features)
    assert model(x).shape == (2, 7)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model(CNET, pretrained=True)


def test_any_timm_architecture_builds_without_weights():
    model = build_member("resnet10t", num_classes=4, in_chans=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    assert image_size_for("resnet10t", 3, 32) == 32
    with pytest.raises(ValueError, match="applies to committee_cnet only"):
        build_member("resnet10t", 4, 1, phi=1)


def test_same_seed_same_weights():
    torch.manual_seed(5)
    a = build_member(CNET, 10, 1)
    torch.manual_seed(5)
    b = build_member(CNET, 10, 1)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
