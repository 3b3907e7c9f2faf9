"""Claim rows are judged by paired tests on the same test images, and written as strict JSON."""

import json

import numpy as np
import pytest

from model_store import Manifest
from training.claims import HOLDS, NOT_SHOWN, claims, mcnemar, share_kept, strict_json_value
from tests.helpers import member_fields

N = 1000
LABELS = np.zeros(N, dtype=np.int64)


def predictions(a_only: int, b_only: int, both_wrong: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Two prediction vectors on LABELS: A alone right on ``a_only`` images, B alone on ``b_only``."""
    a, b = np.zeros(N, dtype=np.int64), np.zeros(N, dtype=np.int64)
    b[:a_only] = 1
    a[a_only:a_only + b_only] = 1
    a[a_only + b_only:a_only + b_only + both_wrong] = b[a_only + b_only:a_only + b_only + both_wrong] = 2
    return a, b


def manifest(name: str, accuracy: float, kind: str = "member", flops: float = 1e6, **fields) -> Manifest:
    metrics = {"samples": N, "accuracy": accuracy, "weighted_f1": accuracy, "nll": 0.3, "ece": 0.01, "brier": 0.1,
               "params": 10, "flops_per_image": flops}
    return Manifest.model_validate({
        **member_fields(name, kind=kind), "version": 1, "metrics": metrics,
        "artifact": {"path": "model.onnx", "sha256": "0" * 64, "size": 1}, **fields,
    })


def ensemble_vs_best_member(a_only: int, b_only: int):
    ens, best = predictions(a_only, b_only)
    acc = lambda p: float((p == LABELS).mean())  # noqa: E731
    published = [manifest("r-ensemble-mean-prob", acc(ens), kind="ensemble", flops=3e6), manifest("r-member-0", acc(best))]
    rows = claims(published, "r", {"r-ensemble-mean-prob": ens, "r-member-0": best}, LABELS)
    return rows[0]


def test_mcnemar_p_is_the_exact_binomial_on_discordant_images():
    # 20 vs 5 discordant: P(X >= 20 | 25, 1/2) = 68,406 / 2^25, doubled for two sides
    test = mcnemar(*predictions(20, 5), LABELS)
    assert (test.a_only, test.b_only, test.n) == (20, 5, N)
    assert test.p_value == pytest.approx(2 * 68_406 / 2**25)
    assert test.difference == pytest.approx(0.015)


def test_a_significant_difference_holds():
    row = ensemble_vs_best_member(20, 5)  # p = 0.0041
    assert row.verdict == HOLDS and row.holds
    assert row.values["p_value"] == pytest.approx(0.004077, abs=1e-6)
    assert "p=0.0041" in row.evidence and "20 vs 5" in row.evidence


def test_a_difference_within_noise_is_not_shown_at_this_budget():
    row = ensemble_vs_best_member(12, 8)  # the ensemble is ahead by 0.4 pt, p = 0.50
    assert row.values["difference"] == pytest.approx(0.004)
    assert row.verdict == NOT_SHOWN and not row.holds
    assert row.values["p_value"] == pytest.approx(0.5034, abs=1e-4)


def test_a_significant_difference_the_wrong_way_is_not_shown():
    row = ensemble_vs_best_member(5, 20)
    assert row.values["p_value"] < 0.01 and row.verdict == NOT_SHOWN


def test_share_kept_is_null_with_a_reason_when_the_teacher_is_no_better_than_the_twin():
    kept, why = share_kept(student=0.90, twin=0.91, teacher=0.91)
    assert kept is None and "no better than the twin" in why
    kept, why = share_kept(student=0.905, twin=0.90, teacher=0.91)
    assert kept == pytest.approx(0.5) and why is None


def test_claims_json_is_strict_when_a_share_is_undefined():
    student, twin = predictions(10, 10)
    teacher = twin.copy()  # as good as the twin: nothing to keep
    acc = lambda p: float((p == LABELS).mean())  # noqa: E731
    published = [
        manifest("r-ensemble-mean-prob", acc(teacher), kind="ensemble"),
        manifest("r-student", acc(student), kind="student", composition={"teacher": {"name": "r-ensemble-mean-prob", "version": 1}}),
        manifest("r-student-undistilled", acc(twin), kind="student"),
    ]
    preds = {"r-ensemble-mean-prob": teacher, "r-student": student, "r-student-undistilled": twin}
    (row,) = [c for c in claims(published, "r", preds, LABELS) if c.key == "distillation"]
    assert row.values["share_kept"] is None and "no better" in row.notes["share_kept"]
    assert row.verdict == NOT_SHOWN
    text = json.dumps(strict_json_value({"claims": [row.as_dict()], "x": float("nan")}), allow_nan=False)
    assert json.loads(text)["x"] is None and "NaN" not in text


def test_the_cascade_holds_only_when_its_paired_bound_is_within_its_tolerance():
    ens = np.zeros(N, dtype=np.int64)
    cascade = ens.copy()
    cascade[:3] = 1  # loses 3 images the ensemble gets right, wins none: bound 0.3 + 1.645*sqrt(3)/10 pt
    config = {"tolerance": 0.002, "margin_z": 1.645}
    stages = [{"model": {"name": "r-member-0", "version": 1}, "threshold": 0.9, "flops_per_image": 1e6},
              {"model": {"name": "r-member-1", "version": 1}, "flops_per_image": 1e6}]
    prov = {"dataset": "d", "train_size": 1, "val_size": 1, "test_size": N, "split_seed": 0}

    def row(tolerance: float, flops: float):
        c = Manifest.model_validate({
            **member_fields("r-cascade", kind="cascade"), "version": 1, "composition": {"stages": stages},
            "metrics": {"samples": N, "accuracy": 0.997, "weighted_f1": 0.997, "nll": 0.1, "ece": 0.0, "brier": 0.0,
                        "params": 20, "flops_per_image": flops},
            "provenance": {**prov, "config": {**config, "tolerance": tolerance}},
        })
        e = manifest("r-ensemble-mean-prob", 1.0, kind="ensemble", flops=3e6)
        (r,) = claims([e, c], "r", {"r-ensemble-mean-prob": ens, "r-cascade": cascade}, LABELS)
        return r

    assert row(0.002, 1e6).verdict == NOT_SHOWN  # 0.3 pt lost: over a 0.2 pt tolerance
    ok = row(0.006, 1e6)  # bound 0.3 + 0.28 = 0.58 pt <= 0.6 pt
    assert ok.verdict == HOLDS and ok.values["loss_bound"] == pytest.approx(0.003 + 1.645 * np.sqrt(3) / N, rel=1e-3)
    assert row(0.006, 2e6).verdict == NOT_SHOWN  # 67 % of the FLOPs


def test_a_single_model_trained_for_fewer_epochs_than_the_members_shows_nothing():
    ens, single = predictions(300, 50)  # the ensemble far ahead, p far below 5 %
    acc = lambda p: float((p == LABELS).mean())  # noqa: E731
    prov = {"dataset": "d", "train_size": 1, "val_size": 1, "test_size": N, "split_seed": 0}

    def rows(single_epochs: float):
        published = [manifest("r-ensemble-mean-prob", acc(ens), kind="ensemble", flops=3e6),
                     manifest("r-member-0", acc(single), provenance={**prov, "config": {"epochs": 1.5}}),
                     manifest("r-single-large", acc(single), flops=2.8e6, provenance={**prov, "config": {"epochs": single_epochs}})]
        preds = {"r-ensemble-mean-prob": ens, "r-member-0": single, "r-single-large": single}
        return {c.key: c for c in claims(published, "r", preds, LABELS)}

    short = rows(0.25)["single"]
    assert short.values["p_value"] < 1e-10 and short.verdict == NOT_SHOWN
    assert "0.25 epochs" in short.notes["verdict"] and "not a like-for-like budget" in short.evidence
    assert rows(1.5)["single"].verdict == HOLDS
