"""End to end: the real pipeline on scikit-learn's digits with tiny settings."""

import numpy as np
import pytest

from model_store import Kind, ModelStore
from training.config import PipelineConfig
from training.pipeline import run_pipeline


@pytest.mark.slow
def test_tiny_pipeline_publishes_members_and_ensembles(tmp_path):
    config = PipelineConfig.model_validate({
        "run_name": "tiny",
        "data": {"dataset": "digits", "train_limit": 0},
        "members": {"count": 2, "phi": -2, "train": {"epochs": 2, "batch_size": 64}},
    })
    published = run_pipeline(config, tmp_path)
    store = ModelStore(tmp_path)
    assert store.names() == sorted(
        ["tiny-member-0", "tiny-member-1", "tiny-ensemble-mean-prob", "tiny-ensemble-mean-logit", "tiny-ensemble-vote"]
    )
    ensemble = store.resolve("tiny-ensemble-mean-prob")
    assert ensemble.kind is Kind.ENSEMBLE
    assert [str(r) for r in ensemble.composition.members] == ["tiny-member-0:1", "tiny-member-1:1"]
    members = [m for m in published if m.kind is Kind.MEMBER]
    assert ensemble.metrics.flops_per_image == pytest.approx(sum(m.metrics.flops_per_image for m in members), rel=0.05)
    assert ensemble.metrics.samples == 450 and ensemble.provenance.split_seed == 0
    for manifest in published:
        store.verify(manifest)
        assert manifest.export.parity_max_abs_diff < 1e-3
        assert 0.0 <= manifest.metrics.accuracy <= 1.0 and np.isfinite(manifest.metrics.nll)
    assert ensemble.input.height == 6  # digits are 8 px; phi=-2 scales resolution by 1.15**-2
