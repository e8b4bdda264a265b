"""The tile bootstrap: resampled pooled Pearson, per-tile means, the jackknife, BCa intervals, pairing, coverage."""

import numpy as np
import pandas as pd
import pytest

from sparsitytrap import bootstrap as B
from sparsitytrap.metrics import pearson_from_sums
from sparsitytrap.stores.evaluation import range_columns, sum_columns


def per_tile_table(rng, n_tiles=40, n_genes=3, signal=0.5, constant_gene=None):
    """A per_tile.parquet-like table from simulated bins: sums, ranges and a per-tile metric."""
    rows = []
    for t in range(n_tiles):
        for g in range(n_genes):
            x = rng.normal(size=50)
            y = signal * x + rng.normal(size=50)
            if g == constant_gene:
                y = np.zeros(50)
            sums = [50, x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()]
            row = {"tile": t, "gene": f"g{g}", "ssim_2um_pertile": rng.normal(0.3, 0.1)}
            row.update(dict(zip(sum_columns("2um"), sums)))
            row.update(dict(zip(range_columns("2um"), [x.min(), x.max(), y.min(), y.max()])))
            rows.append(row)
    return pd.DataFrame(rows)


def test_pooled_pcc_replicates_match_a_direct_pearson_of_the_drawn_tiles():
    table = per_tile_table(np.random.default_rng(0), n_tiles=12)
    reps = B.replicates(table, "pcc_2um_pooled", 5, seed=3)
    w = B.weights(12, 5, 3)
    s = table[sum_columns("2um")].to_numpy().reshape(12, 3, 6)
    for b in range(5):
        pooled = (w[b][:, None, None] * s).sum(0)
        assert reps[b] == pytest.approx(np.mean(pearson_from_sums(pooled, np.zeros(3, bool))), rel=1e-12)


def test_a_constant_side_is_left_out_and_nothing_is_nan_elsewhere():
    table = per_tile_table(np.random.default_rng(1), constant_gene=1)
    reps = B.replicates(table, "pcc_2um_pooled", 50, seed=0)
    w = B.weights(40, 50, 0)
    s = table[sum_columns("2um")].to_numpy().reshape(40, 3, 6)
    genes_0_2 = [
        np.mean(pearson_from_sums((w[b][:, None, None] * s).sum(0)[[0, 2]], np.zeros(2, bool))) for b in range(50)
    ]
    np.testing.assert_allclose(reps, genes_0_2, rtol=1e-12)


def test_interval_covers_the_truth_is_reproducible_and_seeded():
    table = per_tile_table(np.random.default_rng(2), n_tiles=200, n_genes=1)
    lo, hi = B.interval(B.replicates(table, "ssim_2um_pertile", 500, seed=7))
    assert lo < 0.3 < hi and hi - lo == pytest.approx(2 * 1.96 * 0.1 / np.sqrt(200), rel=0.25)
    assert B.interval(B.replicates(table, "ssim_2um_pertile", 500, seed=7)) == [lo, hi]
    assert B.interval(B.replicates(table, "ssim_2um_pertile", 500, seed=8)) != [lo, hi]
    assert B.interval(B.Resamples(np.array([np.nan]), 0.3, (np.zeros(3),))) == [None, None]
    assert B.interval(B.Resamples(np.zeros(5), 0.0, (np.zeros(1),))) == [None, None]  # one tile: no spread
    assert B.replicates(table, "no_such_metric", 10, 0) is None


