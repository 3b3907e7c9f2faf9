import json

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
