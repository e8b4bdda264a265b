"""Diffusion correction (seed 003): the grid solver against POT, the three seed faults, scale
(chunked = un-chunked), bad input, the store, and validation on a simulated patient.

Tolerances are stated where they are used: float64 agreement with POT to 1e-9 of the plan's
largest entry; float32 chunked vs un-chunked to 1e-3 (relative L1) with the default halo.
"""

import shutil

import numpy as np
import pytest
import torch
from scipy import ndimage

from sparsitytrap.diffusion import (
    DEFAULTS,
    check_settings,
    correct_arrays,
    correct_sample,
    estimate_diffusion_length,
    figure_methods,
    open_corrected,
    read_gene_grids,
    read_window,
    validate_against_truth,
)
from sparsitytrap.diffusion.correct import fit_windows
from sparsitytrap.diffusion.inputs import arrays_input
from sparsitytrap.diffusion.model import DiffusionModel, smooth_quantile, window_loss
from sparsitytrap.diffusion.sinkhorn import dense_cost, dense_plan, sinkhorn_grid
from sparsitytrap.errors import InputError

FAST = {"fit_windows": 2, "fit_window_bins": 16, "fit_steps": 3, "window_bins": 32, "diffusion_length_um": 3.0}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared machine, OpenMP threads spin-waiting for a busy core cost 100x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _no_output(path):
    return not path.exists() and not list(path.parent.glob(f".{path.name}.tmp-*"))


@pytest.fixture(scope="module")
def synthetic():
    """96 x 96 bins: a tissue disc, three genes with different patterns, blurred (sd 1.5 bins), Poisson."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    tissue = (yy - 48) ** 2 + (xx - 48) ** 2 < 40**2
    rate = (
        np.stack(
            [
                (np.sin(xx / 6) > 0) * 2.0,
                ((yy // 12 + xx // 12) % 2) * 1.0,
                np.exp(-((yy - 30) ** 2 + (xx - 60) ** 2) / 200) * 5,
            ]
        )
        * tissue
    )
    counts = rng.poisson(np.stack([ndimage.gaussian_filter(r, 1.5, mode="constant") for r in rate])).astype(float)
    image = ndimage.gaussian_filter(rate[0], 1.0)
    return {"counts": counts, "tissue": tissue, "image": image, "rate": rate}


# ---------------------------------------------------------------- settings
def test_settings_defaults_and_bad_values():
    assert check_settings(None) == check_settings({}) and set(check_settings(None)) == set(DEFAULTS)
    assert check_settings({"loss_weights": {"image": 2}})["loss_weights"] == {
        "image": 2.0,
        "outside": 1.0,
        "moran": 1.0,
    }
    for bad, key in (
        ({"rhoo": 1}, "diffusion.rhoo"),
        ({"rho": -1}, "diffusion.rho"),
        ({"window_bins": 4}, "diffusion.window_bins"),
        ({"loss_weights": {"colour": 1}}, "diffusion.loss_weights.colour"),
        ({"image_channel": "eosin"}, "diffusion.image_channel"),
        ({"diffusion_length_um": 0}, "diffusion.diffusion_length_um"),
        ({"quantile_init": 1.5}, "diffusion.quantile_init"),
        ({"halo": 1.0}, "diffusion.halo"),
    ):
        with pytest.raises(InputError) as err:
            check_settings(bad)
        assert err.value.where == key and "\n" not in str(err.value)


# ---------------------------------------------------------------- the solver
def test_grid_solver_matches_pot_dense():
    """Same cost and regularisation as POT's dense unbalanced solver: plan and marginals agree to 1e-9."""
    ot = pytest.importorskip("ot")
    rng = np.random.default_rng(1)
    shape = (12, 12)
    x = rng.poisson(2.0, shape).astype(np.float64)
    tissue = np.zeros(shape)
    tissue[2:10, 1:11] = 1
    b = x / (1 + np.exp(-50 * (x - 2.5) / x.max())) + 0.1
    s, lam, eps, rho = 1 / 18.0, 0.7, 0.8, 1.3
    res = sinkhorn_grid(
        torch.tensor(x)[None],
        torch.tensor(b)[None],
        torch.tensor(tissue),
        s=s,
        lam=lam,
        eps=torch.tensor([eps], dtype=torch.float64),
        rho=rho,
        radius=12,
        n_iter=400,
    )
    M = dense_cost(shape, tissue, s, lam)
    with np.errstate(all="ignore"):
        P = ot.unbalanced.sinkhorn_unbalanced(
            x.ravel(), b.ravel(), M, eps, (float("inf"), rho), reg_type="entropy", numItermax=20000, stopThr=1e-13
        )
    ours = dense_plan(res, tissue, s, lam, [eps])
    tol = 1e-9 * P.max()
    assert np.abs(ours - P).max() < tol
    np.testing.assert_allclose(res.p[0].numpy().ravel(), P.sum(axis=0), atol=tol * P.shape[0])
    np.testing.assert_allclose(ours.sum(axis=1), x.ravel(), atol=1e-9)  # every observed count is moved


