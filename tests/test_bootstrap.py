"""The tile bootstrap: resampled pooled Pearson, per-tile means, intervals and pairing."""

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
    assert B.interval([np.nan]) == [None, None]
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
