"""The simulator: determinism, Poisson counts around the known rates, diffusion, truth, sparsity,
pixel frame, and the Space Ranger folder as spatialdata-io reads it."""

import json
import shutil
import subprocess
import sys
import warnings

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tifffile
import zarr

from sparsitytrap import simulate
from sparsitytrap.errors import InputError
from sparsitytrap.simulate import morphology
from sparsitytrap.stores import truth as truth_store

SMALL = {"seed": 7, "n_rows": 136, "n_cols": 128, "capture_efficiency": 1.1}


def _read_matrix(outs, bin_um=2):
    """Counts (CSR bins x genes), barcodes and gene names of a filtered_feature_bc_matrix.h5."""
    with h5py.File(outs / f"binned_outputs/square_{bin_um:03d}um/filtered_feature_bc_matrix.h5") as f:
        m = f["matrix"]
        n_genes, n_bins = m["shape"][:]
        X = sp.csc_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), shape=(n_genes, n_bins)).T.tocsr()
        return X, m["barcodes"][:].astype(str), m["features/name"][:].astype(str)


def _bin_index(barcodes):
    """(array_row, array_col) from barcodes s_002um_RRRRR_CCCCC-1."""
    return np.array([int(b[8:13]) for b in barcodes]), np.array([int(b[14:19]) for b in barcodes])


