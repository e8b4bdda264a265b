from pathlib import Path

import numpy as np
import pytest
import yaml

from sparsitytrap.config import fold_names, fold_samples, validate
from sparsitytrap.errors import InputError
from sparsitytrap.folds import validation_split

ROOT = Path(__file__).resolve().parents[1]


def _grid(n_rows, n_cols):
    return np.array([(r, c) for r in range(n_rows) for c in range(n_cols)], dtype=np.int32)


def _config(folds="loo", samples=("P1", "P2", "P5")):
    return {"samples": {sid: {} for sid in samples}, "folds": folds}


def test_loo_folds_train_on_the_others():
    config = _config()
    assert fold_names(config) == ["test-P1", "test-P2", "test-P5"]
    assert fold_samples(config, "test-P2") == (["P1", "P5"], "P2")
    for fold in fold_names(config):
        train, test = fold_samples(config, fold)
        assert test not in train and fold == f"test-{test}"


def test_explicit_folds_and_bad_input():
    config = _config(["P5"])
    assert fold_names(config) == ["test-P5"]
    assert fold_samples(config, "test-P5") == (["P1", "P2"], "P5")
    with pytest.raises(InputError, match="fold: 'test-P3'"):
        fold_samples(_config(samples=("P1", "P2")), "test-P3")


@pytest.mark.parametrize(
    "folds, keep, words",
    [(["P9"], None, "folds: test sample 'P9'"), ("loo", 1, "folds: leave-one-patient-out needs at least two")],
)
def test_bad_folds_are_refused_when_the_config_is_checked(monkeypatch, folds, keep, words):
    # the workflow checks folds once, when the DAG is planned, not in each job
    monkeypatch.chdir(ROOT)
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["samples"] = dict(list(config["samples"].items())[:keep])
    config["folds"] = folds
    with pytest.raises(InputError, match=words):
        validate(config, source="config.yaml")


def test_validation_blocks_are_contiguous_and_near_the_fraction():
    grid = _grid(10, 10)
    is_val = validation_split(grid, val_fraction=0.2, block_tiles=2, seed=3)
    assert is_val.dtype == bool and is_val.shape == (100,)
    assert 16 <= is_val.sum() <= 24
    # whole 2x2 blocks: every validation tile's block is entirely in validation
    block = {tuple(b) for b in grid[is_val] // 2}
    for b in block:
        members = np.all(grid // 2 == b, axis=1)
        assert is_val[members].all()


def test_validation_split_is_seeded():
    grid = _grid(8, 9)
    a = validation_split(grid, 0.25, 2, seed=1)
    assert np.array_equal(a, validation_split(grid, 0.25, 2, seed=1))
    assert any(not np.array_equal(a, validation_split(grid, 0.25, 2, seed=s)) for s in range(2, 6))


@pytest.mark.parametrize("n", [2, 3, 4])
def test_small_patients_keep_both_sides(n):
    # all tiles in one 2x2 block: single tiles are used instead, one validation tile at least
    grid = _grid(1, n) if n < 4 else _grid(2, 2)
    is_val = validation_split(grid, 0.2, block_tiles=2, seed=0)
    assert 1 <= is_val.sum() < n


def test_single_tile_patient_has_no_validation():
    assert validation_split(np.zeros((1, 2), int), 0.2, 2, 0).sum() == 0


def test_bad_grid_raises():
    with pytest.raises(InputError, match="grid"):
        validation_split(np.zeros((4, 3)), 0.2, 2, 0)
    with pytest.raises(InputError, match="training.val_fraction"):
        validation_split(_grid(2, 2), 1.5, 2, 0)
