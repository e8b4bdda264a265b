"""Metrics against scipy / scikit-image references on small random and count-like batches."""

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats as ss
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity

from sparsitytrap import metrics as M
from sparsitytrap.errors import InputError
from sparsitytrap.metrics import compiled


def batch(seed, t=3, g=4, h=16, w=16, tissue=0.7, shape=0.5):
    """Sparse count-like batch: gamma rates, Poisson counts, random tissue mask."""
    rng = np.random.default_rng(seed)
    rate = rng.gamma(shape, 1.0, size=(t, g, h, w))
    counts = rng.poisson(rate).astype(np.int32)
    mask = rng.random((t, h, w)) < tissue
    return torch.tensor(rate), torch.tensor(counts), torch.tensor(mask)


def structured(seed, t=32, g=3, n=32, sigma=1.5):
    """Smooth random log-rate fields (distinct per tile) and their Poisson counts."""
    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.normal(size=(t, g, n, n)), sigma=(0, 0, sigma, sigma))
    rate = np.exp(field / field.std())
    return torch.tensor(rate), torch.tensor(rng.poisson(rate)), torch.ones(t, n, n, dtype=torch.bool)


def batches(pred, target, mask, batch_tiles, pred_order=None):
    """(pred, target, mask) torch batches of array-likes; predictions in `pred_order` when given."""
    pred, target, mask = (torch.as_tensor(np.asarray(a)) for a in (pred, target, mask))
    order = torch.arange(len(target)) if pred_order is None else torch.as_tensor(pred_order)
    for t0 in range(0, len(target), batch_tiles):
        idx = order[t0 : t0 + batch_tiles]
        yield pred[idx], target[t0 : t0 + batch_tiles], mask[t0 : t0 + batch_tiles]


def test_pooled_pearson_streams_like_scipy_with_offset():
    rate, counts, mask = batch(1, t=5)
    rate = rate + 1e5  # a large offset must not cancel catastrophically
    acc = M.PearsonAccumulator(4)
    for lo, hi in [(0, 2), (2, 3), (3, 5)]:
        acc.update(rate[lo:hi], counts[lo:hi], mask[lo:hi])
    m = mask.numpy()
    ref = [ss.pearsonr(rate[:, g].numpy()[m], counts[:, g].numpy()[m])[0] for g in range(4)]
    np.testing.assert_allclose(acc.compute(), ref, atol=1e-6)
    assert acc.n_bins == m.sum()


def test_pearson_per_tile_like_scipy_and_nan_for_constant():
    rate, counts, mask = batch(2)
    counts[1, 2] = 3  # constant target in one (tile, gene)
    r = M.pearson_per_tile(rate, counts, mask).numpy()
    m = mask.numpy()
    for t in range(3):
        for g in range(4):
            x, y = rate[t, g].numpy()[m[t]], counts[t, g].numpy()[m[t]]
            if (t, g) == (1, 2):
                assert np.isnan(r[t, g])
            else:
                assert r[t, g] == pytest.approx(ss.pearsonr(x, y)[0], abs=1e-6)


def test_pertile_mean_excludes_undefined_tiles():
    rate, counts, mask = batch(3)
    counts[0, 0] = 0
    acc = M.TileMetricAccumulator(4, M.pearson_per_tile)
    acc.update(rate, counts, mask)
    mean, count = acc.compute()
    r = M.pearson_per_tile(rate, counts, mask).numpy()
    assert count.tolist() == [2, 3, 3, 3]
    assert mean[0] == pytest.approx(r[1:, 0].mean())
    assert acc.values.shape == (3, 4)


def test_pooled_pearson_nan_for_constant_gene():
    rate, counts, mask = batch(4)
    counts[:, 1] = 0
    acc = M.PearsonAccumulator(4)
    acc.update(rate, counts, mask)
    r = acc.compute()
    assert np.isnan(r[1]) and np.isfinite(r[[0, 2, 3]]).all()


