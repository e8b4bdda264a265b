"""Figures from real evaluations of tiny synthetic tile and prediction stores."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import zarr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.patches import Rectangle

from sparsitytrap import figures
from sparsitytrap.errors import InputError
from sparsitytrap.evaluate import evaluate
from sparsitytrap.stores import manifest

GENES = ["VIM", "PIGR", "ACTB", "MT-ATP6", "CD74"]
CATEGORIES = ["Stromal", "Secretory", "Housekeeping", "Mitochondrial", "Immune"]
TB = 16
GRID = np.array([(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 1), (2, 2)])  # holes at (1, 1) and (2, 0)
# models A and B under names of the workflow's own length: long names are what push labels off the canvas
NAMES = {"A": "G_img2st_mse", "B": "C_hist2st_poisson_corrected"}


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
        pg.attrs.update(genes=GENES, sample=sample, model=NAMES[model], fold=f"test-{sample}")
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


class Named(list):
    """Stand-in for a job's input, params or wildcards: a list whose items may also have names."""

    def __init__(self, items=(), **named):
        super().__init__([*items, *named.values()])
        self.__dict__.update(named)


def fixture_job(entry, run):
    """A job for a registry entry whose input, params and wildcards hold the fixture's files and settings."""
    data = {
        "eval_dirs": run["eval"]["A"] + run["eval"]["B"],
        "eval_dirs_a": run["eval"]["A"],
        "eval_dirs_b": run["eval"]["B"],
        "eval_dir_a": run["eval"]["A"][0],
        "eval_dir_b": run["eval"]["B"][0],
        "tiles_zarr": run["tiles"]["P1"],
        "pred_a": run["preds"]["P1"]["A"],
        "pred_b": run["preds"]["P1"]["B"],
        "pred_zarr": run["preds"]["P1"]["B"],
        "predictions": {NAMES[m]: path for m, path in run["preds"]["P1"].items()},
        "gene": "PIGR",
        "log_csvs": run["logs"],
        "tiles_zarrs": [run["tiles"]["P1"]],
        "train_um": {NAMES["A"]: 2, NAMES["B"]: 2},
        "losses": {NAMES["A"]: "mse", NAMES["B"]: "poisson"},
    }
    settings = {"bootstrap": 30, "bootstrap_seed": 0, "metric": "pcc_2um_pooled", "top_k": 2}
    settings |= {"shared_scale": False, "model": NAMES["B"], "genes": ["CD74"]}
    places = {"input": {}, "params": {n: settings[n] for n in entry.options}, "wildcards": {}}
    whole = []
    for arg, where in entry.args.items():
        part, _, name = where.partition(".")
        if name:
            places[part][name] = data[arg]
        else:
            whole = data[arg]
    input = Named(whole, **places["input"])
    return Named(input=input, params=Named(**places["params"]), wildcards=Named(**places["wildcards"]))


def _drawn(fig):
    """Draw ``fig`` on an Agg canvas (running its layout) and return the renderer."""
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def text_boxes(fig, renderer):
    """(what, display bbox) of every text drawn: figure texts and legends, titles, axis labels with their
    tick labels (the axis's own extent: only the ticks it draws), texts in axes, legends and tables."""
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in fig.texts]
    boxes += [("figure legend", leg.get_window_extent(renderer)) for leg in fig.legends]
    for ax in fig.axes:
        where = ax.get_title() or ax.get_label()
        boxes += [(t.get_text(), t.get_window_extent(renderer)) for t in (ax.title, ax._left_title, ax._right_title)]
        for axis in (ax.xaxis, ax.yaxis) if ax.axison else ():
            if (box := axis.get_tightbbox(renderer)) is not None:
                boxes.append((f"{axis.get_label_text() or axis.axis_name + ' ticks'} of {where!r}", box))
        boxes += [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts]
        if ax.get_legend() is not None:
            boxes.append((f"legend of {where!r}", ax.get_legend().get_window_extent(renderer)))
        boxes += [(f"table of {where!r}", table.get_window_extent(renderer)) for table in ax.tables]
    return [(what, box) for what, box in boxes if what.strip() and box.width > 0]


