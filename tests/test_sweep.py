"""The resolution sweep's numbers: paired Poisson - MSE deltas with their interval, zero fractions by bin size."""

import numpy as np
import pandas as pd
from test_features import write_tile_store

from sparsitytrap.figures.sweep import _pairs, delta_with_interval, zero_fraction
from sparsitytrap.stores.tiles import open_tiles


def test_delta_is_the_mean_over_folds_of_paired_gene_differences():
    rng = np.random.default_rng(0)
    rows = []
    for fold, shift in (("test-P1", 0.05), ("test-P2", 0.15)):
        for g in range(40):
            base = rng.uniform(0, 0.5)
            rows += [{"model": "m2", "fold": fold, "gene": f"G{g}", "pcc_8um_pooled": base}]
            rows += [{"model": "p2", "fold": fold, "gene": f"G{g}", "pcc_8um_pooled": base + shift}]
    pairs = _pairs(pd.DataFrame(rows), {"m2": 2, "p2": 2}, {"m2": "mse", "p2": "poisson"})
    assert len(pairs) == 80  # paired on fold and gene
    mean, low, high = delta_with_interval(pairs, "pcc_8um_pooled")
    assert np.isclose(mean, 0.10)  # (0.05 + 0.15) / 2: folds weigh equally
    assert low <= mean <= high and np.isclose(low, 0.10) and np.isclose(high, 0.10)  # no spread within folds


def test_zero_fraction_counts_zero_pooled_tissue_bins(tmp_path):
    path = write_tile_store(tmp_path / "t.zarr", n_tiles=2, n_genes=3, seed=1, sample="P1", grid_cols=2, tile_bins=32)
    store = open_tiles(path)
    got = zero_fraction([path], ums=(2, 8))
    counts, mask = store.counts[:].astype(float), store.mask[:].astype(bool)
    assert np.isclose(got[2], (counts.transpose(1, 0, 2, 3)[:, mask] == 0).mean())
    pooled = (counts * mask[:, None]).reshape(2, 3, 8, 4, 8, 4).sum(axis=(3, 5))
    tissue = mask.reshape(2, 8, 4, 8, 4).any(axis=(2, 4))
    assert np.isclose(got[8], (pooled.transpose(1, 0, 2, 3)[:, tissue] == 0).mean())
