"""The real-data noise ceiling (split-half thinning, mean of draws, Spearman-Brown) against the simulated truth."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from sparsitytrap.errors import InputError
from sparsitytrap.evaluate import ceiling_table, evaluate_ceiling
from sparsitytrap.metrics import split_half_thinning
from sparsitytrap.metrics.controls import mean_of_draws
from sparsitytrap.stores.tiles import open_tiles

BENCH = Path(__file__).resolve().parents[1] / "bench" / "ceiling.py"


def bench():
    """bench/ceiling.py, the validation this test runs at a small size (one implementation of it)."""
    spec = importlib.util.spec_from_file_location("bench_ceiling", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def validation(tmp_path_factory):
    """A simulated 256 x 256-bin patient in 64-bin tiles (14 with tissue), 16 genes sparse to dense."""
    b = bench()
    tiles, truth = b.simulated_tiles(tmp_path_factory.mktemp("ceiling"), seed=4, n_bins=256, tile_bins=64, n_genes=16)
    c = b.ceilings(tiles, truth, draws=8)
    return {"tiles": tiles, "c": c, "stats": b.agreement(c).set_index(["metric", "estimator"])}


def test_mean_of_draws_tracks_the_true_ceiling_per_gene_better_than_one_draw(validation):
    s = validation["stats"]
    print(s.to_string(float_format=lambda v: f"{v:.4f}"))
    for metric, min_corr in (("pcc_2um_pooled", 0.9), ("pcc_8um_pooled", 0.9), ("pcc_2um_pertile", 0.88)):
        new, old = s.loc[(metric, "new")], s.loc[(metric, "old")]  # old: one draw, scores averaged over 8 draws
        assert new["corr"] > min_corr and abs(new["bias"]) < 0.015 and new["mae"] < 0.03, (metric, new)
        assert new["mae"] < 0.85 * old["mae"] and new["corr"] > old["corr"], (metric, new, old)
        assert new["zero_fraction"] <= old["zero_fraction"], (metric, new, old)
    # Spearman: Spearman-Brown is an approximation for tied ranks; it tracks the truth, biased upwards
    scc = s.loc[("scc_2um_pooled", "new")]
    assert scc["corr"] > 0.8 and 0 < scc["bias"] < 0.06, scc


def test_many_draws_converge_to_the_poisson_limit_of_pooled_pearson(validation):
    # E over thinning of the half-vs-half sums gives r = (var - mean) / (var + mean); Spearman-Brown
    # then sqrt: the ceiling sqrt(1 - mean / var) over the tissue bins (var(rate) = var(y) - mean(y))
    tiles = open_tiles(validation["tiles"])
    y = np.asarray(tiles.counts[:], dtype=float)
    m = np.asarray(tiles.mask[:])
    tissue = np.moveaxis(y, 1, -1)[m]  # [bins, genes]
    limit = np.sqrt(np.clip(1 - tissue.mean(0) / tissue.var(0), 0, None))
    mean_of = validation["c"]["mean_of"]
    error = {k: np.abs(t["pcc_2um_pooled"].to_numpy() - limit).mean() for k, t in mean_of.items()}
    print(error)
    assert error[8] < 0.01 and error[8] < error[1] / 2  # the thinning noise falls with the draws


def test_ceiling_draws_are_seeded_and_validated(validation, tmp_path):
    tiles = validation["tiles"]
    a = ceiling_table(tiles, n_draws=2, seed=1)
    b = evaluate_ceiling(tiles, tmp_path / "c.csv", n_draws=2, shuffle_seed=1, batch_tiles=3)
    np.testing.assert_allclose(a["pcc_2um_pooled"], b["pcc_2um_pooled"], rtol=1e-12)  # batch size does not matter
    assert (a["ceiling_kind"] == "split-half thinning").all() and a["ssim_2um_pertile"].isna().all()
    assert not np.allclose(a["pcc_2um_pooled"], ceiling_table(tiles, n_draws=2, seed=2)["pcc_2um_pooled"])
    with pytest.raises(InputError, match="ceiling_draws"):
        ceiling_table(tiles, n_draws=0)


def test_mean_of_draws_averages_before_the_correction():
    counts = np.random.default_rng(0).poisson(0.3, size=(2, 4, 4))
    y1, y2 = split_half_thinning(counts, seed=0)
    assert (y1 + y2 == counts).all()
    import pandas as pd

    t1 = pd.DataFrame({"gene": ["a", "b"], "pcc_2um_pooled": [-0.1, np.nan]})
    t2 = pd.DataFrame({"gene": ["a", "b"], "pcc_2um_pooled": [0.3, np.nan]})
    out = mean_of_draws([t1, t2])
    assert out["pcc_2um_pooled"].iloc[0] == pytest.approx(0.1) and np.isnan(out["pcc_2um_pooled"].iloc[1])
    assert list(out["gene"]) == ["a", "b"]