def off_canvas(fig, tol=1.0):
    """Texts that fall (partly) outside the figure's canvas."""
    renderer, canvas = _drawn(fig), fig.bbox
    return [
        what
        for what, b in text_boxes(fig, renderer)
        if b.x0 < canvas.x0 - tol or b.y0 < canvas.y0 - tol or b.x1 > canvas.x1 + tol or b.y1 > canvas.y1 + tol
    ]


def _overlap(a, b, tol=0.5):
    return min(a.x1, b.x1) - max(a.x0, b.x0) > tol and min(a.y1, b.y1) - max(a.y0, b.y0) > tol


def crowded(fig):
    """Annotations (texts in axes) that overlap a bar or one another, and legends that cover a data point."""
    renderer, found = _drawn(fig), []
    for ax in fig.axes:
        notes = [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts if t.get_visible() and t.get_text()]
        bars = [p.get_window_extent(renderer) for p in ax.patches if isinstance(p, Rectangle)]
        bars = [b for b in bars if np.isfinite(b.bounds).all() and b.width > 0 and b.height > 0]
        found += [f"{n!r} over a bar" for n, box in notes if any(_overlap(box, b) for b in bars)]
        found += [f"{n!r} over {m!r}" for i, (n, a) in enumerate(notes) for m, b in notes[i + 1 :] if _overlap(a, b)]
        legends = [leg.get_window_extent(renderer) for leg in (ax.get_legend(), *fig.legends) if leg is not None]
        points = [c.get_offset_transform().transform(c.get_offsets()) for c in ax.collections if len(c.get_offsets())]
        points = np.concatenate(points) if points else np.empty((0, 2))
        found += [
            f"legend over a point of {ax.get_title()!r}"
            for leg in legends
            for x, y in points
            if leg.x0 < x < leg.x1 and leg.y0 < y < leg.y1
        ]
    return found


@pytest.mark.parametrize("name", figures.FIGURES)
def test_registered_figure_keeps_its_text_on_the_canvas_and_off_the_data(run, tmp_path, name):
    entry = figures.FIGURES[name]
    fig = entry.draw(fixture_job(entry, run), tmp_path / name, ["png"])
    assert off_canvas(fig) == []
    assert crowded(fig) == []


def test_results_table_numbers_are_computed(run, tmp_path):
    figures.results_table(run["eval"]["A"] + run["eval"]["B"], tmp_path / "table", formats=("csv",))
    table = pd.read_csv(tmp_path / "table.csv")
    per_gene = pd.concat([pd.read_csv(d / "per_gene.csv") for d in run["eval"]["B"]])
    # mean over genes per fold, then over folds
    for col, kind in (("pcc_8um_pooled_ceiling", "ceiling"), ("ssim_2um_pertile", "model")):
        expected = per_gene.groupby("fold")[col].mean()
        row = table.query(f"model == '{NAMES['B']}' and metric == '{col.replace('_ceiling', '')}' and kind == '{kind}'")
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
    ticks = fig.axes[0].get_xticklabels()
    assert [t.get_text() for t in ticks] == [f"{NAMES['A']}\nratio {ratio['A']:.1f}x", NAMES["B"]]  # model A only
    assert [t.get_color() for t in ticks] == ["firebrick", "black"]
    assert not fig.axes[0].texts  # under the bars, not over them


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
    lims = [fig.axes[i].images[0].get_clim() for i in (1, 2, 3)]
    assert len(set(lims)) == 3  # each panel its own scale by default: 0 to its 99th percentile
    for i, (low, high) in zip((1, 2, 3), lims):
        data = np.ma.filled(fig.axes[i].images[0].get_array(), np.nan)
        assert low == 0 and high == pytest.approx(np.nanpercentile(data, 99))
    assert len(fig.axes) == 4 + 3  # and its own colour bar


