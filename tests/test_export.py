import numpy as np
import onnx
import pytest
import torch

from model_store import CombineRule
from training.combine import Ensemble
from training.export import ExportParityError, export_onnx, parity_max_abs_diff
from training.inputs import input_spec
from training.members import build_member

SPEC = input_spec(1, 16, [0.3], [0.2])


def _images(n=8):
    return torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8)


def test_ensemble_exports_as_one_graph_with_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    ensemble = Ensemble([build_member("committee_cnet", 5, 1) for _ in range(3)], CombineRule.MEAN_LOGIT).eval()
    exported = export_onnx(ensemble, SPEC, tmp_path / "e.onnx", _images())
    graph = onnx.load(str(tmp_path / "e.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert exported.info.parity_max_abs_diff < 1e-3 and exported.info.parity_samples == 8
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "e.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        out = session.run(None, {"input": np.zeros((batch, 1, 16, 16), np.float32)})[0]
        assert out.shape == (batch, 5)


def test_parity_check_catches_a_graph_that_computes_something_else(tmp_path):
    torch.manual_seed(0)
    model = build_member("committee_cnet", 5, 1).eval()
    export_onnx(model, SPEC, tmp_path / "m.onnx", _images())
    with torch.no_grad():
        model.fc.bias.add_(0.5)  # PyTorch now disagrees with the exported file
    assert parity_max_abs_diff(model, SPEC, tmp_path / "m.onnx", _images()) == pytest.approx(0.5, abs=1e-4)


def test_export_fails_above_tolerance(tmp_path, monkeypatch):
    import training.export as export

    monkeypatch.setattr(export, "parity_max_abs_diff", lambda *a: 0.01)
    with pytest.raises(ExportParityError, match="differs from PyTorch by 0.01"):
        export_onnx(build_member("committee_cnet", 5, 1), SPEC, tmp_path / "m.onnx", _images())


def test_ensemble_graph_also_outputs_member_logits(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    members = [build_member("committee_cnet", 5, 1) for _ in range(3)]
    ensemble = Ensemble(members, CombineRule.VOTE).eval()
    exported = export_onnx(ensemble, SPEC, tmp_path / "e.onnx", _images())
    assert exported.io.members_output_name == "member_logits"
    session = ort.InferenceSession(str(tmp_path / "e.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(4, 1, 16, 16)).astype(np.float32)
    combined, per_member = session.run(["logits", "member_logits"], {"input": x})
    assert per_member.shape == (4, 3, 5)  # batch x members x classes
    with torch.no_grad():
        expected = torch.stack([m(torch.from_numpy(x)) for m in members], dim=1).numpy()
    np.testing.assert_allclose(per_member, expected, atol=1e-4)
