import math

import pytest
import torch

from training.distill import distillation_loss


def test_kd_loss_matches_hand_computation():
    student = torch.tensor([[1.0, 0.0]])
    teacher = torch.tensor([[0.0, 2.0]])
    labels = torch.tensor([0])
    T, alpha = 2.0, 0.1
    ps = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    pt = [1 / (1 + math.e), math.e / (1 + math.e)]
    kl = sum(t * math.log(t / s) for t, s in zip(pt, ps))
    ce = -math.log(math.e / (math.e + 1))
    expected = T**2 * kl + alpha * ce
    assert distillation_loss(student, teacher, labels, T, alpha).item() == pytest.approx(expected, rel=1e-6)


def test_soft_term_is_scaled_by_temperature_squared():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    for T in (1.0, 3.0, 5.0):
        soft_only = distillation_loss(s, t, y, T, alpha=0.0)
        kl = torch.nn.functional.kl_div(torch.log_softmax(s / T, -1), torch.softmax(t / T, -1), reduction="batchmean")
        assert soft_only.item() == pytest.approx(T**2 * kl.item(), rel=1e-5)


def test_identical_student_and_teacher_leave_only_the_hard_term():
    logits = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    ce = torch.nn.functional.cross_entropy(logits, y)
    assert distillation_loss(logits, logits, y, 4.0, 0.5).item() == pytest.approx(0.5 * ce.item(), abs=1e-6)


def test_a_mean_prob_ensemble_teaches_the_mean_of_its_members_softened_outputs():
    from training.distill import soft_targets

    members = torch.tensor([[[4.0, 0.0, 0.0]], [[0.0, 2.0, 0.0]]])  # 2 members x 1 image x 3 classes
    T = 3.0
    hinton = (torch.softmax(members[0] / T, -1) + torch.softmax(members[1] / T, -1)) / 2
    assert torch.exp(soft_targets(members, T)) == pytest.approx(hinton, abs=1e-6)
    # not the averaged probability softened again (equal only at T = 1)
    averaged = torch.softmax(members, -1).mean(0)
    resoftened = torch.softmax(torch.log(averaged) / T, -1)
    assert (torch.exp(soft_targets(members, T)) - resoftened).abs().max() > 0.03
    assert torch.exp(soft_targets(members, 1.0)) == pytest.approx(averaged, abs=1e-6)