def test_gene_not_in_data_names_gene_and_config_key(run, tmp_path):
    with pytest.raises(InputError, match=r"figures\.mosaic_genes.*'NOPE1'"):
        figures.mosaic(run["tiles"]["P1"], run["preds"]["P1"], "NOPE1", tmp_path / "m")
    with pytest.raises(InputError, match=r"figures\.mosaic_genes.*'NOPE2'"):
        figures.multiscale_panels(run["tiles"]["P1"], run["preds"]["P1"]["B"], ["CD74", "NOPE2"], tmp_path / "ms")
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def ranked(run, tmp_path_factory):
    """Model B's evaluations relabelled as those of a ranking model R (relative scores, not counts)."""
    root = tmp_path_factory.mktemp("ranked")
    dirs = []
    for i, d in enumerate(run["eval"]["B"]):
        copy = shutil.copytree(d, root / f"rank{i}")
        summary = json.loads((copy / "summary.json").read_text())
        (copy / "summary.json").write_text(json.dumps({**summary, "model": "R", "relative_scores": True}))
        dirs.append(copy)
    return dirs


def texts(ax):
    return [t.get_text() for t in ax.texts]


def test_results_table_gives_no_ratio_for_relative_scores(run, ranked, tmp_path):
    fig = figures.results_table(run["eval"]["A"] + ranked, tmp_path / "t", formats=("csv",))
    cells = {(r, c): cell.get_text().get_text() for (r, c), cell in fig.axes[0].tables[0].get_celld().items()}
    ratio_col = list(figures.TABLE_METRICS).index("ratio_pooled")
    pcc_col = list(figures.TABLE_METRICS).index("pcc_2um_pooled")
    assert cells[(2, ratio_col)].startswith("n/a") and not cells[(1, ratio_col)].startswith("n/a")
    assert not cells[(2, pcc_col)].startswith("n/a")  # correlations stay meaningful for scores
    table = pd.read_csv(tmp_path / "t.csv").set_index(["model", "metric", "kind"])
    assert table.loc[("R", "ssim_2um_pertile"), "mean"].isna().all()  # the numbers file gives none either
    assert table.loc[("R", "pcc_2um_pooled"), "mean"].notna().all()


def test_ranking_model_is_na_in_every_figure_for_count_scale_metrics(run, ranked, tmp_path):
    a, b = run["eval"]["A"], ranked
    ssim = "ssim_2um_pertile"
    bars = figures.bar_chart(a + b, tmp_path / "b", metrics=("pcc_2um_pooled", ssim), bootstrap=20, formats=())
    assert texts(bars.axes[0]) == [] and texts(bars.axes[1]) == ["n/a"]
    assert bars.axes[1].texts[0].xy[0] == 1  # at R, the second model
    assert np.isnan(bars.axes[1].patches[1].get_height()) and np.isfinite(bars.axes[1].patches[0].get_height())
    ceiling = figures.noise_ceiling_chart(a + b, tmp_path / "c", metrics=("pcc_2um_pooled", ssim), formats=())
    assert texts(ceiling.axes[1])[1] == "n/a" and texts(ceiling.axes[0])[1] != "n/a"
    heat = figures.heatmap(a, b, tmp_path / "h", formats=())  # axes: PCC scores, PCC delta, SSIM scores, SSIM delta
    assert [texts(heat.axes[i]).count("n/a") for i in range(4)] == [0, 0, 2 * len(GENES), len(GENES)]
    scatter = figures.sparsity_scatter(a, b, tmp_path / "s", metric=ssim, formats=())
    assert any(t.startswith("n/a") for t in texts(scatter.axes[0]))
    rescue = figures.rescue_panels(
        run["tiles"]["P1"], a[0], b[0], run["preds"]["P1"]["A"], run["preds"]["P1"]["B"], tmp_path / "r", metric=ssim
    )
    assert [t.get_text() for t in rescue.texts][0].startswith("n/a")
    assert_written(tmp_path / "r")
    for fig in (bars, ceiling, heat, scatter, rescue):
        assert off_canvas(fig) == [] and crowded(fig) == []


def test_fraction_of_ceiling_is_the_way_from_null_to_ceiling():
    f = figures.fraction_of_ceiling
    assert f(0.218, 0.217, 0.9) == pytest.approx(0.001 / 0.683)  # SSIM at its null: ~0 %, not 24 %
    assert f(0.6, 0.1, 0.6) == 1 and f(0.1, 0.1, 0.6) == 0
    assert np.isnan(f(0.5, 0.3, 0.3)) and np.isnan(f(0.5, 0.4, 0.2)) and np.isnan(f(0.5, 0.1, np.nan))
    assert np.allclose(f([0.2, 0.5], [0.0, 0.5], [0.4, 0.4]), [0.5, np.nan], equal_nan=True)