def test_cost_changes_output_unlike_balanced_transport():
    """Seed fault 1: with both marginals fixed the output is b whatever the cost; here it is not."""
    rng = np.random.default_rng(2)
    a = torch.tensor(rng.poisson(1.0, (2, 20, 20)), dtype=torch.float64)
    b = a * torch.sigmoid(50 * (a - 1.5) / a.amax()) + 0.05
    tissue = torch.ones(20, 20)
    tissue[:, 15:] = 0

    def run(s, lam, rho, sources=b, n_iter=200):
        return sinkhorn_grid(
            a, sources, tissue, s=s, lam=lam, eps=torch.ones(2, dtype=torch.float64), rho=rho, radius=8, n_iter=n_iter
        ).p

    near, far = run(0.5, 1.0, 1.0), run(0.05, 1.0, 1.0)
    assert ((near - far).abs().sum() / near.sum()) > 0.05
    assert ((run(0.05, 0.0, 1.0) - far).abs().sum() / far.sum()) > 0.01  # the tissue cost acts
    # the balanced limit (rho -> inf, b scaled to the observed mass) pins the output to b, whatever the cost
    balanced = b * a.sum((1, 2), keepdim=True) / b.sum((1, 2), keepdim=True)
    for s in (0.5, 0.05):
        pinned = run(s, 1.0, 1e9, balanced, n_iter=2000)
        assert ((pinned - balanced).abs().sum() / balanced.sum()) < 1e-3


def test_quantile_gradient_is_nonzero_and_correct_on_tied_counts():
    """Seed fault 2: 90 % zeros and integer ties; dQ/dq from autograd equals finite differences and is > 0."""
    rng = np.random.default_rng(3)
    counts = rng.poisson(0.1, (3, 2000)).astype(float)
    hists = [np.unique(c, return_counts=True) for c in counts]
    width = max(len(v) for v, _ in hists)
    values = np.stack([np.pad(v, (0, width - len(v)), mode="edge") for v, _ in hists])
    weights = np.stack([np.pad(n, (0, width - len(n))) for _, n in hists]).astype(float)
    q = torch.tensor([0.5, 0.93, 0.97], dtype=torch.float64, requires_grad=True)
    Q = smooth_quantile(q, values, weights, 0.5)
    Q.sum().backward()
    h = 1e-5
    fd = (
        smooth_quantile(q.detach() + h, values, weights, 0.5) - smooth_quantile(q.detach() - h, values, weights, 0.5)
    ) / (2 * h)
    assert (q.grad > 0).all()
    np.testing.assert_allclose(q.grad.numpy(), fd.numpy(), rtol=1e-4)


