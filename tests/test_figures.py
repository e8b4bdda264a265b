"""Figures from real evaluations of tiny synthetic tile and prediction stores."""

import numpy as np
import pandas as pd
import pytest
import zarr

from sparsitytrap import figures
from sparsitytrap.errors import InputError
from sparsitytrap.evaluate import evaluate
from sparsitytrap.stores import manifest

GENES = ["VIM", "PIGR", "ACTB", "MT-ATP6", "CD74"]
CATEGORIES = ["Stromal", "Secretory", "Housekeeping", "Mitochondrial", "Immune"]
TB = 16
GRID = np.array([(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 1), (2, 2)])  # holes at (1, 1) and (2, 0)


def write_sample(root, sample, rng):
    """Tile store of one patient plus predictions of models A (scaled 2.5x, collapse) and B."""
    t = len(GRID)
    rates = np.kron(rng.gamma(2.0, 1.0, (t, len(GENES), TB // 4, TB // 4)), np.ones((4, 4)))
    rates *= np.array([3.0, 1.0, 0.5, 2.0, 0.2])[None, :, None, None]
    counts = rng.poisson(rates)
    mask = np.ones((t, TB, TB), bool)
    mask[:, :, :4] = False  # the first 8 um column of every tile is off tissue
    g = zarr.open_group(str(root / f"{sample}.zarr"), mode="w", zarr_format=3)
    g.attrs.update(sample=sample, genes=GENES, tile_bins=TB, bin_um=2.0, grid_shape=[3, 3])
    g.create_array("counts", data=counts.astype(np.int32), chunks=(1, len(GENES), TB, TB))
    g.create_array("mask", data=mask, chunks=(1, TB, TB))
    g.create_array("grid", data=GRID.astype(np.int32))
    g.create_array("bin_origin", data=(GRID * TB).astype(np.int32))
    g.create_array("images", data=rng.integers(0, 255, (t, 24, 24, 3), dtype=np.uint8), chunks=(1, 24, 24, 3))
    manifest.write(root / f"{sample}.zarr")
    # per-gene noise levels: B beats A on some genes and loses on others
    noise = {"A": np.array([0.5, 3.0, 0.1, 2.0, 1.0]), "B": np.array([2.0, 0.2, 1.0, 0.5, 0.1])}
    scale = {"A": 2.5, "B": 1.0}
    preds = {}
    for model, sd in noise.items():
        p = rates + rng.normal(0, 1, rates.shape) * (sd * rates.mean((0, 2, 3)))[None, :, None, None]
        path = root / "models" / model / f"test-{sample}" / "predictions.zarr"
        pg = zarr.open_group(str(path), mode="w", zarr_format=3)
        pg.create_array(
            "rates", data=(np.clip(p, 0, None) * scale[model]).astype(np.float16), chunks=(1, len(GENES), TB, TB)
        )
        pg.attrs.update(genes=GENES, sample=sample, model=model, fold=f"test-{sample}")
        manifest.write(path)
        preds[model] = path
    return root / f"{sample}.zarr", preds


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two folds (test patients P1, P2), models A and B evaluated on each."""
    root = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(3)
    pd.DataFrame({"gene": GENES, "category": CATEGORIES}).to_csv(root / "genes.csv", index=False)
    out = {"root": root, "tiles": {}, "preds": {}, "eval": {"A": [], "B": []}}
    for sample in ("P1", "P2"):
        tiles, preds = write_sample(root, sample, rng)
        out["tiles"][sample], out["preds"][sample] = tiles, preds
        for model, pred in preds.items():
            d = root / "eval" / model / f"test-{sample}"
            evaluate(pred, tiles, d, genes_csv=root / "genes.csv", bootstrap=20)
            out["eval"][model].append(d)
    logs = []
    for model in ("A", "B"):
        for fold in ("test-P1", "test-P2"):
            path = root / "models" / model / fold / "log.csv"
            epochs = np.arange(1, 5)
            pd.DataFrame(
                {
                    "epoch": epochs,
                    "train_loss": 1 / epochs,
                    "val_loss": 1.2 / epochs,
                    "val_pcc_2um": 0.1 * epochs,
                    "lr_first": 1e-3,
                    "lr_last": 1e-3,
                }
            ).to_csv(path, index=False)
            logs.append(path)
    out["logs"] = logs
    return out


def assert_written(prefix):
    png, pdf = prefix.with_name(prefix.name + ".png"), prefix.with_name(prefix.name + ".pdf")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000
    assert not list(prefix.parent.glob(".*tmp*"))


FIGURES = {
    "table": lambda r, o: figures.results_table(r["eval"]["A"] + r["eval"]["B"], o, formats=("png", "pdf", "csv")),
    "bars": lambda r, o: figures.bar_chart(r["eval"]["A"] + r["eval"]["B"], o, bootstrap=30),
    "scatter": lambda r, o: figures.sparsity_scatter(r["eval"]["A"], r["eval"]["B"], o),
    "heatmap": lambda r, o: figures.heatmap(r["eval"]["A"], r["eval"]["B"], o),
    "mosaic": lambda r, o: figures.mosaic(r["tiles"]["P1"], r["preds"]["P1"], "PIGR", o, shared_scale=False),
    "rescue": lambda r, o: figures.rescue_panels(
        r["tiles"]["P1"], r["eval"]["A"][0], r["eval"]["B"][0], r["preds"]["P1"]["A"], r["preds"]["P1"]["B"], o, top_k=1
    ),
    "multiscale": lambda r, o: figures.multiscale_panels(r["tiles"]["P1"], r["preds"]["P1"]["B"], ["CD74"], o),
    "curves": lambda r, o: figures.training_curves(r["logs"], o),
    "ceiling": lambda r, o: figures.noise_ceiling_chart(r["eval"]["A"] + r["eval"]["B"], o),
}


@pytest.mark.parametrize("name", FIGURES)
def test_figure_writes_png_and_pdf(run, tmp_path, name):
    FIGURES[name](run, tmp_path / name)
    assert_written(tmp_path / name)


def test_results_table_numbers_are_computed(run, tmp_path):
    figures.results_table(run["eval"]["A"] + run["eval"]["B"], tmp_path / "table", formats=("csv",))
    table = pd.read_csv(tmp_path / "table.csv")
    per_gene = pd.concat([pd.read_csv(d / "per_gene.csv") for d in run["eval"]["B"]])
    # mean over genes per fold, then over folds
    for col, kind in (("pcc_8um_pooled_ceiling", "ceiling"), ("ssim_2um_pertile", "model")):
        expected = per_gene.groupby("fold")[col].mean()
        row = table.query(f"model == 'B' and metric == '{col.replace('_ceiling', '')}' and kind == '{kind}'")
        assert row["mean"].item() == pytest.approx(expected.mean())
        assert row["sd"].item() == pytest.approx(expected.std(ddof=1))
        assert row["n_folds"].item() == 2


def test_heatmap_rows_are_genes_sorted_by_computed_delta(run, tmp_path):
    fig = figures.heatmap(run["eval"]["A"], run["eval"]["B"], tmp_path / "heat", formats=())
    a = pd.concat([pd.read_csv(d / "per_gene.csv") for d in run["eval"]["A"]])
    b = pd.concat([pd.read_csv(d / "per_gene.csv") for d in run["eval"]["B"]])
    delta = b.groupby("gene")["pcc_2um_pooled"].mean() - a.groupby("gene")["pcc_2um_pooled"].mean()
    expected = list(delta.sort_values(ascending=False).index)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == expected
    assert labels != GENES and sorted(labels) == sorted(GENES)
    assert (delta > 0).any() and (delta < 0).any()  # the fixture has wins and losses


def test_collapse_annotation_uses_the_computed_ratio(run, tmp_path):
    fig = figures.bar_chart(
        run["eval"]["A"] + run["eval"]["B"], tmp_path / "bars", metrics=("pcc_8um_pooled",), bootstrap=30, formats=()
    )
    ratio = {
        m: pd.concat([pd.read_csv(d / "per_gene.csv") for d in run["eval"][m]])
        .groupby("fold")["ratio_pooled"]
        .mean()
        .mean()
        for m in ("A", "B")
    }
    assert ratio["A"] > 1.5 > ratio["B"] > 1 / 1.5
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == [f"ratio {ratio['A']:.1f}x"]  # model A only


def test_mosaic_places_tiles_on_grid_with_holes(run, tmp_path):
    tiles = zarr.open_group(str(run["tiles"]["P2"]), mode="r")
    fig = figures.mosaic(run["tiles"]["P2"], run["preds"]["P2"], "ACTB", tmp_path / "mosaic", pool=4, formats=())
    truth = np.ma.filled(fig.axes[1].images[0].get_array(), np.nan)
    assert fig.axes[1].get_title() == "truth (counts)"
    d = TB // 4
    assert truth.shape == (3 * d, 3 * d)
    g = GENES.index("ACTB")
    for t, (r, c) in enumerate(GRID):
        block = truth[r * d : (r + 1) * d, c * d : (c + 1) * d]
        counts = np.asarray(tiles["counts"][t, g]) * np.asarray(tiles["mask"][t])
        assert np.nansum(block) == counts.sum()
        assert np.isnan(block[:, 0]).all() and np.isfinite(block[:, 1:]).all()  # off-tissue 8 um column
    for r, c in [(1, 1), (2, 0)]:  # grid holes stay grey (NaN)
        assert np.isnan(truth[r * d : (r + 1) * d, c * d : (c + 1) * d]).all()
    assert [ax.get_title() for ax in fig.axes[:4]] == ["H&E", "truth (counts)", "A", "B"]
    lims = {fig.axes[i].images[0].get_clim() for i in (1, 2, 3)}
    assert len(lims) == 1  # one shared colour scale by default


def test_gene_not_in_data_names_gene_and_config_key(run, tmp_path):
    with pytest.raises(InputError, match=r"figures\.mosaic_genes.*'NOPE1'"):
        figures.mosaic(run["tiles"]["P1"], run["preds"]["P1"], "NOPE1", tmp_path / "m")
    with pytest.raises(InputError, match=r"figures\.mosaic_genes.*'NOPE2'"):
        figures.multiscale_panels(run["tiles"]["P1"], run["preds"]["P1"]["B"], ["CD74", "NOPE2"], tmp_path / "ms")
    assert not list(tmp_path.iterdir())


def test_results_table_gives_no_ratio_for_relative_scores(run, tmp_path):
    import json
    import shutil

    dirs = []
    for i, d in enumerate(run["eval"]["B"]):
        copy = shutil.copytree(d, tmp_path / f"rank{i}")
        summary = json.loads((copy / "summary.json").read_text())
        (copy / "summary.json").write_text(json.dumps({**summary, "model": "R", "relative_scores": True}))
        dirs.append(copy)
    fig = figures.results_table(run["eval"]["A"] + dirs, tmp_path / "t", formats=())
    cells = {(r, c): cell.get_text().get_text() for (r, c), cell in fig.axes[0].tables[0].get_celld().items()}
    ratio_col = list(figures.TABLE_METRICS).index("ratio_pooled")
    pcc_col = list(figures.TABLE_METRICS).index("pcc_2um_pooled")
    assert cells[(2, ratio_col)].startswith("n/a") and not cells[(1, ratio_col)].startswith("n/a")
    assert not cells[(2, pcc_col)].startswith("n/a")  # correlations stay meaningful for scores