def test_noise_ceiling_labels_are_computed_fractions(run, tmp_path):
    metrics = ("pcc_2um_pooled", "ssim_2um_pertile")
    fig = figures.noise_ceiling_chart(run["eval"]["A"] + run["eval"]["B"], tmp_path / "c", metrics=metrics, formats=())
    for ax, metric in zip(fig.axes, metrics):
        expected = []
        for model in ("A", "B"):
            per_fold = pd.concat([pd.read_csv(d / "per_gene.csv") for d in run["eval"][model]]).groupby("fold")
            means = per_fold.mean(numeric_only=True)
            frac = figures.fraction_of_ceiling(*(means[metric + sfx].mean() for sfx in ("", "_null", "_ceiling")))
            expected.append(f"{frac:.0%}" if np.isfinite(frac) else "n/a")
        assert texts(ax) == expected
    assert texts(fig.axes[1]) == ["n/a", "n/a"]  # split-half thinning gives no SSIM ceiling
    assert texts(fig.axes[0])[0] != "n/a"


def test_heatmap_gives_each_metric_its_scale_and_shows_the_null(run, tmp_path):
    fig = figures.heatmap(run["eval"]["A"], run["eval"]["B"], tmp_path / "h", formats=())
    pcc, ssim = fig.axes[0], fig.axes[2]
    assert [t.get_text() for t in pcc.get_xticklabels()] == ["A", "B", "null A", "null B"]
    assert f"B = {NAMES['B']} vs A = {NAMES['A']}" in fig.texts[0].get_text()
    b = pd.concat([pd.read_csv(d / "per_gene.csv") for d in run["eval"]["B"]]).groupby("gene").mean(numeric_only=True)
    genes = [t.get_text() for t in pcc.get_yticklabels()]
    shown = np.asarray(ssim.collections[0].get_array()).reshape(len(genes), 4)
    assert np.allclose(shown[:, 3], b.loc[genes, "ssim_2um_pertile_null"])
    assert np.allclose(shown[:, 1], b.loc[genes, "ssim_2um_pertile"])
    lims = [ax.collections[0].get_clim() for ax in (pcc, ssim)]
    assert lims[0] != lims[1]
    for ax, (low, high) in zip((pcc, ssim), lims):  # each scale spans its own metric's values, nulls included
        values = np.asarray(ax.collections[0].get_array(), dtype=float)
        assert (low, high) == pytest.approx((np.nanmin(values), np.nanmax(values)))


def test_layout_checks_find_text_off_canvas_over_bars_and_legends_over_points():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 2), layout="constrained")
    ax = fig.subplots()
    ax.bar([0, 1], [1.0, 1.0], width=0.9)
    ax.annotate("inside a bar", (0, 0.5), ha="center")
    ax.scatter([1.0], [0.9], label="a point")
    ax.legend(loc="upper right")
    ax.set_xlabel("a label far too long for a figure three inches wide, so it leaves the canvas")
    assert off_canvas(fig) == [ax.get_xlabel() + " of ''"]
    assert crowded(fig) == ["'inside a bar' over a bar", "legend over a point of ''"]


