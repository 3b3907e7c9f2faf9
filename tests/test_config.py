"""Presets, the user's TOML over them, and CLI flags over both."""

import pytest

from training.cli import apply_overrides
from training.config import PRESETS, load_config


def test_both_presets_validate_and_are_recorded():
    for name in PRESETS:
        config = load_config(None, name)
        assert config.preset == name
    quick, full = load_config(None, "quick"), load_config(None, "full")
    # both train on the whole training split; quick spends fewer epochs on it
    assert full.data.train_limit == 0 and quick.data.train_limit == 0
    assert quick.members.train.epochs < full.members.train.epochs
    assert quick.baseline.enabled and full.baseline.enabled  # Wang et al.'s comparison is on by default


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown preset 'huge': choose one of quick, full"):
        load_config(None, "huge")


def test_toml_overrides_the_preset_key_by_key_and_flags_override_both(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("[members.train]\nepochs = 1\n[student]\ntemperature = 5.0\n")
    config = load_config(path, "full")
    full = load_config(None, "full")
    assert config.members.train.epochs == 1
    assert config.members.train.augment == full.members.train.augment  # the rest of the table is the preset's
    assert config.student.temperature == 5.0 and config.student.alpha == full.student.alpha
    flagged = apply_overrides(config, {"members.train.epochs": 3, "data.train_limit": None})
    assert flagged.members.train.epochs == 3 and flagged.data.train_limit == 0 and flagged.preset == "full"


def test_without_a_preset_only_the_defaults_apply():
    assert load_config(None, None).preset == "custom"


@pytest.mark.parametrize("grid", [[0.05, 0.01], [0.01, 0.01], [0.5, 1.5], [-0.1, 0.1]])
def test_operating_tolerances_must_be_increasing_accuracy_losses(tmp_path, grid):
    path = tmp_path / "mine.toml"
    path.write_text(f"[cascade]\noperating_tolerances = {grid}\n")
    with pytest.raises(ValueError, match=r"operating_tolerances must be strictly increasing accuracy losses in \[0, 1\]"):
        load_config(path, None)