def test_average_ranks_match_rankdata_with_ties():
    rng = np.random.default_rng(5)
    x = rng.poisson(0.3, size=(3, 200)).astype(np.float64)  # mostly tied zeros
    np.testing.assert_array_equal(M.average_ranks(torch.tensor(x)).numpy(), ss.rankdata(x, axis=1))


def test_ranks_of_every_dtype_match_rankdata():
    rng = np.random.default_rng(8)
    counts = rng.poisson(0.4, size=(4, 300))
    special = [0.0, -0.0, -2.5, float("inf"), float("-inf"), 6e-8, 65504.0]
    halves = np.concatenate([rng.lognormal(-3, 2, size=(4, 293)) * rng.choice([-1, 1], (4, 293)), [special] * 4], 1)
    cases = [
        torch.tensor(counts, dtype=torch.int32),  # few varying bits: one counting pass
        torch.tensor(counts - 3, dtype=torch.int64),  # negative integers
        torch.tensor(counts, dtype=torch.float32),  # integer-valued floats
        torch.tensor(halves, dtype=torch.float16),  # ties from float16 rounding, -0 == +0, infinities: radix
        torch.tensor(halves, dtype=torch.bfloat16),
        torch.tensor(halves, dtype=torch.float64),
    ]
    for x in cases:
        ref = ss.rankdata(x.to(torch.float64).numpy(), axis=1)
        np.testing.assert_array_equal(M.average_ranks(x).numpy(), ref, err_msg=str(x.dtype))
        valid = torch.tensor(rng.random(x.shape) < 0.6)
        got = M.average_ranks(x, valid).numpy()
        for row in range(x.shape[0]):
            v = valid[row].numpy()
            np.testing.assert_array_equal(got[row][v], ss.rankdata(x[row].to(torch.float64).numpy()[v]))
            assert (got[row][~v] == 0).all()
    assert M.average_ranks(torch.zeros(2, 0)).shape == (2, 0)
    np.testing.assert_array_equal(M.average_ranks(torch.full((5,), 3.0)).numpy(), [3.0] * 5)  # all tied


def test_spearman_of_float16_predictions_like_scipy():
    rate, counts, mask = batch(7, t=3, g=5, h=16, w=16, shape=0.3)
    pred = (rate * 0.01).to(torch.float16)  # many ties after rounding, as stored predictions
    counts[2, 1] = 4  # constant target: undefined
    acc = M.SpearmanAccumulator(5)
    acc.update(pred, counts, mask)
    m = mask.numpy()
    p = pred.to(torch.float64).numpy()
    ref = [ss.spearmanr(p[:, g][m], counts[:, g].numpy()[m])[0] for g in range(5)]
    np.testing.assert_allclose(acc.compute(), ref, atol=1e-12)
    per_tile = M.spearman_per_tile(pred, counts, mask).numpy()
    for t in range(3):
        for g in range(5):
            x, y = p[t, g][m[t]], counts[t, g].numpy()[m[t]]
            if (t, g) == (2, 1):
                assert np.isnan(per_tile[t, g])
            else:
                assert per_tile[t, g] == pytest.approx(ss.spearmanr(x, y)[0], abs=1e-12)


def test_spearman_pooled_and_per_tile_like_scipy():
    rate, counts, mask = batch(6, shape=0.3)
    acc = M.SpearmanAccumulator(4)
    acc.update(rate[:2], counts[:2], mask[:2])
    acc.update(rate[2:], counts[2:], mask[2:])
    m = mask.numpy()
    ref = [ss.spearmanr(rate[:, g].numpy()[m], counts[:, g].numpy()[m])[0] for g in range(4)]
    np.testing.assert_allclose(acc.compute(), ref, atol=1e-6)
    per_tile = M.spearman_per_tile(rate, counts, mask).numpy()
    for t in range(3):
        for g in range(4):
            x, y = rate[t, g].numpy()[m[t]], counts[t, g].numpy()[m[t]]
            assert per_tile[t, g] == pytest.approx(ss.spearmanr(x, y)[0], abs=1e-6)


