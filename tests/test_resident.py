"""Resident training sets (``training.resident``): the same batches and the same training as from zarr."""

import copy
import logging
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from test_train import STABLE, assert_same_weights, cohort, make_config, read_log, run_train  # noqa: F401

from sparsitytrap import config as stconfig
from sparsitytrap.errors import InputError
from sparsitytrap.training import split_samples
from sparsitytrap.training.data import ResidentTiles, loader, resident_bytes, wants_resident


def sets(cohort, on_the_fly=False, genes=None):  # noqa: F811
    tiles = [cohort / "tiles" / f"{s}.zarr" for s in ("P1", "P2")]
    features = [cohort / "features" / "tiny" / f"{s}.zarr" for s in ("P1", "P2")]
    train_set, val_set, _ = split_samples(tiles, features, 0.25, 2, 0, on_the_fly, genes=genes)
    return train_set, val_set


def zarr_batch(dataset, keys):
    """The batch the DataLoader collates from items read from zarr."""
    return next(iter(loader(dataset, [keys])))


def assert_same_batch(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("on_the_fly", [False, True], ids=["tokens", "images"])
@pytest.mark.parametrize("genes", [None, ["G3", "G1"]], ids=["all_genes", "fold_genes"])
def test_a_resident_batch_is_the_zarr_batch_under_every_view(cohort, on_the_fly, genes):  # noqa: F811
    train_set, val_set = sets(cohort, on_the_fly, genes)
    for dataset in (train_set, val_set):
        resident = ResidentTiles(dataset, "cpu", block=3)  # blocks that cut a sample's tiles
        assert len(resident) == len(dataset) and resident.paths == dataset.paths
        n = len(dataset)
        for v in range(8):
            keys = [(i, v) for i in range(n)]
            assert_same_batch(resident.batch(keys), zarr_batch(dataset, keys))
        mixed = [(i, (3 * i + 1) % 8) for i in reversed(range(n))]  # one batch, several views
        assert_same_batch(resident.batch(mixed), zarr_batch(dataset, mixed))
        assert_same_batch(resident[mixed[0]], dataset[mixed[0]])  # one item, as the dataset's
    # the views do change the batch (the comparison above can fail)
    resident = ResidentTiles(train_set, "cpu")
    assert not torch.equal(resident.batch([(0, 0)])["target"], resident.batch([(0, 5)])["target"])


def test_resident_bytes_are_what_the_tensors_take(cohort):  # noqa: F811
    for on_the_fly in (False, True):
        train_set, _ = sets(cohort, on_the_fly, ["G2"])
        r = ResidentTiles(train_set, "cpu")
        held = sum(t.numel() * t.element_size() for t in (r.x, r.target, r.mask))
        assert resident_bytes(train_set) == held > 0


def test_auto_is_resident_when_it_fits():
    assert wants_resident("auto", 100, lambda: 200)
    assert not wants_resident("auto", 300, lambda: 200)
    assert wants_resident(True, 300, lambda: 0) and not wants_resident(False, 1, lambda: 10)
    for bad in ("yes", 1, None):
        with pytest.raises(InputError, match="training.resident: must be auto, true or false"):
            wants_resident(bad, 1, lambda: 10)


def test_the_schema_takes_auto_true_false(monkeypatch):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the config's relative paths
    base = yaml.safe_load((root / "config.yaml").read_text())
    for ok in ("auto", True, False):
        cfg = copy.deepcopy(base)
        cfg["training"]["resident"] = ok
        stconfig.validate(cfg)
    cfg["models"]["E_hist2st_poisson"]["training"] = {"resident": "yes"}
    with pytest.raises(InputError, match="models.E_hist2st_poisson.training.resident"):
        stconfig.validate(cfg)


@pytest.mark.parametrize(
    "training",
    [{}, {"epochs": 1, "augment": {"dihedral": True, "color_jitter": True}}],
    ids=["cache", "on_the_fly"],
)
def test_training_is_identical_with_a_resident_set(cohort, tmp_path, caplog, training):  # noqa: F811
    logs = {}
    for resident in (False, True):
        out = tmp_path / str(resident)
        with caplog.at_level(logging.INFO, logger="sparsitytrap.training.data"):
            caplog.clear()
            run_train(make_config(cohort, resident=resident, **training), "E", "test-P3", out)
        assert ("resident on cpu" in caplog.text) == resident  # the resident path did run
        logs[resident] = read_log(out)[STABLE]
    pd.testing.assert_frame_equal(logs[False], logs[True])
    assert_same_weights(tmp_path / "False", tmp_path / "True")