@pytest.fixture(scope="module")
def patient(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim") / "P9"
    simulate.simulate_patient(root, "P9", SMALL)
    return root


def test_layout_and_params(patient):
    outs = patient / "outs"
    for rel in (
        "P9_feature_slice.h5",
        "P9_tissue_image.tif",
        "spatial/tissue_hires_image.png",
        "binned_outputs/square_008um/spatial/tissue_positions.parquet",
    ):
        assert (outs / rel).is_file(), rel
    doc = json.loads((patient / "params.json").read_text())
    p = doc["params"]
    assert p["seed"] == 7 and p["n_rows"] == 136 and p["capture_efficiency"] == 1.1
    assert p["rotation_deg"] is not None and p["pixel_jitter"] is not None  # resolved, not left open
    assert doc["derived"]["n_genes"] == len(simulate.read_gene_table())
    assert not list(patient.glob(".*"))  # no temporary leftovers


def test_same_params_same_outputs(patient, tmp_path):
    again = tmp_path / "P9"
    simulate.simulate_patient(again, "P9", SMALL)
    for bin_um in (2, 16):
        X1, b1, _ = _read_matrix(patient / "outs", bin_um)
        X2, b2, _ = _read_matrix(again / "outs", bin_um)
        assert X1.data.tobytes() == X2.data.tobytes() and X1.indices.tobytes() == X2.indices.tobytes()
        assert X1.indptr.tobytes() == X2.indptr.tobytes() and (b1 == b2).all()
    assert (
        tifffile.imread(patient / "outs/P9_tissue_image.tif") == tifffile.imread(again / "outs/P9_tissue_image.tif")
    ).all()
    t1, t2 = zarr.open_group(patient / "truth.zarr", mode="r"), zarr.open_group(again / "truth.zarr", mode="r")
    assert (t1["programmes_diffused"][:] == t2["programmes_diffused"][:]).all()
    assert (patient / "params.json").read_bytes() == (again / "params.json").read_bytes()
    other = simulate.resolve_params({**SMALL, "seed": 8})
    assert other["rotation_deg"] != simulate.resolve_params(SMALL)["rotation_deg"]


def test_counts_are_poisson_around_truth(patient):
    X, barcodes, genes = _read_matrix(patient / "outs")
    rows, cols = _bin_index(barcodes)
    mu = simulate.truth_rate(patient / "truth.zarr", list(genes), with_efficiency=True)  # [G, rows, cols]
    mu = mu[:, rows, cols].T.astype(np.float64)  # [bins, G], the in-tissue bins of the matrix
    y = X.toarray().astype(np.float64)
    # Totals per gene within 5 SE (Poisson: SE = sqrt(mean)); the whole table within 3 SE.
    z = (y.sum(0) - mu.sum(0)) / np.sqrt(mu.sum(0))
    assert np.abs(z).max() < 5, np.abs(z).max()
    assert abs(y.sum() - mu.sum()) < 3 * np.sqrt(mu.sum())
    # Variance equals the mean (Pearson dispersion ~ 1), and counts follow the rate, bin by bin.
    dispersion = ((y - mu) ** 2 / mu).sum() / y.size
    assert 0.97 < dispersion < 1.03, dispersion
    hk = list(genes).index("ACTB")
    assert np.corrcoef(y[:, hk], mu[:, hk])[0, 1] > 0.1


def test_counts_do_not_depend_on_block_size():
    rng = np.random.default_rng(0)
    prog = rng.gamma(0.5, 0.5, (3, 20, 30)).astype(np.float32)
    load = rng.gamma(0.5, 0.2, (3, 40)).astype(np.float32)
    a = simulate.sample_counts(prog, load, 1.3, seed=5, block_rows=32)
    b = simulate.sample_counts(prog, load, 1.3, seed=5, block_rows=7)
    assert (a != b).nnz == 0 and a.dtype == np.int32 and a.shape == (600, 40)
    assert (simulate.sample_counts(prog, load, 1.3, seed=6) != a).nnz > 0
    # Exact expectation check on this small case: mean count per (bin, gene) over the block.
    mu = 1.3 * np.tensordot(load.T, prog, axes=(1, 0)).reshape(40, -1).T
    assert abs(a.sum() - mu.sum()) < 4 * np.sqrt(mu.sum())


def test_diffusion_conserves_and_truth_matches(patient):
    k = simulate.diffusion_kernel(2.0, sigma_um=3.0, tail_weight=0.1, tail_um=10.0)
    assert k.shape[0] % 2 == 1 and abs(k.sum() - 1) < 1e-5 and np.allclose(k, k.T) and np.allclose(k, k[::-1])
    root = zarr.open_group(patient / "truth.zarr", mode="r")
    und, dif = root["programmes_undiffused"][:], root["programmes_diffused"][:]
    assert und.shape == dif.shape == (len(simulate.PROGRAMMES), 136, 128)
    # Diffusion only moves rate around: on a grid padded by the kernel's reach nothing is lost,
    # and on the stored grid only what crosses its edge.
    h = k.shape[0] // 2
    padded = np.pad(und, ((0, 0), (h, h), (h, h)))
    np.testing.assert_allclose(simulate.diffuse(padded, k).sum(axis=(1, 2)), und.sum(axis=(1, 2)), rtol=1e-4)
    assert (dif.sum(axis=(1, 2)) <= und.sum(axis=(1, 2)) * (1 + 1e-4)).all()
    stored = simulate.diffuse(und, k)
    np.testing.assert_array_equal(stored, dif)
    assert (dif > 0).sum() > (und > 0).sum() and dif.max() < und.max()  # it spreads and flattens
    # Dense truth arrays are the factored form, and truth_rate reads any window of it.
    genes = ["MT-ATP6", "PIGR", "COL1A1"]
    idx = [list(root.attrs["gene_names"]).index(g) for g in genes]
    win = simulate.truth_rate(patient / "truth.zarr", genes, rows=slice(40, 90), cols=slice(30, 100))
    np.testing.assert_allclose(win, root["rate_diffused"][idx, 40:90, 30:100], rtol=1e-5, atol=1e-8)
    raw = simulate.truth_rate(patient / "truth.zarr", [idx[1]], diffused=False)
    np.testing.assert_allclose(
        raw[0], np.tensordot(root["loadings"][:, idx[1]], und, axes=(0, 0)), rtol=1e-5, atol=1e-8
    )
    with pytest.raises(InputError, match="NOTAGENE"):
        simulate.truth_rate(patient / "truth.zarr", ["NOTAGENE"])


def test_truth_store_checks_and_reads_factored(patient, tmp_path):
    """stores.truth alone reads the truth: it refuses a store missing an array, and its rates are
    the programmes x loadings product (also for a tile hanging over the grid's edge)."""
    root = truth_store.open_truth(patient / "truth.zarr")
    load = root[truth_store.LOADINGS][:]
    dif = root[truth_store.PROGRAMMES_DIFFUSED][:]
    eff = root.attrs[truth_store.ATTR_CAPTURE_EFFICIENCY]
    genes = ["ACTB", "PIGR"]
    idx = [list(root.attrs[truth_store.ATTR_GENE_NAMES]).index(g) for g in genes]
    rate = truth_store.truth_rate(patient / "truth.zarr", genes, rows=slice(10, 50), cols=slice(20, 60))
    np.testing.assert_allclose(rate, np.tensordot(load[:, idx].T, dif[:, 10:50, 20:60], axes=(1, 0)), rtol=1e-6)
    assert simulate.truth_rate is truth_store.truth_rate  # the old import path is the same function
    # A tile over the top and right edges (rows -8..55, cols 100..163 of a 136 x 128 grid):
    # expected counts inside, zeros outside.
    win = truth_store.truth_window(patient / "truth.zarr", genes, (-8, 100), 64)
    assert win.shape == (2, 64, 64) and not win[:, :8].any() and not win[:, :, 28:].any()
    inside = eff * np.tensordot(load[:, idx].T, dif[:, :56, 100:], axes=(1, 0))
    np.testing.assert_allclose(win[:, 8:, :28], inside, rtol=1e-6)

    broken = tmp_path / "truth.zarr"
    shutil.copytree(patient / "truth.zarr", broken)
    shutil.rmtree(broken / truth_store.LOADINGS)
    # the manifest sees the lost array first; without it the store's own check still would
    with pytest.raises(InputError, match=r"truth\.zarr \(array 'loadings'\): .* missing"):
        truth_store.open_truth(broken)
    with pytest.raises(InputError, match="array 'loadings'"):
        truth_store.truth_rate(broken, genes)
    (broken / "manifest.json").unlink()
    from sparsitytrap.stores import manifest

    manifest.write(broken)
    with pytest.raises(InputError, match=r"truth\.zarr: truth store has no array 'loadings'"):
        truth_store.open_truth(broken)
    with pytest.raises(InputError, match="does not exist"):
        truth_store.open_truth(tmp_path / "missing.zarr")


def test_truth_store_does_not_load_the_simulator():
    """Readers of truth.zarr (evaluate) must not pay for the simulator's imports."""
    heavy = "'sparsitytrap.simulate', 'scipy.signal', 'scipy.ndimage'"
    code = f"import sys, sparsitytrap.stores.truth; print([m for m in ({heavy}) if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]", out


def test_image_follows_the_geometry(patient):
    """Background bins map to white pixels, tissue bins to stained ones, through bin_to_pixel."""
    doc = json.loads((patient / "params.json").read_text())
    A = np.array(doc["derived"]["bin_to_pixel"])
    ppb = np.hypot(A[0, 0], A[1, 0])
    assert abs(ppb - round(ppb)) > 0.05 and abs(A[0, 0]) > 1e-3  # non-integer px per bin, rotated
    image = tifffile.imread(patient / "outs/P9_tissue_image.tif")
    assert image.shape[:2] == tuple(doc["derived"]["fullres_shape"]) and image.dtype == np.uint8
    comp = zarr.open_group(patient / "truth.zarr", mode="r")["compartments"][:]
    frac_bg = (comp == morphology.BACKGROUND).reshape(136, 2, 128, 2).mean(axis=(1, 3))
    r, c = np.mgrid[0:136, 0:128]
    x, y = A @ np.stack([r.ravel(), c.ravel(), np.ones(r.size)])
    green = image[np.rint(y).astype(int), np.rint(x).astype(int), 1].astype(float)  # both stains absorb green
    assert np.percentile(green[frac_bg.ravel() == 1], 1) > 225  # background is white
    assert np.median(green[frac_bg.ravel() == 0]) < 210  # tissue is stained
    lumen = (comp == morphology.LUMEN).reshape(136, 2, 128, 2).mean(axis=(1, 3)).ravel() == 1
    epi = (comp == morphology.EPITHELIUM).reshape(136, 2, 128, 2).mean(axis=(1, 3)).ravel() == 1
    if lumen.sum() > 5 and epi.sum() > 5:
        assert green[lumen].mean() > green[epi].mean() + 30  # lumens are pale, epithelium is not


def test_spatialdata_io_reads_the_folder(patient):
    from spatialdata_io import visium_hd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = visium_hd(patient / "outs", dataset_id="P9", load_segmentations_only=False)
    assert {"square_002um", "square_008um", "square_016um"} <= set(sdata.tables)
    X, _, genes = _read_matrix(patient / "outs")
    t2 = sdata.tables["square_002um"]
    assert t2.n_obs == X.shape[0] and list(t2.var_names) == list(genes)
    assert t2.X.sum() == X.sum() > 0
    for name in ("square_008um", "square_016um"):  # sum-pooled: coarse tissue bins hold every 2 um count
        assert sdata.tables[name].X.sum() >= X.sum()
    assert "P9_full_image" in sdata.images


def test_sparsity_like_the_seeds():
    """A demo-sized patient at efficiency 1: per-gene zero fractions and the seeds' least sparse."""
    p = simulate.resolve_params({"seed": 202, "n_rows": 448, "n_cols": 448})
    tissue, _, frac = morphology.generate_tissue(448, 448, 2.0, p["seed"], p["morphology"])
    und = simulate.programme_fields(frac, tissue.cell_counts(448, 448, 2.0), 2.0)
    dif = simulate.diffuse(und, simulate.diffusion_kernel(2.0, **p["diffusion"]))
    names, cats, load = simulate.gene_loadings(p)
    counts = simulate.sample_counts(dif, load, 1.0, p["seed"])[(frac["background"] <= 0.5).ravel()]
    zero = 1 - np.bincount(counts.indices, minlength=len(names)) / counts.shape[0]
    table = pd.DataFrame({"gene": names, "category": cats, "zero": zero})
    assert table.zero.between(0.75, 0.997).all(), table.loc[~table.zero.between(0.75, 0.997)]
    assert 0.93 <= table.zero.mean() <= 0.97, table.zero.mean()
    seeds = table.gene.isin(simulate.SEED_GENES)
    assert table.groupby("category").zero.mean().idxmin() == "Mitochondrial"
    by_cat = table[seeds].groupby("category").zero.mean()  # among the seeds: mito and housekeeping least sparse
    assert by_cat[["Mitochondrial", "Housekeeping"]].max() < by_cat.drop(["Mitochondrial", "Housekeeping"]).min()
    assert 0.88 < table.zero[seeds].mean() < 0.96  # the seeds' 50 genes: 3.4 %-6.1 % non-zero
    var = np.asarray(counts.multiply(counts).mean(0)).ravel() - np.asarray(counts.mean(0)).ravel() ** 2
    top50 = set(np.array(names)[np.argsort(-var)[:50]])
    assert len(top50 & set(simulate.SEED_GENES)) >= 40  # variance selection finds mostly the seeds


def test_full_preset_pads_genes():
    p = simulate.resolve_params({"preset": "full", "n_rows": 64, "n_cols": 64})
    assert p["n_genes"] == 18000
    names, cats, load = simulate.gene_loadings(p)
    assert len(names) == load.shape[1] == 18000 and names[-1] == "SIMG17704" and cats[-1] == "Simulated"
    n_table = len(simulate.read_gene_table())
    assert (load[:, n_table:].sum(0) < load[:, :n_table].sum(0).min()).mean() > 0.9  # padding genes are low
    assert simulate.resolve_params({"preset": "full"})["n_rows"] == 3250


def test_cohort_and_bad_input(tmp_path):
    cohort = simulate.cohort_params()
    assert list(cohort) == ["P1", "P2", "P3"]
    assert len({c["seed"] for c in cohort.values()}) == 3
    assert sorted(c["capture_efficiency"] for c in cohort.values()) == [0.8, 1.0, 1.25]
    with pytest.raises(InputError, match="params.n_row"):
        simulate.resolve_params({"n_row": 10})
    with pytest.raises(InputError, match="params.capture_efficiency"):
        simulate.resolve_params({"capture_efficiency": 0})
    with pytest.raises(InputError, match="preset"):
        simulate.resolve_params({"preset": "huge"})
    bad = tmp_path / "genes.tsv"
    bad.write_text("gene\tcategory\tprogramme\nACTB\tHousekeeping\tnot_a_programme\n")
    with pytest.raises(InputError, match="genes.tsv.*not_a_programme"):
        simulate.read_gene_table(bad)
    with pytest.raises(InputError, match="does not exist"):
        simulate.read_gene_table(tmp_path / "missing.tsv")