def reference_ssim(pred, target, mask):
    """The seeds' per-pair loop with skimage, as the reference."""
    out = np.full(pred.shape[:2], np.nan)
    for t in range(pred.shape[0]):
        if mask[t].mean() <= 0.05:
            continue
        for g in range(pred.shape[1]):
            a, b = pred[t, g] * mask[t], target[t, g] * mask[t]
            lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
            if hi - lo < 1e-6:
                continue
            out[t, g] = structural_similarity((a - lo) / (hi - lo), (b - lo) / (hi - lo), win_size=7, data_range=1.0)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_ssim_matches_skimage_on_many_pairs(seed):
    rate, counts, mask = batch(10 + seed, t=6, g=8, h=24, w=20, shape=0.2 + 0.3 * seed)
    mask[0] = False
    mask[0, :3, :3] = True  # 9 of 480 bins: tissue fraction <= 0.05, skipped
    counts[1, 0] = 0
    rate[1, 0] = 0.0  # both sides zero: range < 1e-6, skipped
    got = M.ssim_per_tile(rate, counts, mask).numpy()
    ref = reference_ssim(rate.numpy(), counts.numpy(), mask.numpy())
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert np.isnan(got[0]).all() and np.isnan(got[1, 0])


def test_ssim_images_matches_skimage_on_unscaled_noise():
    rng = np.random.default_rng(20)
    a, b = rng.random((5, 13, 17)), rng.random((5, 13, 17))
    got = M.ssim_images(torch.tensor(a), torch.tensor(b)).numpy()
    ref = [structural_similarity(a[i], b[i], win_size=7, data_range=1.0) for i in range(5)]
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_ratio_deviance_sparsity_by_hand():
    rate, counts, mask = batch(7)
    rate[0, 0, 0, 0] = 0.0  # zero rate: clamped, finite deviance
    acc = M.CountAccumulator(4)
    acc.update(rate, counts, mask)
    got = acc.compute()
    m = mask.numpy()
    for g in range(4):
        mu, y = rate[:, g].numpy()[m], counts[:, g].numpy()[m].astype(float)
        mu_c = np.maximum(mu, 1e-8)
        with np.errstate(divide="ignore", invalid="ignore"):
            ylogy = np.where(y > 0, y * np.log(y / mu_c), 0.0)
        assert got["deviance"][g] == pytest.approx(np.mean(2 * (ylogy - (y - mu))))
        assert got["ratio"][g] == pytest.approx(mu.mean() / y.mean())
        assert got["sparsity"][g] == pytest.approx(np.mean(y == 0))


def test_shuffle_pairs_is_seeded_derangement():
    perm = M.shuffle_pairs(50, seed=3)
    assert sorted(perm) == list(range(50))
    assert (perm != np.arange(50)).all()
    assert np.array_equal(perm, M.shuffle_pairs(50, seed=3))
    assert not np.array_equal(perm, M.shuffle_pairs(50, seed=4))
    assert (M.shuffle_pairs(2, seed=0) == [1, 0]).all()
    with pytest.raises(InputError, match="n_tiles"):
        M.shuffle_pairs(1, seed=0)


def test_label_shuffle_null_is_near_zero_while_matched_is_high():
    rate, counts, mask = structured(8)
    perm = M.shuffle_pairs(len(rate), seed=1)
    matched = M.evaluate_stream(batches(rate, counts, mask, 5), 3, ssim=False, spearman=False)
    null = M.evaluate_stream(batches(rate, counts, mask, 5, pred_order=perm), 3, ssim=False, spearman=False)
    assert (matched["pcc_2um_pooled"] > 0.5).all()
    assert (null["pcc_2um_pooled"].abs() < 0.1).all()
    assert (null["pcc_8um_pertile"].abs() < 0.15).all()