def test_gradients_reach_every_parameter(synthetic):
    settings = check_settings({**FAST, "fit_window_bins": 24, "fit_windows": 4})
    inp = arrays_input(synthetic["counts"], synthetic["tissue"], synthetic["image"])
    active = np.arange(3)
    windows = fit_windows(inp, active, 6, settings)
    model = DiffusionModel(inp.stats, [0.9, 0.9, 0.9], 3.0, settings, n_tissue_bins=int(inp.tissue.sum()))
    sum(window_loss(model, w, settings["loss_weights"])[0] for w in windows).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert (p.grad.abs() > 0).all(), name  # every gene's eps and q, and s and lam


# ---------------------------------------------------------------- behaviour on grids
def test_counts_are_conserved_up_to_the_removed_mass(synthetic):
    out, report = correct_arrays(synthetic["counts"], synthetic["tissue"], synthetic["image"], settings=FAST)
    observed = synthetic["counts"].sum(axis=(1, 2))
    for g, gene in enumerate(report["genes"]):
        removed = report["removed_mass"][gene]
        assert abs(out[g].sum() + removed - observed[g]) < 1e-3 * observed[g]  # chunking error only
        assert 0 < removed < 0.1 * observed[g]
    assert (out[:, ~synthetic["tissue"]] == 0).all()  # what the plan leaves outside the tissue is removed


def test_zero_diffusion_input_is_left_unchanged(synthetic):
    """Counts of an undiffused field, diffusion length far below a bin: unchanged to 1e-5 (L1, float32)."""
    counts = np.random.default_rng(4).poisson(synthetic["rate"]).astype(float)
    out, report = correct_arrays(counts, synthetic["tissue"], settings={**FAST, "diffusion_length_um": 0.1})
    assert np.abs(out - counts).sum() / counts.sum() < 1e-5
    assert sum(report["removed_mass"].values()) == 0


def test_point_source_is_sharpened():
    """A point blurred by a Gaussian (sd 3 um): sources above the 99th percentile pull the mass back.

    With the seed's default (q at the Moran's I maximum, here 'keep all counts') and the
    background prior, the same input is smoothed instead: Moran's I prefers smooth fields.
    """
    n, c = 41, 20
    point = np.zeros((n, n))
    point[c, c] = 2000
    blurred = ndimage.gaussian_filter(point, 1.5, mode="constant", truncate=4)
    r2 = (np.arange(n)[:, None] - c) ** 2 + (np.arange(n)[None, :] - c) ** 2

    def spread(f):
        return (f * r2).sum() / f.sum()

    settings = {**FAST, "fit_steps": 0, "quantile_init": 0.99, "source_floor": 0.0}
    sharp, _ = correct_arrays(blurred[None], np.ones((n, n), bool), settings=settings)
    assert spread(sharp[0]) < 0.7 * spread(blurred) and sharp[0, c, c] > 1.1 * blurred[c, c]
    smooth, _ = correct_arrays(blurred[None], np.ones((n, n), bool), settings={**FAST, "fit_steps": 0})
    assert spread(smooth[0]) > spread(blurred)


def test_image_term_changes_the_result(synthetic):
    """Seed fault 3: another H&E gives other fitted parameters and another field; weight 0 ignores it."""
    other = np.ascontiguousarray(synthetic["image"].T)
    args = (synthetic["counts"], synthetic["tissue"])
    a, ra = correct_arrays(*args, synthetic["image"], settings=FAST)
    b, rb = correct_arrays(*args, other, settings=FAST)
    assert np.abs(a - b).sum() / a.sum() > 2e-5  # measured 1.9e-4 after 3 steps; float32 noise is ~1e-7
    assert ra["fitted"]["genes"]["G0"]["eps"] != rb["fitted"]["genes"]["G0"]["eps"]
    off = {**FAST, "loss_weights": {"image": 0.0}}
    assert np.array_equal(
        correct_arrays(*args, synthetic["image"], settings=off)[0], correct_arrays(*args, other, settings=off)[0]
    )


