import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparsitytrap.bins import pool_mask, pool_masked, sum_pool


def test_sum_pool_conserves_counts_and_pools_mask():
    gen = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.full((2, 3, 16, 16), 0.3), generator=gen)
    for k in (1, 2, 4, 8):
        pooled = sum_pool(x, k)
        assert pooled.shape == (2, 3, 16 // k, 16 // k)
        torch.testing.assert_close(pooled.sum(dim=(2, 3)), x.sum(dim=(2, 3)))
        assert pooled[0, 1, 0, 0] == pytest.approx(float(x[0, 1, :k, :k].sum()))
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, 5, 2] = True
    assert pool_mask(mask, 4).tolist() == [[[False, False], [True, False]]]


def test_sum_pool_is_exact_on_integers_and_float16_rates_in_float64():
    rng = np.random.default_rng(0)
    counts = torch.from_numpy(rng.poisson(0.4, size=(3, 2, 16, 16)).astype(np.int32))
    rates = torch.from_numpy(rng.lognormal(-3, 3, size=(3, 2, 16, 16)).astype(np.float16)).double()
    for k in (2, 4):
        pooled = sum_pool(counts, k)  # integers are pooled in float64
        ref = counts.reshape(3, 2, 16 // k, k, 16 // k, k).sum(dim=(3, 5)).double()
        assert torch.equal(pooled, ref)
        ref = rates.reshape(3, 2, 16 // k, k, 16 // k, k).sum(dim=(3, 5))
        assert torch.equal(sum_pool(rates, k), ref)
        assert torch.equal(sum_pool(rates[0, 0], k), ref[0, 0])  # any leading axes, 2-D too


def test_pool_masked_sums_only_tissue_bins():
    pred = torch.ones(1, 1, 4, 4)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2, :1] = True
    p, t, m = pool_masked(pred, 2 * pred, mask, 2)
    assert p.tolist() == [[[[2.0, 0.0], [0.0, 0.0]]]] and t[0, 0, 0, 0] == 4.0
    assert m.tolist() == [[[True, False], [False, False]]]
    ref = F.max_pool2d(mask[:, None].float(), 2)[:, 0] > 0
    assert torch.equal(m, ref)
