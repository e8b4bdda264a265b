"""Streamed evaluation on tiny synthetic tile and prediction stores."""

import json

import numpy as np
import pandas as pd
import pytest
import zarr

from sparsitytrap.errors import InputError
from sparsitytrap.evaluate import evaluate, evaluate_ceiling
from sparsitytrap.metrics import pearson_from_sums
from sparsitytrap.stores import manifest
from sparsitytrap.stores.evaluation import range_columns, sum_columns

GENES = ["PIGR", "ACTB", "CD74"]  # deliberately not alphabetical
TB = 32  # bins per tile side (divisible by 4 for 8 um pooling, >= 7 for SSIM)


def smooth_rates(rng, n_tiles, n_genes=len(GENES), tb=TB):  # noqa: B008
    """Independent smooth random fields per (tile, gene), mean levels differing by gene."""
    base = rng.gamma(2.0, 1.0, size=(n_tiles, n_genes, tb // 4, tb // 4))
    field = np.kron(base, np.ones((4, 4)))  # blocks of 4 x 4 bins: structure at 8 um
    level = np.array([4.0, 1.0, 0.3])[:n_genes]
    return (field * level[None, :, None, None]).astype(np.float32)


def write_tiles(path, counts, mask, grid, genes=GENES):
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    t = counts.shape[0]
    g.attrs.update(
        sample="PX",
        genes=list(genes),
        tile_bins=TB,
        bin_um=2.0,
        grid_shape=[int(grid[:, 0].max()) + 1, int(grid[:, 1].max()) + 1],
    )
    g.create_array("counts", data=counts.astype(np.int32), chunks=(1, *counts.shape[1:]))
    g.create_array("mask", data=mask, chunks=(1, TB, TB))
    g.create_array("grid", data=grid.astype(np.int32))
    g.create_array("bin_origin", data=(grid * TB).astype(np.int32))
    g.create_array("images", data=np.zeros((t, 8, 8, 3), np.uint8))
    manifest.write(path)  # as every store the workflow writes
    return path


def write_pred(path, rates, genes=GENES):
    """A predictions store as :func:`sparsitytrap.predict.predict` writes it (group, array ``rates``)."""
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.create_array("rates", data=rates.astype(np.float16), chunks=(1, *rates.shape[1:]))
    g.attrs.update(genes=list(genes), sample="PX")
    manifest.write(path)
    return path


@pytest.fixture
def cohort(tmp_path):
    """8 tiles on a 3 x 3 grid with one hole; a tissue mask with a few off-tissue bins."""
    rng = np.random.default_rng(0)
    grid = np.array([(r, c) for r in range(3) for c in range(3)])[[0, 1, 2, 3, 5, 6, 7, 8]]
    rates = smooth_rates(rng, len(grid))
    counts = rng.poisson(rates)
    mask = np.ones((len(grid), TB, TB), bool)
    mask[:, :2, :3] = False
    return {"rates": rates, "counts": counts, "tiles": write_tiles(tmp_path / "tiles.zarr", counts, mask, grid)}


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """A 96 x 96-bin patient from simulate.simulate_patient (efficiency 2), cut into 3 x 3 tiles."""
    from sparsitytrap.simulate import simulate_patient, truth_rate

    root = tmp_path_factory.mktemp("sim")
    simulate_patient(root / "PX", "PX", {"seed": 5, "n_rows": 3 * TB, "n_cols": 3 * TB, "capture_efficiency": 2.0})
    truth = root / "PX" / "truth.zarr"
    grid = np.array([(r, c) for r in range(3) for c in range(3)])
    window = [(slice(r * TB, (r + 1) * TB), slice(c * TB, (c + 1) * TB)) for r, c in grid]
    expected = np.stack([truth_rate(truth, GENES, rows, cols, with_efficiency=True) for rows, cols in window])
    counts = np.random.default_rng(1).poisson(expected)  # the counts are Poisson(expected), as simulated
    tiles = write_tiles(root / "tiles.zarr", counts, np.ones((len(grid), TB, TB), bool), grid)
    return {"expected": expected, "tiles": tiles, "truth": truth}


def test_true_rate_scores_at_simulated_ceiling(simulated, tmp_path):
    pred = write_pred(tmp_path / "pred.zarr", simulated["expected"])
    table = evaluate(pred, simulated["tiles"], tmp_path / "eval", truth_zarr=simulated["truth"], bootstrap=0)
    # float16 storage of the prediction is the only difference from the ceiling's float32 truth
    for s in ("pcc_2um_pooled", "pcc_8um_pooled", "pcc_2um_pertile", "ssim_2um_pertile"):
        np.testing.assert_allclose(table[f"{s}_frac_ceiling"], 1.0, atol=2e-3, err_msg=s)
    assert (table["pcc_2um_pooled"] > 0.3).all()
    assert (table["pcc_2um_pooled_null"].abs() < 0.1).all()
    assert (table["pcc_2um_pooled_null"].abs() < table["pcc_2um_pooled"] / 3).all()
    # the ceiling is the expected count (rate x efficiency 2): calibrated up to Poisson noise
    total = table["mean_target_pooled"] * table["n_tissue_bins"]
    assert ((table["ratio_pooled_ceiling"] - 1).abs() < 4 / np.sqrt(total)).all()
    bare = write_pred(tmp_path / "bare.zarr", simulated["expected"] / 2.0)
    bare = evaluate(bare, simulated["tiles"], tmp_path / "bare", truth_zarr=simulated["truth"], bootstrap=0)
    np.testing.assert_allclose(bare["ratio_pooled"] / bare["ratio_pooled_ceiling"], 0.5, rtol=2e-3)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["protocol"]["ceiling_kind"] == "simulated truth"
    # a ceiling computed once per patient (shared by all models) gives the same table
    evaluate_ceiling(simulated["tiles"], tmp_path / "ceiling.csv", truth_zarr=simulated["truth"])
    again = evaluate(pred, simulated["tiles"], tmp_path / "again", ceiling_csv=tmp_path / "ceiling.csv", bootstrap=0)
    pd.testing.assert_frame_equal(again, table, rtol=1e-12)


def test_target_as_prediction_scores_one(cohort, tmp_path):
    pred = write_pred(tmp_path / "m" / "f" / "predictions.zarr", cohort["counts"].astype(np.float32))
    table = evaluate(pred, cohort["tiles"], tmp_path / "eval", bootstrap=50)
    for col in (
        "pcc_2um_pooled",
        "pcc_4um_pooled",
        "pcc_8um_pooled",
        "pcc_2um_pertile",
        "scc_2um_pooled",
        "ssim_2um_pertile",
        "ratio_pooled",
    ):
        np.testing.assert_allclose(table[col], 1.0, atol=1e-6, err_msg=col)
    np.testing.assert_allclose(table["deviance_pooled"], 0.0, atol=1e-9)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["model"] == "m" and summary["fold"] == "f" and summary["test_sample"] == "PX"
    assert summary["mean_over_genes"]["pcc_2um_pooled"] == pytest.approx(1.0)
    assert "derangement" in summary["protocol"]["null"] and summary["protocol"]["ceiling_kind"] == "split-half thinning"


def test_true_rate_reaches_split_half_ceiling_and_null_is_near_zero(cohort, tmp_path):
    pred = write_pred(tmp_path / "pred.zarr", cohort["rates"])
    table = evaluate(pred, cohort["tiles"], tmp_path / "eval", bootstrap=0)
    # the split-half ceiling estimates corr(true rate, counts): the true rate itself sits on it
    np.testing.assert_allclose(table["pcc_2um_pooled"], table["pcc_2um_pooled_ceiling"], atol=0.05)
    np.testing.assert_allclose(table["pcc_2um_pooled_frac_ceiling"], 1.0, atol=0.08)
    assert (table["pcc_2um_pooled"] > 0.3).all()
    assert (table["pcc_2um_pooled_null"].abs() < 0.1).all()
    assert (table["ratio_pooled"].between(0.9, 1.1)).all()
    # half-depth SSIM and deviance have no full-depth correction: no ceiling is given for them
    assert table["ssim_2um_pertile_ceiling"].isna().all() and table["deviance_pooled_ceiling"].isna().all()


def test_batch_size_does_not_change_results(cohort, tmp_path):
    pred = write_pred(tmp_path / "pred.zarr", cohort["rates"] * 1.3)
    a = evaluate(pred, cohort["tiles"], tmp_path / "b1", batch_tiles=1, bootstrap=20)
    b = evaluate(pred, cohort["tiles"], tmp_path / "b4", batch_tiles=4, bootstrap=20)
    pd.testing.assert_frame_equal(a, b, rtol=1e-9)
    pa = pd.read_parquet(tmp_path / "b1" / "per_tile.parquet")
    pb = pd.read_parquet(tmp_path / "b4" / "per_tile.parquet")
    pd.testing.assert_frame_equal(pa, pb, rtol=1e-9)
    sa, sb = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("b1", "b4"))
    assert sa["ci95"] == sb["ci95"]


def test_outputs_follow_tile_store_gene_order(cohort, tmp_path):
    pd.DataFrame({"gene": sorted(GENES), "category": ["Housekeeping", "Immune", "Secretory"]}).to_csv(
        tmp_path / "genes.csv", index=False
    )
    pred = write_pred(tmp_path / "pred.zarr", cohort["rates"])
    evaluate(pred, cohort["tiles"], tmp_path / "eval", genes_csv=tmp_path / "genes.csv", bootstrap=0)
    table = pd.read_csv(tmp_path / "eval" / "per_gene.csv")
    assert list(table["gene"]) == list(zarr.open_group(str(cohort["tiles"]), mode="r").attrs["genes"])
    assert dict(zip(table["gene"], table["category"])) == {
        "ACTB": "Housekeeping",
        "CD74": "Immune",
        "PIGR": "Secretory",
    }
    # sparsity is computed per gene from the counts in channel order
    counts, mask = cohort["counts"], np.asarray(zarr.open_group(str(cohort["tiles"]))["mask"][:])
    zeros = [(counts[:, g][mask] == 0).mean() for g in range(len(GENES))]
    np.testing.assert_allclose(table["sparsity"], zeros)
    per_tile = pd.read_parquet(tmp_path / "eval" / "per_tile.parquet")
    assert list(per_tile["gene"][: len(GENES)]) == GENES
    # per-tile sums reproduce the pooled PCC of the table
    s = per_tile[sum_columns("2um")].to_numpy().reshape(-1, len(GENES), 6)
    lo_x, hi_x, lo_y, hi_y = np.moveaxis(per_tile[range_columns("2um")].to_numpy().reshape(-1, len(GENES), 4), -1, 0)
    constant = (np.nanmin(lo_x, 0) == np.nanmax(hi_x, 0)) | (np.nanmin(lo_y, 0) == np.nanmax(hi_y, 0))
    np.testing.assert_allclose(pearson_from_sums(s.sum(0), constant), table["pcc_2um_pooled"], atol=1e-9)
    assert not list(tmp_path.glob("eval/.*tmp*"))


def test_prediction_shape_mismatch_is_an_input_error(cohort, tmp_path):
    pred = write_pred(tmp_path / "pred.zarr", cohort["rates"][:-1])
    with pytest.raises(InputError, match="pred.zarr.*does not match"):
        evaluate(pred, cohort["tiles"], tmp_path / "eval")
    assert not (tmp_path / "eval" / "per_gene.csv").exists()


def test_a_folds_genes_are_scored_against_their_own_counts(cohort, tmp_path):
    """Leak-free selection: the tile store holds the union over folds; a model predicts its fold's genes only."""
    full = evaluate(write_pred(tmp_path / "all.zarr", cohort["rates"]), cohort["tiles"], tmp_path / "all")
    order = [2, 0]  # a subset, in another order
    genes = [GENES[i] for i in order]
    part = evaluate(
        write_pred(tmp_path / "part.zarr", cohort["rates"][:, order], genes), cohort["tiles"], tmp_path / "p"
    )
    assert part["gene"].tolist() == genes
    expected = full.set_index("gene").loc[genes].reset_index()[full.columns]
    pd.testing.assert_frame_equal(part, expected)
    with pytest.raises(InputError, match="1 predicted genes are not in the tile store, e.g. 'NOPE'"):
        evaluate(write_pred(tmp_path / "x.zarr", cohort["rates"][:, :1], ["NOPE"]), cohort["tiles"], tmp_path / "x")


def test_an_evaluation_job_imports_no_torch(simulated, tmp_path):
    """The metrics compute in numpy: an evaluate or ceiling job never pays torch's import (about 1 s)."""
    import subprocess
    import sys

    pred = write_pred(tmp_path / "pred.zarr", simulated["expected"])
    tiles, truth = str(simulated["tiles"]), str(simulated["truth"])
    code = (
        "import sys; from sparsitytrap.evaluate import evaluate, evaluate_ceiling; "
        f"evaluate_ceiling({tiles!r}, {str(tmp_path / 'c.csv')!r}, truth_zarr={truth!r}); "
        f"evaluate_ceiling({tiles!r}, {str(tmp_path / 'h.csv')!r}, n_draws=2); "
        f"evaluate({str(pred)!r}, {tiles!r}, {str(tmp_path / 'eval')!r}, bootstrap=10); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