def test_chunked_equals_unchunked_and_is_deterministic(synthetic):
    """Windows of 32 bins with the default halo (6 diffusion lengths) vs one window: 1e-3 relative L1."""
    args = (synthetic["counts"], synthetic["tissue"], synthetic["image"])
    chunked, rc = correct_arrays(*args, settings=FAST)
    whole, rw = correct_arrays(*args, settings={**FAST, "window_bins": 256})
    assert rc["fitted"] == rw["fitted"]  # fitting does not depend on the windows
    assert np.abs(chunked - whole).sum() / whole.sum() < 1e-3
    assert np.abs(chunked - whole).max() < 2e-3 * whole.max()
    assert np.array_equal(chunked, correct_arrays(*args, settings=FAST)[0])


def test_empty_gene_passes_through(synthetic):
    counts = synthetic["counts"].copy()
    counts[1] = 0
    out, report = correct_arrays(counts, synthetic["tissue"], synthetic["image"], settings=FAST)
    assert report["empty_genes"] == ["G1"] and not out[1].any()
    assert out[0].any() and report["fitted"]["genes"]["G1"] == {}


def test_estimate_diffusion_length():
    """A uniform disc blurred by sd 3 um: estimated within 15 %, from both sides or inside only; no blur: error."""
    yy, xx = np.mgrid[:128, :128]
    tissue = (yy - 64) ** 2 + (xx - 64) ** 2 < 45**2
    rng = np.random.default_rng(5)
    counts = rng.poisson(ndimage.gaussian_filter(3.0 * tissue, 1.5, mode="constant"))
    both = estimate_diffusion_length(counts, tissue)["diffusion_length_um"]
    inside = estimate_diffusion_length(counts * tissue, tissue, tissue)["diffusion_length_um"]
    assert abs(both - 3.0) < 0.45 and abs(inside - 3.0) < 0.45, (both, inside)
    with pytest.raises(InputError, match="diffusion_length_um"):
        estimate_diffusion_length(rng.poisson(3.0 * tissue), tissue, where="S1")


# ---------------------------------------------------------------- an ingested sample: bad input
def test_bad_samples_fail_with_one_line_and_no_output(sdata_zarr, hd_sample, tmp_path, monkeypatch):
    out = tmp_path / "corrected.zarr"
    genes = hd_sample.gene_names[:3]
    # random counts with no spatial blur: the diffusion length cannot be estimated
    with pytest.raises(InputError, match="diffusion length cannot be estimated.*diffusion_length_um"):
        correct_sample(sdata_zarr, genes, out)
    assert _no_output(out)
    with pytest.raises(InputError, match="NOPE"):
        correct_sample(sdata_zarr, [*genes, "NOPE"], out, settings=FAST)
    assert _no_output(out)
    # an image that does not cover the tissue
    import sparsitytrap.tile as tile

    full = tile._full_image
    monkeypatch.setattr(tile, "_full_image", lambda s, d: [(a[:, :200, :200], sy, sx) for a, sy, sx in full(s, d)])
    with pytest.raises(InputError, match="does not cover the tissue"):
        correct_sample(sdata_zarr, genes, out, settings=FAST)
    monkeypatch.undo()
    assert _no_output(out)
    # no tissue bin
    import zarr

    bare = tmp_path / "bare.zarr"
    shutil.copytree(sdata_zarr, bare)
    from sparsitytrap.stores import manifest

    with zarr.config.set({"array.write_empty_chunks": True}):  # all-zero chunks must still be written
        flags = zarr.open_array(bare / "tables" / "square_002um" / "obs" / "in_tissue", mode="r+")
        flags[:] = 0
    manifest.write(bare)  # a store that says it holds no tissue, not a damaged one
    with pytest.raises(InputError, match="no bin is in tissue") as err:
        correct_sample(bare, genes, out, settings=FAST)
    assert "T1" in str(err.value) and "\n" not in str(err.value)
    assert _no_output(out)


