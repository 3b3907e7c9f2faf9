"""Members trained apart (one process each, as the Indexed Job's pods), then combined; and
`--parallel`, through the real `committee-train` command on scikit-learn's digits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from model_store import Kind, ModelStore

TOML = """
run_name = "split"
threads = 1
[data]
dataset = "digits"
train_limit = 0
[members]
count = 2
phi = -2
train = { epochs = 1, batch_size = 64, augment = false }
[adaptive]
learners = 2
train = { epochs = 1, batch_size = 64, augment = false, early_stop = false }
head = { max_epochs = 2, seeds = 1 }
[student]
phi = -3
undistilled_twin = false
train = { epochs = 1, batch_size = 64, augment = false }
"""


def train(config: Path, store: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    program = Path(sys.executable).parent / "committee-train"
    return subprocess.run([str(program), "--config", str(config), "--store", str(store), "--report-dir", str(store.parent / "reports"),
                           *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "split.toml"
    path.write_text(TOML)
    return path


@pytest.mark.slow
def test_members_trained_in_separate_processes_then_combined(config, tmp_path):
    store = tmp_path / "store"
    # the two pods of an Indexed Job: one by flag, one by JOB_COMPLETION_INDEX, at the same time
    pods = [subprocess.Popen([str(Path(sys.executable).parent / "committee-train"), "--config", str(config), "--store", str(store),
                              "member", *flag], env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for flag, env in ((["--index", "0"], {}), ([], {"JOB_COMPLETION_INDEX": "1"}))]
    outputs = [p.communicate(timeout=600)[0] for p in pods]
    assert all(p.returncode == 0 for p in pods), outputs
    s = ModelStore(store)
    assert s.names() == ["split-member-0", "split-member-1"]
    assert (store / ".checkpoints" / "split-member-1" / "1.pt").exists()
    combined = train(config, store, "combine")
    assert combined.returncode == 0, combined.stderr[-3000:]
    names = set(s.names())
    assert {"split-ensemble-mean-prob", "split-cascade", "split-adaptive", "split-student"} <= names
    assert s.versions("split-member-0") == [1]  # combine built on the members, it did not retrain them
    ensemble = s.resolve("split-ensemble-mean-prob")
    assert [str(r) for r in ensemble.composition.members] == ["split-member-0:1", "split-member-1:1"]
    assert s.resolve("split-cascade").kind is Kind.CASCADE
    for name in names - {"split-cascade"}:  # the cascade is composite: no artifact of its own
        s.verify(s.resolve(name))
    assert "split-member-0" in (tmp_path / "reports" / "training-results.md").read_text()


def test_combine_without_members_says_what_to_run(config, tmp_path):
    out = train(config, tmp_path / "empty", "combine")
    assert out.returncode != 0 and "split-member-0" in out.stderr


def test_a_member_index_outside_the_count_is_refused(config, tmp_path):
    out = train(config, tmp_path / "store", "member", "--index", "5")
    assert out.returncode != 0 and "member index 5 is outside 0..1" in out.stderr


@pytest.mark.slow
def test_parallel_flag_trains_members_in_processes_and_publishes_the_same_variants(config, tmp_path):
    out = train(config, tmp_path / "store", "--parallel", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "training 2 members, 2 at a time, 1 thread(s) each" in out.stdout
    names = set(ModelStore(tmp_path / "store").names())
    assert {"split-member-0", "split-member-1", "split-ensemble-mean-prob", "split-cascade", "split-student"} <= names