def test_split_half_thinning_and_ceiling_on_poisson_counts():
    rate, counts, mask = structured(9, t=8, g=2, n=64)
    y1, y2 = M.split_half_thinning(counts, seed=(0, 0))
    assert torch.equal(y1 + y2, counts) and (y1 >= 0).all() and (y2 >= 0).all()
    again = M.split_half_thinning(counts, seed=(0, 0))[0]
    assert torch.equal(y1, again)
    assert not torch.equal(y1, M.split_half_thinning(counts, seed=(0, 1))[0])
    half = M.evaluate_stream([(y1, y2, mask)], 2, ssim=False, spearman=False)
    truth = M.evaluate_stream([(rate, counts, mask)], 2, ssim=False, spearman=False)
    ceiling = M.correct_split_half(half)
    # the corrected split-half estimate recovers the correlation of the true rate with the counts
    for col in ("pcc_2um_pooled", "pcc_8um_pooled"):
        np.testing.assert_allclose(ceiling[col], truth[col], atol=0.015)
    assert (half["pcc_2um_pooled"] < truth["pcc_2um_pooled"] - 0.05).all()
    assert M.noise_ceiling(-0.2) == 0.0
    with pytest.raises(InputError, match="counts"):
        M.split_half_thinning(np.array([1, -1]), seed=0)


def test_evaluate_stream_is_batch_invariant_and_deterministic():
    rate, counts, mask = batch(11, t=6, g=3, h=16, w=16)
    genes = ["A", "B", "C"]
    one = M.evaluate_stream([(rate, counts, mask)], 3, genes=genes)
    split = M.evaluate_stream(batches(rate.numpy(), counts.numpy(), mask.numpy(), 4), 3, genes=genes)
    expected = {"pcc_2um_pooled", "pcc_2um_pertile", "pcc_4um_pooled", "pcc_8um_pertile", "ssim_2um", "ssim_pairs",
                "scc_2um_pooled", "scc_2um_pertile", "ratio", "deviance", "sparsity"}  # fmt: skip
    assert expected <= set(one.columns)
    assert one["gene"].tolist() == genes
    num = one.columns.drop("gene")
    np.testing.assert_allclose(one[num].to_numpy(float), split[num].to_numpy(float), rtol=1e-10)
    again = M.evaluate_stream([(rate, counts, mask)], 3, genes=genes)
    assert one.equals(again)


def test_per_tile_values_for_bootstrap():
    rate, counts, mask = batch(12, t=5)
    gm = M.GeneMetrics(4)
    gm.update(rate[:2], counts[:2], mask[:2])
    gm.update(rate[2:], counts[2:], mask[2:])
    per_tile = gm.per_tile()
    assert per_tile["pcc_2um_pertile"].shape == (5, 4)
    np.testing.assert_allclose(per_tile["pcc_2um_pertile"], M.pearson_per_tile(rate, counts, mask).numpy())
    assert set(per_tile) >= {"pcc_4um_pertile", "scc_2um_pertile", "ssim_2um"}


@pytest.mark.parametrize(
    "change, fault",
    [
        (lambda p, t, m: (p, t[:, :2], m), "target shape"),
        (lambda p, t, m: (p, t, m[:, :8]), "mask shape"),
        (lambda p, t, m: (p[:, :, :6, :6], t[:, :, :6, :6], m[:, :6, :6]), "divisible"),
        (lambda p, t, m: (p.fill_(float("nan")), t, m), "NaN"),
        (lambda p, t, m: (p, -t - 1, m), "negative"),
        (lambda p, t, m: (p[:, :3], t[:, :3], m), "3 genes"),
    ],
)
def test_bad_batches_raise_one_line_input_error(change, fault):
    rate, counts, mask = batch(13)
    gm = M.GeneMetrics(4, source="results/models/E/test-P1/predictions.zarr")
    with pytest.raises(InputError, match=fault) as err:
        gm.update(*change(rate, counts, mask))
    assert str(err.value).startswith("results/models/E/test-P1/predictions.zarr: ")
    assert "\n" not in str(err.value)


