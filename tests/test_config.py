"""The config schema and the cross-reference checks reject malformed configs with a readable line."""

import copy
from pathlib import Path

import pytest
import yaml

from sparsitytrap import config as stconfig
from sparsitytrap.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cfg():
    return yaml.safe_load((ROOT / "config.yaml").read_text())


@pytest.fixture(autouse=True)
def _in_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def check(cfg):
    return stconfig.validate(copy.deepcopy(cfg), source="config.yaml")


def test_default_config_is_valid(cfg):
    out = check(cfg)
    assert stconfig.fold_names(out) == ["test-P1", "test-P2", "test-P3"]
    assert out["evaluation"]["bootstrap"] == 1000


@pytest.mark.parametrize(
    "mutate, key, words",
    [
        (lambda c: c.update(unknown_key=1), "<top level>", "unknown_key"),
        (lambda c: c["tiles"].update(min_tissue_fraction="half"), "tiles.min_tissue_fraction", "not of type"),
        (lambda c: c["tiles"].update(min_tissue_fraction=1.5), "tiles.min_tissue_fraction", "maximum"),
        (lambda c: c["genes"].update(n_genes=2.5), "genes.n_genes", "not of type"),
        (lambda c: c["samples"].update(P9={"path": "/no/such/spaceranger/outs"}), "samples.P9.path", "does not exist"),
        (lambda c: c["models"]["E_hist2st_poisson"]["loss"].update(name="l1"), "models.E_hist2st_poisson.loss.name", "is not one of"),
        (lambda c: c.update(encoder="uni"), "encoder", "not one of encoders"),
        (lambda c: c["comparisons"][0].update(b="missing_model"), "comparisons[0].b", "not declared"),
        (lambda c: c.update(folds=["P7"]), "folds", "not declared"),
        (lambda c: c["figures"].update(folds=["test-P9"]), "figures.folds", "not a fold"),
    ],
)
def test_malformed_config_gets_one_readable_line(cfg, mutate, key, words):
    mutate(cfg)
    with pytest.raises(InputError) as err:
        check(cfg)
    msg = str(err.value)
    assert "\n" not in msg
    assert key in msg and words in msg


def test_model_config_merges_training_defaults(cfg):
    cfg["models"]["E_hist2st_poisson"]["training"] = {"epochs": 3, "augment": {"color_jitter": True}}
    out = check(cfg)
    m = stconfig.model_config(out, "E_hist2st_poisson")
    assert m["training"]["epochs"] == 3
    assert m["training"]["augment"] == {"dihedral": True, "color_jitter": True}
    assert m["training"]["lr"] == cfg["training"]["lr"]
    assert m["decoder_kwargs"] == cfg["decoders"]["hist2st"]


def test_fold_samples(cfg):
    out = check(cfg)
    assert stconfig.fold_samples(out, "test-P2") == (["P1", "P3"], "P2")
    with pytest.raises(InputError):
        stconfig.fold_samples(out, "test-P9")