def test_paired_delta_is_paired_within_folds():
    rng = np.random.default_rng(3)
    a = [per_tile_table(rng, n_tiles=30), per_tile_table(rng, n_tiles=25)]
    b = [t.assign(ssim_2um_pertile=t["ssim_2um_pertile"] + 0.01) for t in a]  # B = A + 0.01 on every tile
    delta = B.paired_delta(a, b, "ssim_2um_pertile", 200, seed=1)
    np.testing.assert_allclose(delta, 0.01, atol=1e-12)  # same tiles drawn for both: no spread at all
    fold = B.fold_mean(a, "ssim_2um_pertile", 200, seed=1)
    per_fold = [B.replicates(t, "ssim_2um_pertile", 200, 1) for t in a]
    np.testing.assert_allclose(fold, np.mean(per_fold, axis=0))
    assert B.interval(delta) == pytest.approx([0.01, 0.01], abs=1e-12)
    assert [len(j) for j in fold.jackknife] == [30, 25]  # the folds are the jackknife's strata
    lo, hi = B.interval(fold)
    assert lo < fold.estimate < hi


def test_jackknife_leaves_each_tile_out_and_estimate_uses_all():
    table = per_tile_table(np.random.default_rng(4), n_tiles=9)
    res = B.replicates(table, "pcc_2um_pooled", 10, seed=0)
    s = table[sum_columns("2um")].to_numpy().reshape(9, 3, 6)
    none = np.zeros(3, bool)
    assert res.estimate == pytest.approx(np.mean(pearson_from_sums(s.sum(0), none)), rel=1e-12)
    for i in range(9):
        loo = np.mean(pearson_from_sums(np.delete(s, i, axis=0).sum(0), none))
        assert res.jackknife[0][i] == pytest.approx(loo, rel=1e-12)


def coverage_table(rng, n_tiles, n_genes=3, n_bins=50):
    """Tiles of a known population: pooled Pearson of y = s_t x + noise with a skewed per-tile slope
    s_t ~ Gamma(2, 0.25), and a skewed per-tile metric ~ Gamma(4, 0.075) of mean 0.3."""
    s = rng.gamma(2.0, 0.25, size=(n_tiles, n_genes, 1))
    x = rng.normal(size=(n_tiles, n_genes, n_bins))
    y = s * x + rng.normal(size=x.shape)
    sums = [np.full(x.shape[:2], n_bins), x.sum(-1), y.sum(-1), (x * x).sum(-1), (y * y).sum(-1), (x * y).sum(-1)]
    ranges = [x.min(-1), x.max(-1), y.min(-1), y.max(-1)]
    cols = {"tile": np.repeat(np.arange(n_tiles), n_genes), "gene": np.tile(np.arange(n_genes), n_tiles)}
    cols["ssim_2um_pertile"] = rng.gamma(4.0, 0.075, size=(n_tiles, n_genes)).ravel()
    cols.update({c: v.ravel() for c, v in zip(sum_columns("2um") + range_columns("2um"), sums + ranges)})
    return pd.DataFrame(cols)


def test_interval_holds_its_coverage_at_14_tiles_where_the_percentile_does_not():
    # population values: pooled Pearson E[s] / sqrt(E[s^2] + 1) with s ~ Gamma(2, 0.25); the metric's mean 0.3
    truth = {"pcc_2um_pooled": 0.5 / np.sqrt(0.5**2 + 2 * 0.25**2 + 1), "ssim_2um_pertile": 0.3}
    hits = {(m, k): 0 for m in truth for k in ("bca", "percentile")}
    repeats = 400
    for r in range(repeats):
        table = coverage_table(np.random.default_rng([11, r]), n_tiles=14)
        for metric, value in truth.items():
            res = B.replicates(table, metric, 1000, seed=r)
            lo, hi = B.interval(res)
            plo, phi = np.quantile(np.asarray(res), [0.025, 0.975])
            hits[metric, "bca"] += lo <= value <= hi
            hits[metric, "percentile"] += plo <= value <= phi
    cover = {k: v / repeats for k, v in hits.items()}
    print(cover)
    for metric in truth:
        assert 0.93 <= cover[metric, "bca"] <= 0.97, (metric, cover)
        assert cover[metric, "percentile"] < cover[metric, "bca"] - 0.01, (metric, cover)