def test_shared_count_side_changes_no_number():
    """A model and its null sharing the count side (per batch and the pooled Spearman's counts) score as if alone."""
    rate, counts, mask = batch(14, t=6, g=3, h=16, w=16)
    partner = rate[torch.tensor([3, 0, 5, 1, 2, 4])]
    alone_model, alone_null = M.GeneMetrics(3), M.GeneMetrics(3)
    model = M.GeneMetrics(3, keep_sums=True)
    null = M.GeneMetrics(3, counts_of=model)
    for t0 in (0, 2, 4):
        s = slice(t0, t0 + 2)
        alone_model.update(rate[s], counts[s], mask[s])
        alone_null.update(partner[s], counts[s], mask[s])
        shared = {}
        model.update(rate[s], counts[s], mask[s], shared)
        null.update(partner[s], counts[s], mask[s], shared)
    assert model.table().equals(alone_model.table())
    assert null.table().equals(alone_null.table())
    assert not model.table().equals(null.table())
    sums = model.tile_sums()[1].sum(0)  # the per-tile sums add up to the pooled Pearson
    constant = np.zeros(3, dtype=bool)
    np.testing.assert_allclose(M.pearson_from_sums(sums[:, :6], constant), model.table()["pcc_2um_pooled"], atol=1e-12)


def test_long_rows_ranks_match_rankdata():
    from sparsitytrap.metrics.kernels import rank_1d

    rng = np.random.default_rng(9)
    special = [0.0, -0.0, -2.5, float("inf"), float("-inf"), 5e-324, -1e300]
    n = 5000  # several radix passes of 11 bits over 64 varying bits
    x = np.concatenate([rng.lognormal(-3, 2, size=(3, n)) * rng.choice([-1, 1], (3, n)), [special] * 3], 1)
    x[:, : n // 2] = np.round(x[:, : n // 2], 1)  # ties
    with np.errstate(over="ignore"):  # -1e300 becomes -inf in float32
        x32 = x.astype(np.float32)
    for a in (x, x32, x[0]):
        got = M.average_ranks(a)  # arrays in, arrays out (tensors in, tensors out)
        assert isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, ss.rankdata(a, axis=-1), err_msg=str(a.dtype))
    pooled = rng.poisson(0.05, 200_000).astype(np.float64)  # a pooled gene's counts: counted
    np.testing.assert_array_equal(rank_1d(pooled), ss.rankdata(pooled))


def test_values_off_tissue_change_no_number():
    """Only tissue bins are scored: NaN or infinite predictions and any counts off tissue are ignored."""
    rate, counts, mask = batch(15, t=4, g=3, h=16, w=16)
    mask[2] = False  # a tile without tissue: its per-tile scores are undefined, the rest unchanged
    clean = M.evaluate_stream([(rate, counts, mask)], 3)
    off = ~mask[:, None].expand_as(rate)
    dirty_rate = rate.masked_fill(off, float("nan"))
    dirty_rate[0, 0, ~mask[0]] = float("inf")
    dirty_counts = counts.masked_fill(off, 7)
    dirty = M.evaluate_stream([(dirty_rate, dirty_counts, mask)], 3)
    assert dirty.equals(clean)
    assert np.isnan(M.pearson_per_tile(rate, counts, mask).numpy()[2]).all()


def test_pooling_factors_must_be_powers_of_two():
    with pytest.raises(InputError, match="scales: pooling factors must be powers of two"):
        M.GeneMetrics(3, scales=(1, 3))


def test_kernels_compile_for_the_workflow_dtypes():
    from sparsitytrap.metrics.__main__ import compile_kernels

    assert compile_kernels() > 0