# ---------------------------------------------------------------- a simulated patient
GENES = [
    "ACTB",
    "CEACAM5",
    "COL1A1",
    "DES",
    "EPCAM",
    "IGHA1",
    "JCHAIN",
    "LCN2",
    "MT-CO2",
    "PIGR",
    "TAGLN",
    "VIM",
]


@pytest.fixture(scope="module")
def patient(tmp_path_factory):
    from sparsitytrap.ingest import ingest
    from sparsitytrap.simulate import simulate_patient

    root = tmp_path_factory.mktemp("diffusion") / "PD"
    simulate_patient(root, "PD", {"seed": 3, "n_rows": 192, "n_cols": 192})
    sdata = ingest(root / "outs", "PD", root / "PD.zarr")
    corrected = root / "corrected.zarr"
    report = correct_sample(sdata, GENES, corrected)
    return {"root": root, "sdata": sdata, "corrected": corrected, "truth": root / "truth.zarr", "report": report}


def test_sample_report_and_store(patient):
    import anndata as ad
    import zarr

    report, store = patient["report"], open_corrected(patient["corrected"])
    table = zarr.open_group(patient["sdata"] / "tables" / "square_002um", mode="r")
    X = ad.io.read_elem(table["X"]).tocsc()
    names = list(ad.io.read_elem(table["var"]).index)
    for gene in GENES:
        observed = X[:, names.index(gene)].sum()
        assert report["observed_mass"][gene] == observed
        assert abs(report["corrected_mass"][gene] + report["removed_mass"][gene] - observed) < 1e-4 * observed
    assert store.genes == GENES and store.attrs["removed_mass"] == pytest.approx(report["removed_mass"])
    assert set(store.attrs["fitted"]["genes"]) == set(GENES) and store.attrs["diffusion_length_um"] > 0
    grids = read_gene_grids(store, GENES)
    np.testing.assert_allclose(grids.sum(axis=(1, 2)), [report["corrected_mass"][g] for g in GENES], rtol=1e-5)
    np.testing.assert_array_equal(read_window(store, 40, 30, 50, 70), grids[:, 40:90, 30:100])
    assert read_window(store, -10, -10, 5, 5).shape == (len(GENES), 5, 5)
    assert sorted(store.root["obs_index"][:]) == list(range(X.shape[0]))
    nnz = store.root["data"].shape[0]
    assert nnz <= store.n_bins * len(GENES) and store.root["data"].dtype == np.float32
    broken = patient["root"] / "broken.zarr"
    shutil.copytree(patient["corrected"], broken)
    root = zarr.open_group(broken, mode="r+")
    del root.attrs["removed_mass"]
    with pytest.raises(InputError, match="removed_mass"):
        open_corrected(broken)


def test_ot_improves_on_raw_against_the_undiffused_truth(patient, tmp_path):
    df = validate_against_truth(patient["sdata"], patient["corrected"], patient["truth"], GENES)
    assert len(df) == len(GENES) * 5 and set(df["method"]) == {"raw", "raw_blurred", "rl_estimated", "rl_true", "ot"}
    ot = df[df["method"] == "ot"].set_index("gene")
    raw = df[df["method"] == "raw"].set_index("gene")
    for scale in ("2um", "8um"):
        better = (ot[f"pearson_{scale}"] > raw[f"pearson_{scale}"]).mean()
        assert better >= 0.75, (scale, better)  # measured: every gene at both scales
        assert (ot[f"worse_than_raw_{scale}"] == (ot[f"pearson_{scale}"] < raw[f"pearson_{scale}"])).all()
    assert (ot["frac_outside_tissue"] == 0).all() and (ot["removed_fraction"] > 0).all()
    estimated, true = df["diffusion_length_estimated_um"].iloc[0], df["diffusion_length_true_um"].iloc[0]
    assert 2.0 < true < 4.5 and 2.0 < estimated < 7.0
    fig = figure_methods(patient["sdata"], patient["corrected"], patient["truth"], tmp_path / "fig", genes=GENES[:2])
    assert (tmp_path / "fig.png").stat().st_size > 0 and len(fig.axes) == 8
