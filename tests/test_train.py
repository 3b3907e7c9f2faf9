"""The training loop's pieces: per-image augmentation, the resize to a model's size, and both kinds
of teaching (fixed: cached teacher outputs; consistent: the teacher sees the student's view)."""

import torch
import torch.nn.functional as F

from training.distill import distillation_loss, teacher_loss
from training.inputs import input_spec, normalise
from training.train import SHIFT, Batch, augment_batch, to_model_size


def test_augmentation_flips_and_shifts_each_image_on_its_own():
    torch.manual_seed(0)
    x = torch.rand(64, 1, 12, 12) * 255 + 1  # no zeros, so the zero padding shows where a shift went
    out = augment_batch(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    moves = set()
    for i in range(len(x)):
        found = [
            (flip, dy, dx)
            for flip in (False, True)
            for dy in range(2 * SHIFT + 1)
            for dx in range(2 * SHIFT + 1)
            if torch.equal(out[i], F.pad(x[i : i + 1].flip(-1) if flip else x[i : i + 1], (SHIFT,) * 4)[0, :, dy : dy + 12, dx : dx + 12])
        ]
        assert found, f"image {i} is not a flipped/shifted copy of its input"
        moves.add(found[0])
    assert len(moves) > 10  # drawn per image, not once per batch


def test_views_are_resized_to_the_models_input_only_when_sizes_differ():
    view = torch.rand(3, 1, 28, 28) * 255
    assert to_model_size(view, input_spec(1, 28, [0.5], [0.5])) is view
    assert to_model_size(view, input_spec(1, 21, [0.5], [0.5])).shape == (3, 1, 21, 21)


class Recorder(torch.nn.Module):
    """A real (linear) teacher that also keeps what it was shown."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(28 * 28, 10)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return self.linear(x.flatten(1))


def test_consistent_teacher_sees_the_students_augmented_view():
    spec = input_spec(1, 28, [0.3], [0.3])
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    teacher = Recorder()
    loss = teacher_loss(teacher, images, spec, temperature=2.0, alpha=0.5, consistent=True)
    assert teacher.seen == []  # nothing precomputed
    view = augment_batch(images[:4].float(), torch.Generator().manual_seed(0))
    student_logits, labels = torch.randn(4, 10), torch.arange(4)
    got = loss(student_logits, labels, Batch(torch.arange(4), view))
    assert torch.equal(teacher.seen[-1], normalise(view, spec))
    expected = distillation_loss(student_logits, teacher.linear(normalise(view, spec).flatten(1)), labels, 2.0, 0.5)
    assert torch.allclose(got, expected)


def test_fixed_teacher_is_asked_once_per_image_and_looked_up_by_index():
    spec = input_spec(1, 28, [0.3], [0.3])
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    teacher = Recorder()
    loss = teacher_loss(teacher, images, spec, temperature=3.0, alpha=0.1)
    assert teacher.seen == []  # nothing before a batch needs it
    idx = torch.tensor([5, 2])
    student_logits, labels = torch.randn(2, 10), torch.tensor([1, 7])
    got = loss(student_logits, labels, Batch(idx, torch.zeros(2, 1, 28, 28)))
    assert len(teacher.seen) == 1 and torch.equal(teacher.seen[0], normalise(images[idx], spec))  # the view is ignored
    again = loss(student_logits, labels, Batch(torch.tensor([2, 5]), torch.zeros(2, 1, 28, 28)))
    assert len(teacher.seen) == 1  # looked up, not recomputed
    loss(student_logits, labels, Batch(torch.tensor([2, 6]), torch.zeros(2, 1, 28, 28)))
    assert len(teacher.seen) == 2 and torch.equal(teacher.seen[1], normalise(images[[6]], spec))  # only the new image
    with torch.no_grad():
        expected = distillation_loss(student_logits, teacher.linear(normalise(images[idx], spec).flatten(1)), labels, 3.0, 0.1)
        swapped = distillation_loss(student_logits, teacher.linear(normalise(images[[2, 5]], spec).flatten(1)), labels, 3.0, 0.1)
    assert torch.allclose(got, expected, atol=1e-5) and torch.allclose(again, swapped, atol=1e-5)