_EXERCISE = """
import sys
import numpy as np
from sparsitytrap.metrics.__main__ import exercise
out = exercise()
np.savez(sys.argv[1], numba=np.array("numba" in sys.modules), **out)
"""


def _exercise(tmp_path, kernels):
    env = {**os.environ, compiled.ENV: kernels}
    subprocess.run([sys.executable, "-c", _EXERCISE, str(tmp_path / f"{kernels}.npz")], env=env, check=True)
    return dict(np.load(tmp_path / f"{kernels}.npz"))


def test_ahead_of_time_kernels_give_the_jit_numbers_without_numba(tmp_path):
    """What install builds serves every kind of batch the workflow scores, and numba is never imported."""
    assert compiled._aot_module() is not None, "no ahead-of-time kernels for this kernels.py: make install"
    aot, jit = _exercise(tmp_path, "aot"), _exercise(tmp_path, "jit")
    assert not aot.pop("numba") and jit.pop("numba")
    assert aot.keys() == jit.keys()
    for name in aot:
        np.testing.assert_array_equal(aot[name], jit[name], err_msg=name)


def test_a_call_of_other_types_goes_to_the_jit_kernel():
    x = np.arange(2 * 3 * 4 * 4, dtype=np.int16).reshape(2, 3, 4, 4)  # int16: no export
    mask = np.ones((2, 4, 4), bool)
    key = tuple(compiled._key(a) for a in (x, mask))
    assert compiled.halve._resolved.get(key) is None
    got, pooled_mask = compiled.halve(x, mask)
    assert compiled.halve._resolved[key] is compiled.halve.jit()
    np.testing.assert_array_equal(got, x.reshape(2, 3, 2, 2, 2, 2).sum(axis=(3, 5)))
    assert pooled_mask.all()


def test_argument_keys_are_as_fine_as_numba_types():
    """Two arguments of one key always have one numba type (a wrong export would crash the process)."""
    import numba

    base = np.zeros((4, 6))
    readonly = base.copy()
    readonly.flags.writeable = False
    unaligned = np.frombuffer(np.zeros(8 * 24 + 1, np.uint8)[1:].tobytes(), np.float64).reshape(4, 6)
    values = [base, base.T, base[:, ::2], readonly, unaligned, base.astype(np.float32), base[0], base[None],
              np.zeros(3, bool), 3, 2**63, True, 1.5, np.float32(1.5), np.int64(3),
              (base, base[0]), (base, base.T)]  # fmt: skip
    keys = {}
    for v in values:
        keys.setdefault(compiled._key(v), set()).add(numba.typeof(v))
    assert all(len(types) == 1 for types in keys.values()), keys
    assert len(keys) == len(values) - 1  # 3 and np.int64(3) differ in class only; all others differ in type


def test_ahead_of_time_kernels_are_not_used_after_kernels_py_changes(tmp_path, monkeypatch):
    edited = tmp_path / "kernels.py"
    edited.write_text(compiled._SOURCE.read_text() + "\n# an edit\n")
    tag = compiled.build_tag()
    monkeypatch.setattr(compiled, "_SOURCE", edited)
    compiled.reset()
    try:
        assert compiled.build_tag() != tag
        assert compiled._aot_module() is None
    finally:
        monkeypatch.undo()
        compiled.reset()


def test_a_failed_check_leaves_no_module(tmp_path, monkeypatch):
    from sparsitytrap.metrics import __main__ as build

    with compiled.recording() as calls:
        reference = build.exercise()
    monkeypatch.setattr(build, "check", lambda ref: 1.0)  # the built module's numbers are off
    monkeypatch.setattr(compiled, "__file__", str(tmp_path / "compiled.py"))
    with pytest.raises(RuntimeError, match="numbers differ from the JIT kernels"):
        build.build_ahead_of_time({k: calls[k] for k in sorted(calls, key=repr)[:2]}, reference)
    assert list(tmp_path.iterdir()) == []
