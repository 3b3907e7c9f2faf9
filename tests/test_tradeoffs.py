from PIL import Image

from model_store import Manifest
from training.report import markdown_table
from model_store import pareto_front
from training.tradeoffs import plot_tradeoffs
from tests.helpers import member_fields


def test_pareto_front_keeps_only_undominated_points():
    points = [(1.0, 0.80), (2.0, 0.85), (2.0, 0.84), (3.0, 0.83), (4.0, 0.90), (1.0, 0.79)]
    assert pareto_front(points) == [0, 1, 4]


def _manifest(name, kind, acc, flops):
    fields = member_fields(name, kind=kind, version=1,
                           artifact={"path": "model.onnx", "sha256": "0" * 64, "size": 1},
                           metrics={"samples": 10, "accuracy": acc, "weighted_f1": acc, "nll": 0.3, "ece": 0.02,
                                    "brier": 0.1, "params": 100, "flops_per_image": flops})
    return Manifest.model_validate(fields)


def test_plot_and_table_cover_every_variant(tmp_path):
    manifests = [_manifest("r-member-0", "member", 0.88, 2e7), _manifest("r-ensemble", "ensemble", 0.90, 6e7),
                 _manifest("r-student", "student", 0.89, 1e7)]
    path = plot_tradeoffs(manifests, tmp_path / "t.png", "test")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 500
    table = markdown_table(manifests)
    assert table.count("\n") == 2 + 3
    assert "| r-member-0:1 | member | 0.8800 |" in table
    assert "★" in table.split("r-student")[1].split("\n")[0]  # cheapest and better than the member
    assert "★" not in table.split("r-member-0")[1].split("\n")[0]
