"""End to end: the real pipeline on scikit-learn's digits with tiny settings."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from model_store import Kind, ModelStore
from training.claims import claims
from training.config import PipelineConfig
from training.pipeline import run_pipeline

TINY = {
    "run_name": "tiny",
    "data": {"dataset": "digits", "train_limit": 0},
    "members": {"count": 3, "phi": -2, "train": {"epochs": 2, "batch_size": 64, "augment": False}},
    "adaptive": {"train": {"epochs": 2, "batch_size": 64, "augment": False, "early_stop": False},
                 "head": {"max_epochs": 4, "seeds": 2}},
    "student": {"phi": -3, "train": {"epochs": 2, "batch_size": 64, "augment": False}},
    "baseline": {"enabled": True, "phi": -1, "train": {"epochs": 2, "batch_size": 64, "augment": False}},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    ctx = run_pipeline(PipelineConfig.model_validate(TINY), root)
    return root, ctx.published, ctx


@pytest.mark.slow
def test_every_variant_is_published_and_verifies(tiny_run):
    root, published, _ = tiny_run
    store = ModelStore(root)
    assert store.names() == sorted(
        [f"tiny-member-{i}" for i in range(3)] + ["tiny-weak-0", "tiny-weak-1", "tiny-weak-mean", "tiny-adaptive", "tiny-cascade",
         "tiny-student", "tiny-student-undistilled", "tiny-single-large"]
        + [f"tiny-ensemble-{r}" for r in ("mean-prob", "mean-logit", "vote")]
    )
    for manifest in published:
        assert manifest.metrics.samples == 450 and np.isfinite(manifest.metrics.nll)
        if manifest.kind is not Kind.CASCADE:
            store.verify(manifest)
            assert manifest.export.parity_max_abs_diff < 1e-3


@pytest.mark.slow
def test_ensemble_records_members_and_sums_their_flops(tiny_run):
    root, published, _ = tiny_run
    ensemble = ModelStore(root).resolve("tiny-ensemble-mean-prob")
    assert [str(r) for r in ensemble.composition.members] == [f"tiny-member-{i}:1" for i in range(3)]
    members = [m for m in published if m.name.startswith("tiny-member")]
    assert ensemble.metrics.flops_per_image == pytest.approx(sum(m.metrics.flops_per_image for m in members), rel=0.05)
    assert ensemble.input.height == 6  # digits are 8 px; phi=-2 scales resolution by 1.15**-2


@pytest.mark.slow
def test_cascade_is_composite_with_fitted_thresholds(tiny_run):
    root, _, _ = tiny_run
    cascade = ModelStore(root).resolve("tiny-cascade")
    assert cascade.artifact is None and len(cascade.composition.stages) == 3
    assert cascade.composition.stages[-1].threshold is None
    assert 1.0 <= cascade.metrics.members_per_image <= 3.0
    x = cascade.metrics.extra
    assert x["val_accuracy"] >= x["val_full_ensemble_accuracy"] - 0.002
    assert sum(x[f"test_exit_fraction_stage_{k}"] for k in (1, 2, 3)) == pytest.approx(1.0)
    default, *_, cheapest = cascade.composition.operating_points
    assert default.thresholds == [s.threshold for s in cascade.composition.stages[:-1]]
    assert default.accuracy == pytest.approx(cascade.metrics.accuracy) and cheapest.members_per_image == 1.0


@pytest.mark.slow
def test_student_records_teacher_and_twin_has_none(tiny_run):
    root, _, _ = tiny_run
    store = ModelStore(root)
    student, twin = store.resolve("tiny-student"), store.resolve("tiny-student-undistilled")
    assert str(student.composition.teacher) == "tiny-ensemble-mean-prob:1" and twin.composition.teacher is None
    assert student.metrics.params == twin.metrics.params
    assert student.metrics.flops_per_image < store.resolve("tiny-member-0").metrics.flops_per_image


@pytest.mark.slow
def test_adaptive_graph_runs_in_onnx_runtime_with_dynamic_batch(tiny_run):
    root, _, _ = tiny_run
    store = ModelStore(root)
    adaptive = store.resolve("tiny-adaptive")
    assert [str(r) for r in adaptive.composition.members] == ["tiny-weak-0:1", "tiny-weak-1:1"]
    session = ort.InferenceSession(str(store.verify(adaptive)), providers=["CPUExecutionProvider"])
    spec = adaptive.input
    logits = session.run(None, {"input": np.zeros((5, spec.channels, spec.height, spec.width), np.float32)})[0]
    assert logits.shape == (5, 10)


@pytest.mark.slow
def test_served_models_reproduce_the_accuracy_training_measured(tiny_run):
    """The contract end to end: what training evaluated is what the service computes from the
    manifest (UINT8 pixels normalised by the server, cascades run stage by stage)."""
    from service.config import Settings
    from tests.server import post, running_server
    from training.data import load_digits
    from training.inputs import resize_uint8

    root, _, _ = tiny_run
    store = ModelStore(root)
    _, test = load_digits()
    with running_server(Settings(store=root, max_images_per_request=500)) as url:
        for name in ("tiny-cascade", "tiny-ensemble-mean-logit", "tiny-weak-mean", "tiny-student"):
            manifest = store.resolve(name)
            pixels = resize_uint8(test.images, manifest.input.height).numpy()
            body = {"inputs": [{"name": "input", "shape": list(pixels.shape), "datatype": "UINT8", "data": pixels.ravel().tolist()}],
                    "outputs": [{"name": "logits"}]}
            r = post(url, f"/v2/models/{name}/infer", json=body)
            assert r.status_code == 200, r.text
            logits = np.array(r.json()["outputs"][0]["data"]).reshape(len(test), -1)
            served_accuracy = float((logits.argmax(1) == test.labels).mean())
            assert abs(served_accuracy - manifest.metrics.accuracy) <= 2 / len(test), name


@pytest.mark.slow
def test_manifests_record_how_the_run_was_set_up(tiny_run):
    _, published, _ = tiny_run
    for manifest in published:
        p = manifest.provenance
        assert (p.preset, p.val_fraction, p.train_limit, p.threads) == ("custom", 0.1, 0, 2)
        assert p.libraries["torch"] == torch.__version__.split("+")[0] and "timm" in p.libraries


@pytest.mark.slow
def test_claims_compare_the_models_each_paper_names(tiny_run):
    _, published, ctx = tiny_run
    acc = {m.name.removeprefix("tiny-"): m.metrics.accuracy for m in published}
    labels = ctx.splits.test.labels
    for m in published:  # the kept predictions are the ones each manifest's accuracy was measured on
        assert (ctx.test_predictions[m.name] == labels).mean() == pytest.approx(m.metrics.accuracy)
    rows = {c.key: c for c in claims(published, "tiny", ctx.test_predictions, labels)}
    assert len(rows) == 5
    best = rows["members"]
    assert {k: best.values[k] for k in ("ensemble", "best_member")} == {
        "ensemble": acc["ensemble-mean-prob"], "best_member": max(acc[f"member-{i}"] for i in range(3))}
    assert best.values["difference"] == pytest.approx(best.values["ensemble"] - best.values["best_member"])
    assert best.holds == (best.values["p_value"] < 0.05 and best.values["difference"] > 0)
    kd = rows["distillation"].values
    gain = acc["ensemble-mean-prob"] - acc["student-undistilled"]
    if gain > 0:
        assert kd["share_kept"] == pytest.approx((acc["student"] - acc["student-undistilled"]) / gain)
    head = rows["adaptive"]
    assert (head.values["adaptive"], head.values["weak_mean"]) == (acc["adaptive"], acc["weak-mean"])


@pytest.mark.slow
def test_report_writes_strict_claims_json_and_the_test_predictions(tiny_run, tmp_path):
    import json

    from training.cli import report

    _, published, ctx = tiny_run
    report(ctx, tmp_path, 12.0)

    def no_constants(name):
        raise ValueError(f"not strict JSON: {name}")

    body = json.loads((tmp_path / "claims.json").read_text(), parse_constant=no_constants)
    assert body["seconds"] == 12.0 and {c["key"] for c in body["claims"]} == {"members", "single", "cascade", "distillation", "adaptive"}
    assert all(c["verdict"] in ("holds", "not shown at this budget") and "McNemar exact p=" in c["evidence"] for c in body["claims"])
    saved = np.load(tmp_path / "test_predictions.npz")
    assert (saved["labels"] == ctx.splits.test.labels).all()
    for m in published:
        assert (saved[m.name] == saved["labels"]).mean() == pytest.approx(m.metrics.accuracy)
