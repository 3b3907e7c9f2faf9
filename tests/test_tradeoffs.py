from PIL import Image

from model_store import Manifest
from training.report import markdown_table, operating_point_rows, write_markdown
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


def test_the_report_lists_each_cascade_operating_point_default_first(tmp_path):
    stages = [{"model": {"name": f"r-member-{i}", "version": 1}, "threshold": t, "flops_per_image": 1e7}
              for i, t in enumerate([0.9, None])]
    point = {"tolerance": 0.002, "val_accuracy": 0.91, "accuracy": 0.9, "members_per_image": 1.4, "reach": [1.0, 0.4]}
    cascade = Manifest.model_validate({
        **member_fields("r-cascade", kind="cascade", version=1, io=None),
        "composition": {"stages": stages, "operating_points": [
            {**point, "thresholds": [0.9]},
            {**point, "thresholds": [0.0], "tolerance": 1.0, "accuracy": 0.85, "members_per_image": 1.0, "reach": [1.0, 0.0]},
        ]},
        "metrics": {"samples": 10, "accuracy": 0.9, "weighted_f1": 0.9, "nll": 0.3, "ece": 0.02, "brier": 0.1, "params": 200,
                    "flops_per_image": 1.4e7, "members_per_image": 1.4},
    })
    assert operating_point_rows([_manifest("r-member-0", "member", 0.88, 1e7), cascade]) == [
        ("r-cascade:1", "0", "0.002", "0.9100", "0.9000", "1.40", "1.00 / 0.40"),
        ("r-cascade:1", "1", "1.000", "0.9100", "0.8500", "1.00", "1.00 / 0.00"),
    ]
    write_markdown([cascade], tmp_path / "results.md", "committee-train", 1.0, [])
    assert "## Cascade operating points" in (tmp_path / "results.md").read_text()
