import json

import pytest

from training.spread import spread_table


def write_run(folder, ensemble, member, seconds):
    folder.mkdir()
    claims = [{"key": "members", "values": {"ensemble": ensemble, "best_member": member}},
              {"key": "adaptive", "values": {"adaptive": 0.5, "weak_mean": 0.4}}]
    (folder / "claims.json").write_text(json.dumps({"seconds": seconds, "claims": claims}))
    return folder


def test_spread_shows_each_run_and_mean_and_std(tmp_path):
    runs = [write_run(tmp_path / "seed-0", 0.90, 0.88, 200), write_run(tmp_path / "seed-1", 0.92, 0.89, 220)]
    table = spread_table(runs)
    assert "| ensemble accuracy | 90.00 | 92.00 | 91.00 ± 1.41 % |" in table
    assert "| best member accuracy | 88.00 | 89.00 | 88.50 ± 0.71 % |" in table
    assert "cascade" not in table  # rows a run did not produce are left out, not shown as zeros
    assert table.splitlines()[-1] == "| wall time (s) | 200 | 220 | 210 |"


def write_distillation_run(folder, student, twin, teacher):
    folder.mkdir()
    values = {"student": student, "twin": twin, "teacher": teacher, "difference": student - twin, "p_value": 0.5,
              "share_kept": (student - twin) / (teacher - twin) if teacher > twin else None}
    (folder / "claims.json").write_text(json.dumps(
        {"seconds": 100, "claims": [{"key": "distillation", "verdict": "not shown at this budget", "values": values}]}))
    return folder


def test_share_kept_across_seeds_is_the_ratio_of_mean_differences():
    from training.spread import pooled_share_kept

    # per-run shares 1.0 and -0.5 (mean of ratios 0.25); mean differences 0.0/0.015 = 0
    runs = [{"distillation": {"student": 0.91, "twin": 0.90, "teacher": 0.91}},
            {"distillation": {"student": 0.89, "twin": 0.90, "teacher": 0.92}}]
    assert pooled_share_kept(runs) == pytest.approx(0.0)
    runs[1]["distillation"]["student"] = 0.91  # mean(student - twin) 0.01, mean(teacher - twin) 0.015
    assert pooled_share_kept(runs) == pytest.approx(0.01 / 0.015)
    assert pooled_share_kept([{"distillation": {"student": 0.9, "twin": 0.9, "teacher": 0.89}}]) is None


def test_spread_counts_the_runs_where_a_claim_holds_and_pools_the_share(tmp_path):
    runs = [write_distillation_run(tmp_path / "seed-0", 0.91, 0.90, 0.92),
            write_distillation_run(tmp_path / "seed-1", 0.90, 0.90, 0.90)]
    table = spread_table(runs)
    assert "| student - twin (pt) | +1.00 (p=0.5, not shown at this budget) | +0.00 (p=0.5, not shown at this budget) | 0.50 ± 0.71 pt; holds in 0 of 2 |" in table
    assert "| share of the teacher's gain kept (%) | 50.0 | undefined | 50.0 % (ratio of mean differences) |" in table