def test_mosaic_reads_the_stitched_map_where_a_store_has_one(run, tmp_path):
    path = shutil.copytree(run["preds"]["P1"]["B"], tmp_path / "pred.zarr")
    tiles = zarr.open_group(str(run["tiles"]["P1"]), mode="r")
    origins = np.asarray(tiles["bin_origin"])
    lo = origins.min(0) - 3  # the map's box need not start at a tile
    rows, cols = origins.max(0) + TB + 3 - lo
    stitched = np.random.default_rng(0).gamma(1.0, 1.0, (len(GENES), rows, cols)).astype(np.float16)
    group = zarr.open_group(str(path), mode="r+")
    group.create_array("stitched", data=stitched, chunks=(len(GENES), TB, TB))
    group.attrs["stitched"] = {"origin": lo.tolist(), "stride_bins": TB // 2, "window": "hann", "windows": 9}
    manifest.write(path)
    fig = figures.mosaic(run["tiles"]["P1"], {"B": path, "A": run["preds"]["P1"]["A"]}, "ACTB", tmp_path / "m")
    assert [ax.get_title() for ax in fig.axes[2:4]] == ["B (stitched)", "A"]
    shown = np.ma.filled(fig.axes[2].images[0].get_array(), np.nan)
    g, d = GENES.index("ACTB"), TB // 4
    for t, ((r, c), (r0, c0)) in enumerate(zip(GRID, origins - lo)):
        block = stitched[g, r0 : r0 + TB, c0 : c0 + TB].astype(np.float64) * np.asarray(tiles["mask"][t])
        pooled = block.reshape(d, 4, d, 4).sum((1, 3))
        np.testing.assert_allclose(shown[r * d : (r + 1) * d, c * d + 1 : (c + 1) * d], pooled[:, 1:], rtol=1e-9)


def _training_log(root, model, fold, rows):
    """Write ``rows`` as ``root/models/{model}/{fold}/log.csv`` (model and fold are read from the path)."""
    path = root / "models" / model / fold / "log.csv"
    path.parent.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_training_curves_keep_a_first_epoch_spike_off_scale(tmp_path):
    # one exploding warm-up batch (seen: epoch-1 train loss 103 against 0.3 after) must not flatten the rest
    rows = {"epoch": range(1, 7), "train_loss": [103.0, 0.31, 0.30, 0.30, 0.29, 0.29]}
    rows["val_loss"] = [0.32, 0.31, 0.305, 0.30, 0.30, 0.299]
    path = _training_log(tmp_path, "E", "test-P2", rows)
    fig = figures.training_curves([path], tmp_path / "curves")
    ax = fig.axes[0]
    assert ax.get_ylim()[1] < 0.33, ax.get_ylim()
    assert any("off scale: 103" in t.get_text() for t in ax.texts)
    calm_rows = {**rows, "train_loss": [0.33, *rows["train_loss"][1:]]}  # no spike: the axis is matplotlib's own
    calm = _training_log(tmp_path, "E", "test-P3", calm_rows)
    assert not figures.training_curves([calm], tmp_path / "calm").axes[0].texts


def test_training_curves_keep_a_validation_spike_off_scale(tmp_path):
    # seen at 30 epochs: Img2ST + Poisson's epoch-2 validation loss 43 against 0.28-0.31 elsewhere
    rows = {"epoch": range(1, 7), "train_loss": [0.31, 0.30, 0.30, 0.29, 0.29, 0.29]}
    rows["val_loss"] = [0.30, 43.0, 0.295, 0.29, 0.289, 0.288]
    path = _training_log(tmp_path, "F", "test-P1", rows)
    ax = figures.training_curves([path], tmp_path / "curves").axes[0]
    assert ax.get_ylim()[1] < 0.32, ax.get_ylim()
    assert [t.get_text() for t in ax.texts] == ["epoch 2 validation loss off scale: 43"]


def test_training_curves_say_what_ended_each_job(tmp_path):
    rows = {"epoch": range(1, 7), "train_loss": [0.31, 0.30, 0.30, 0.29, 0.29, 0.29]}
    rows["val_loss"] = [0.30, 0.298, 0.295, 0.29, 0.289, 0.2895]
    logs = [_training_log(tmp_path, "E", fold, rows) for fold in ("test-P1", "test-P2")]
    records = []
    for log, stop in zip(logs, ("plateau", "patience"), strict=True):
        records.append(log.with_name("metrics_val.json"))
        records[-1].write_text(json.dumps({"epochs_run": 6, "best_epoch": 5, "stop": stop, "stopped_early": True}))
    fig = figures.training_curves([*logs, *records], tmp_path / "curves")
    texts = {t.get_text() for t in fig.axes[-1].texts}
    assert texts == {"test-P1: plateau, 6 epochs, best 5", "test-P2: patience, 6 epochs, best 5"}
    assert not figures.training_curves(logs, tmp_path / "plain").axes[-1].texts  # no records: nothing written
    records[0].write_text("{")
    with pytest.raises(InputError, match="metrics_val.json: unreadable training record"):
        figures.training_curves([*logs, *records], tmp_path / "damaged")
