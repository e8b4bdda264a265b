"""Every figure of the workflow, one function per figure, each its own Snakemake target.

Every number, label and gene name drawn here is read or computed from the run's own outputs
(``per_gene.csv``, ``per_tile.parquet``, ``summary.json`` of :mod:`sparsitytrap.evaluate`, the
tile and prediction stores, ``log.csv``); nothing is typed in. Each function writes
``{out_prefix}.{fmt}`` for every format (config ``figures.format``) atomically and returns the
:class:`matplotlib.figure.Figure` (already saved, for inspection).

Figures are built with the object-oriented API (no pyplot state): safe in long-lived processes
and independent of the display backend.
"""

import re
import textwrap
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure

from . import metrics as M
from . import stats
from .bins import pool_mask, sum_pool
from .errors import InputError
from .bootstrap import fold_mean, interval
from .stores import evaluation
from .stores.predictions import open_predictions
from .stores.tiles import open_tiles
from .io import atomic_path

FORMATS = ("png", "pdf")
TABLE_METRICS = ("pcc_2um_pooled", "pcc_4um_pooled", "pcc_8um_pooled", "ssim_2um_pertile", "ratio_pooled")
BAR_METRICS = ("pcc_8um_pooled", "pcc_2um_pooled", "ssim_2um_pertile")
CEILING_METRICS = ("pcc_2um_pooled", "pcc_8um_pooled", "scc_2um_pooled", "ssim_2um_pertile")
HEATMAP_METRICS = ("pcc_2um_pooled", "ssim_2um_pertile")
#: Metrics on the count scale: meaningless for a ranking model's relative scores.
COUNT_SCALE = ("ratio_pooled", "deviance_pooled")
GENES_KEY = "figures.mosaic_genes"
OFF_TISSUE = "lightgrey"
DPI = 150


# ---------------------------------------------------------------------------------------------
# helpers: saving, labels, reading evaluations


def save(fig, out_prefix, formats=FORMATS):
    """Write ``fig`` to ``{out_prefix}.{fmt}`` for each format, atomically; return the paths."""
    paths = []
    for fmt in formats:
        if fmt == "csv":  # tables only: written by the caller
            continue
        path = Path(f"{out_prefix}.{fmt}")
        # a constrained layout already fits the labels: "tight" would only draw the figure twice
        tight = "tight" if fig.get_layout_engine() is None else None
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=DPI, bbox_inches=tight)
        paths.append(path)
    return paths


def metric_label(column):
    """Readable label of a metric column, e.g. ``pcc_2um_pooled`` -> ``PCC 2 µm (pooled)``."""
    m = re.fullmatch(r"(pcc|scc|ssim)_(\d+)um_(pooled|pertile)", column)
    if m:
        return f"{m[1].upper()} {m[2]} µm ({'per tile' if m[3] == 'pertile' else 'pooled'})"
    return {"ratio_pooled": "pred/target ratio", "deviance_pooled": "Poisson deviance"}.get(column, column)


def read_evaluations(eval_dirs):
    """Per-gene tables of evaluations, concatenated, with ``model`` and ``fold`` from their summaries.

    Parameters
    ----------
    eval_dirs
        Folders written by :func:`sparsitytrap.evaluate.evaluate`.

    Returns
    -------
    per_gene, summaries
        DataFrame (one row per model, fold and gene) and the list of ``summary.json`` dicts.
    """
    frames, summaries = [], []
    for d in map(Path, eval_dirs):
        frames.append(evaluation.read_per_gene(d))
        summaries.append({**evaluation.read_summary(d), "dir": str(d)})
    if not frames:
        raise InputError("eval_dirs", "no evaluation folders given")
    return pd.concat(frames, ignore_index=True), summaries


def _models(summaries):
    """Model names in the order given (the config's), each once."""
    return list(dict.fromkeys(s["model"] for s in summaries))


def fold_means(per_gene, columns):
    """Mean over genes per (model, fold), then mean, SD (ddof 1) and count over folds per model."""
    per_fold = per_gene.groupby(["model", "fold"], sort=False)[list(columns)].mean()
    grouped = per_fold.groupby(level="model", sort=False)
    return grouped.mean(), grouped.std(ddof=1), grouped.count()


def _fmt(mean, sd, n):
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.3f} ± {sd:.3f}" if n > 1 and np.isfinite(sd) else f"{mean:.3f}"


def _protocol_line(summaries, width=110):
    """Which folds, null and ceiling the numbers come from, wrapped for a figure title."""
    folds = sorted({s["fold"] for s in summaries})
    ceilings = sorted({s["protocol"].get("ceiling_kind", "?") for s in summaries})
    line = (
        f"folds {', '.join(folds)} (each tests one held-out patient); null: label shuffle across tiles; "
        f"ceiling: {', '.join(ceilings)}"
    )
    return textwrap.fill(line, width, break_on_hyphens=False)


# ---------------------------------------------------------------------------------------------
# results table


def results_table(eval_dirs, out_prefix, metrics=TABLE_METRICS, formats=FORMATS):
    """Rendered table: per model, mean per-gene score with its null and ceiling, mean ± SD over folds.

    Parameters
    ----------
    eval_dirs
        Evaluation folders of every (model, fold).
    out_prefix
        Output path without extension; ``csv`` in ``formats`` also writes the numbers.
    metrics
        Metric columns of ``per_gene.csv``.
    formats
        File formats (config ``figures.format``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    per_gene, summaries = read_evaluations(eval_dirs)
    kinds = {"model": "", "null": "_null", "ceiling": "_ceiling"}
    cols = [m + k for m in metrics for k in kinds.values()]
    _require(per_gene, cols, "per_gene.csv")
    mean, sd, n = fold_means(per_gene, cols)
    models = _models(summaries)
    relative = {s["model"] for s in summaries if s.get("relative_scores")}
    cells = [
        [
            "n/a: relative scores, not counts"
            if mo in relative and m in COUNT_SCALE
            else f"{_fmt(mean.at[mo, m], sd.at[mo, m], n.at[mo, m])}\n"
            f"null {_fmt(mean.at[mo, m + '_null'], np.nan, 1)} | ceiling {_fmt(mean.at[mo, m + '_ceiling'], np.nan, 1)}"
            for m in metrics
        ]
        for mo in models
    ]
    fig = Figure(figsize=(2.3 * len(metrics) + 2, 0.75 * len(models) + 1.2))
    ax = fig.add_subplot()
    ax.axis("off")
    table = ax.table(
        cellText=cells,
        rowLabels=[f"{mo} ({n.at[mo, metrics[0]]} folds)" for mo in models],
        colLabels=[metric_label(m) for m in metrics],
        loc="center",
        cellLoc="center",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 2.6)
    ax.set_title("Mean over genes, mean ± SD over folds\n" + _protocol_line(summaries, 150), fontsize=8)
    save(fig, out_prefix, formats)
    if "csv" in formats:
        rows = [
            {
                "model": mo,
                "metric": m,
                "kind": kind,
                "mean": mean.at[mo, m + sfx],
                "sd": sd.at[mo, m + sfx],
                "n_folds": n.at[mo, m + sfx],
            }
            for mo in models
            for m in metrics
            for kind, sfx in kinds.items()
        ]
        with atomic_path(Path(f"{out_prefix}.csv")) as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False)
    return fig


def _require(df, columns, where):
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(where, f"missing column(s) {missing}")


# ---------------------------------------------------------------------------------------------
# bar chart with bootstrap intervals over tiles


def bootstrap_interval(summaries, metric, n_boot=1000, seed=0):
    """95 % interval of the mean over folds of a metric's mean over genes, tiles resampled per fold.

    Returns ``(low, high)``, or ``(nan, nan)`` when the metric is not resampled per tile.
    """
    reps = fold_mean([evaluation.read_per_tile(s["dir"]) for s in summaries], metric, n_boot, seed)
    low, high = interval(reps) if reps is not None else (None, None)
    return (np.nan, np.nan) if low is None else (low, high)


def bar_chart(eval_dirs, out_prefix, metrics=BAR_METRICS, n_boot=1000, seed=0, collapse=1.5, formats=FORMATS):
    """Bars of each model's mean per-gene score per metric, with 95 % bootstrap intervals over tiles.

    The label-shuffle null is drawn as a black tick on each bar. A model whose mean
    prediction/target ratio is above ``collapse`` or below ``1 / collapse`` is annotated (the
    seeds' "collapse": a calibrated-looking PCC with rates off by a factor).

    Parameters
    ----------
    eval_dirs
        Evaluation folders of every (model, fold).
    out_prefix
        Output path without extension.
    metrics
        Metric columns, one panel each.
    n_boot, seed
        Bootstrap resamples of tiles (within each fold) and their seed.
    collapse
        Ratio factor that triggers the annotation.
    formats
        File formats.

    Returns
    -------
    matplotlib.figure.Figure
    """
    per_gene, summaries = read_evaluations(eval_dirs)
    _require(per_gene, list(metrics) + [m + "_null" for m in metrics] + ["ratio_pooled"], "per_gene.csv")
    mean, sd, n = fold_means(per_gene, list(metrics) + [m + "_null" for m in metrics] + ["ratio_pooled"])
    models = _models(summaries)
    relative = {s["model"] for s in summaries if s.get("relative_scores")}
    fig = Figure(figsize=(max(3.0, 0.8 * len(models) + 1) * len(metrics), 4.2), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    colours = dict(zip(models, sns.color_palette("tab10", len(models))))
    for ax, metric in zip(axes, metrics):
        x = np.arange(len(models))
        heights = np.array([mean.at[mo, metric] for mo in models])
        ci = np.array(
            [bootstrap_interval([s for s in summaries if s["model"] == mo], metric, n_boot, seed) for mo in models]
        )
        err = np.abs(np.vstack([heights - ci[:, 0], ci[:, 1] - heights]))
        ax.bar(x, heights, color=[colours[mo] for mo in models], yerr=np.nan_to_num(err), capsize=3)
        ax.scatter(
            x,
            [mean.at[mo, metric + "_null"] for mo in models],
            marker="_",
            s=300,
            color="black",
            zorder=3,
            label="label-shuffle null",
        )
        for xi, mo in zip(x, models):
            r = mean.at[mo, "ratio_pooled"]
            if mo not in relative and np.isfinite(r) and (r > collapse or r < 1 / collapse):
                top = np.nanmax([heights[xi], ci[xi, 1]])
                ax.annotate(
                    f"ratio {r:.1f}x",
                    (xi, top),
                    xytext=(0, 4),
                    textcoords="offset points",
                    ha="center",
                    color="firebrick",
                    fontsize=8,
                )
        ax.set_xticks(x, models, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(f"mean over genes, {metric_label(metric)}")
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(metric_label(metric), fontsize=9)
        ax.margins(y=0.12)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", fontsize=7)
    fig.suptitle(
        f"95 % bootstrap intervals over tiles ({n_boot} resamples, within folds)\n{_protocol_line(summaries)}",
        fontsize=8,
    )
    save(fig, out_prefix, formats)
    return fig


# ---------------------------------------------------------------------------------------------
# comparisons of two models: sparsity scatter, per-gene heatmap


def _comparison(eval_dirs_a, eval_dirs_b, metric, categories=None):
    """stats.compare of B vs A on ``metric``, categories from the per-gene tables unless given."""
    a, sa = read_evaluations(eval_dirs_a)
    b, sb = read_evaluations(eval_dirs_b)
    names = (_models(sa)[0], _models(sb)[0])
    _require(a, [metric, "sparsity"], eval_dirs_a[0])
    _require(b, [metric, "sparsity"], eval_dirs_b[0])
    if categories is None and "category" in a.columns:
        categories = dict(zip(a["gene"], a["category"]))
    return stats.compare(a, b, metric, categories=categories, names=names), names, sa + sb


def _category_colours(categories):
    cats = sorted(set(categories))
    return dict(zip(cats, sns.color_palette("tab10" if len(cats) <= 10 else "husl", len(cats))))


def sparsity_scatter(eval_dirs_a, eval_dirs_b, out_prefix, metric="pcc_2um_pooled", categories=None, formats=FORMATS):
    """Sparsity vs delta (B - A) per gene coloured by category, fit line and Spearman rho, beside category means.

    Parameters
    ----------
    eval_dirs_a, eval_dirs_b
        Evaluation folders of model A and model B (one per fold).
    out_prefix
        Output path without extension.
    metric
        Metric column compared.
    categories
        gene -> category (dict or TSV path); default: the ``category`` column of ``per_gene.csv``.
    formats
        File formats.

    Returns
    -------
    matplotlib.figure.Figure
    """
    res, (na, nb), summaries = _comparison(eval_dirs_a, eval_dirs_b, metric, categories)
    s1, s2, summ = res["s1"], res["s2"], res["summary"].iloc[0]
    c = s1[s1["compared"]]
    colours = _category_colours(s1["category"])
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax, bx = fig.subplots(1, 2, width_ratios=[2, 1])
    for cat, g in c.groupby("category"):
        ax.scatter(g["sparsity_pct"], g["delta"], color=colours[cat], label=cat, s=22)
    if len(c) >= 2 and np.ptp(c["sparsity_pct"]) > 0:
        slope, icpt = np.polyfit(c["sparsity_pct"], c["delta"], 1)
        xs = np.linspace(c["sparsity_pct"].min(), c["sparsity_pct"].max(), 50)
        ax.plot(xs, icpt + slope * xs, color="black", lw=1, label="least-squares fit")
    ax.axhline(0, color="grey", lw=0.5)
    rho, p = summ["spearman_rho"], summ["spearman_p"]
    stat = f"Spearman ρ = {rho:.3f}, p = {p:.2g}" if np.isfinite(rho) else "Spearman ρ undefined"
    ax.text(0.02, 0.98, f"{stat}, n = {len(c)} genes", transform=ax.transAxes, va="top", fontsize=8)
    ax.set_xlabel("sparsity: % of tissue bins with zero count (test patient, mean over folds)")
    ax.set_ylabel(f"Δ {metric_label(metric)} ({nb} − {na})")
    ax.legend(fontsize=7, loc="lower right")
    s2 = s2.sort_values("delta_mean")
    y = np.arange(len(s2))
    bx.barh(
        y, s2["delta_mean"], xerr=np.nan_to_num(s2["delta_sd"]), color=[colours[k] for k in s2["category"]], capsize=2
    )
    bx.set_yticks(y, [f"{k} ({w})" for k, w in zip(s2["category"], s2["wins"])], fontsize=8)
    bx.axvline(0, color="grey", lw=0.5)
    bx.set_xlabel(f"mean Δ ± SD over genes (wins of {nb})")
    fig.suptitle(f"{nb} vs {na}, {metric_label(metric)}\n{_protocol_line(summaries)}", fontsize=8)
    save(fig, out_prefix, formats)
    return fig


def heatmap(eval_dirs_a, eval_dirs_b, out_prefix, metrics=HEATMAP_METRICS, formats=FORMATS):
    """Per-gene heatmap of both models' scores and their deltas, genes sorted by the first metric's delta.

    Rows are the genes of the evaluation (largest delta B - A on top; genes without a delta
    last); left panel the scores of A and B per metric, right panel the deltas.

    Parameters
    ----------
    eval_dirs_a, eval_dirs_b
        Evaluation folders of model A and model B (one per fold); values are means over folds.
    out_prefix
        Output path without extension.
    metrics
        Metric columns; the first one sorts the genes.
    formats
        File formats.

    Returns
    -------
    matplotlib.figure.Figure
        ``fig.axes[0]`` carries the gene labels.
    """
    tables = []
    for metric in metrics:
        res, (na, nb), summaries = _comparison(eval_dirs_a, eval_dirs_b, metric)
        s1 = res["s1"].set_index("gene")
        lab = metric_label(metric).replace(" (pooled)", "").replace(" (per tile)", " tile")
        tables.append(
            pd.DataFrame(
                {f"{lab} {na}": s1[f"{metric}_{na}"], f"{lab} {nb}": s1[f"{metric}_{nb}"], f"Δ {lab}": s1["delta"]}
            )
        )
    wide = pd.concat(tables, axis=1)
    first_delta = [c for c in wide.columns if c.startswith("Δ")][0]
    wide = wide.sort_values(first_delta, ascending=False, na_position="last", kind="stable")
    deltas = [c for c in wide.columns if c.startswith("Δ")]
    values = wide.drop(columns=deltas)
    fig = Figure(figsize=(2 + 1.1 * wide.shape[1], 1.5 + 0.22 * len(wide)), layout="constrained")
    ax, dx = fig.subplots(1, 2, width_ratios=[values.shape[1], len(deltas)])
    annot = len(wide) <= 80
    sns.heatmap(
        values.astype(float),
        ax=ax,
        cmap="viridis",
        annot=annot,
        fmt=".2f",
        annot_kws={"fontsize": 6},
        yticklabels=True,
        cbar_kws={"label": "score", "shrink": 0.5},
    )
    lim = np.nanmax(np.abs(wide[deltas].to_numpy(dtype=float))) if wide[deltas].notna().any().any() else 1.0
    sns.heatmap(
        wide[deltas].astype(float),
        ax=dx,
        cmap="RdBu_r",
        center=0,
        vmin=-lim,
        vmax=lim,
        annot=annot,
        fmt="+.2f",
        annot_kws={"fontsize": 6},
        yticklabels=False,
        cbar_kws={"label": f"Δ ({nb} − {na})", "shrink": 0.5},
    )
    ax.set_ylabel("gene")
    dx.set_ylabel("")
    ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(
        f"{nb} vs {na}, means over folds; genes sorted by {first_delta}\n{_protocol_line(summaries, 80)}", fontsize=8
    )
    save(fig, out_prefix, formats)
    return fig


# ---------------------------------------------------------------------------------------------
# spatial panels: mosaics, rescue, multi-scale


def gene_index(genes, gene, key=GENES_KEY, source="tile store"):
    """Channel of ``gene``; a gene not in the data raises :class:`InputError` naming it and the config key."""
    if gene not in genes:
        raise InputError(key, f"gene {gene!r} is not among the {len(genes)} genes of {source}")
    return list(genes).index(gene)


def _pool(x, mask, k):
    """Sum-pool a ``[H, W]`` map over tissue bins by ``k``; off-tissue (max-pooled mask) becomes NaN."""
    x, m = torch.from_numpy(np.asarray(x, dtype=np.float64)), torch.from_numpy(np.asarray(mask, dtype=bool))
    v = sum_pool(x * m, k).numpy()
    return np.where(pool_mask(m, k).numpy(), v, np.nan)


def _image_tile(image, px):
    from PIL import Image

    return np.asarray(Image.fromarray(np.asarray(image)).resize((px, px), Image.BILINEAR))


def _predictions(predictions, tiles, tiles_zarr):
    """Open each prediction store, checking shape, genes and sample against the tile store."""
    out = {}
    for name, path in predictions.items():
        store = open_predictions(path, tiles.counts.shape)
        rates, attrs = store.rates, store.attrs
        if attrs.get("genes") is not None and list(attrs["genes"]) != tiles.genes:
            raise InputError(path, f"genes differ from those of {tiles_zarr}")
        if attrs.get("sample") and tiles.sample and attrs["sample"] != tiles.sample:
            raise InputError(path, f"predicts sample {attrs['sample']!r}, not {tiles.sample!r}")
        out[name] = rates
    return out


def _scale(panels, shared):
    """(vmin, vmax) per panel: the 99.5th percentile of the tissue values, shared or per panel."""

    def top(arrays):
        v = np.concatenate([a[np.isfinite(a)].ravel() for a in arrays])
        hi = float(np.percentile(v, 99.5)) if v.size else 1.0
        return (0.0, hi if hi > 0 else 1.0)

    return [top(panels)] * len(panels) if shared else [top([p]) for p in panels]


def _show(ax, data, title, vlim=None, extent=None, cmap="magma"):
    cm = mpl.colormaps[cmap].with_extremes(bad=OFF_TISSUE)
    im = ax.imshow(
        data,
        cmap=cm,
        vmin=vlim[0] if vlim else None,
        vmax=vlim[1] if vlim else None,
        extent=extent,
        interpolation="nearest",
    )
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def mosaic(tiles_zarr, predictions, gene, out_prefix, shared_scale=True, pool=4, he_px=64, formats=FORMATS):
    """Whole-slide mosaic of one gene: H&E | truth | each model, tiles on their grid positions.

    Tiles are read one at a time. Expression is sum-pooled over ``pool x pool`` bins (counts
    and predicted rates alike; 4: 8 µm bins); off-tissue bins and grid cells without a tile are
    grey. One colour scale is shared by the truth and every model (99.5th percentile of their
    tissue values) unless ``shared_scale`` is false.

    Parameters
    ----------
    tiles_zarr
        The test patient's tile store.
    predictions
        Model name -> ``predictions.zarr`` of the fold whose test patient is ``tiles_zarr``.
    gene
        Gene to draw (config ``figures.mosaic_genes``); not in the data: :class:`InputError`.
    out_prefix
        Output path without extension.
    shared_scale
        One colour scale per gene (config ``figures.shared_scale``), else one per panel.
    pool
        Display bin size in 2 µm bins.
    he_px
        Pixels per tile of the H&E panel.
    formats
        File formats.

    Returns
    -------
    matplotlib.figure.Figure
    """
    tiles = open_tiles(tiles_zarr)
    g = gene_index(tiles.genes, gene, source=str(tiles_zarr))
    preds = _predictions(predictions, tiles, tiles_zarr)
    tb = int(tiles.counts.shape[-1])
    if tb % pool:
        raise InputError("pool", f"{pool} does not divide the tile size {tb}")
    grid = np.asarray(tiles.grid[:])
    rows, cols = (int(v) for v in tiles.attrs.get("grid_shape", grid.max(0) + 1))
    d = tb // pool
    he = np.full((rows * he_px, cols * he_px, 3), 211, np.uint8)  # lightgrey where no tile
    maps = {name: np.full((rows * d, cols * d), np.nan) for name in ["truth", *preds]}
    for t, (r, c) in enumerate(grid):
        m = np.asarray(tiles.mask[t])
        he[r * he_px : (r + 1) * he_px, c * he_px : (c + 1) * he_px] = _image_tile(tiles.images[t], he_px)
        maps["truth"][r * d : (r + 1) * d, c * d : (c + 1) * d] = _pool(tiles.counts[t, g], m, pool)
        for name, rates in preds.items():
            maps[name][r * d : (r + 1) * d, c * d : (c + 1) * d] = _pool(rates[t, g], m, pool)
    extent = (0, cols, rows, 0)
    # a ranking model's exp(score) is not a count: it gets its own scale, or it would set everyone's
    relative = {n for n, p in predictions.items() if open_predictions(p).relative}
    counted = [n for n in maps if n not in relative]
    shared = dict(zip(counted, _scale([maps[n] for n in counted], shared_scale)))
    vlims = [shared[n] if n in shared else _scale([maps[n]], False)[0] for n in maps]
    fig = Figure(figsize=(3.2 * (len(maps) + 1), 3.4 * rows / max(cols, 1) + 0.8), layout="constrained")
    axes = fig.subplots(1, len(maps) + 1)
    axes[0].imshow(he, extent=extent)
    axes[0].set_title("H&E", fontsize=8)
    axes[0].set_xticks([]), axes[0].set_yticks([])
    for ax, (name, data), vlim in zip(axes[1:], maps.items(), vlims):
        title = "truth (counts)" if name == "truth" else name + (" (relative, own scale)" if name in relative else "")
        im = _show(ax, data, title, vlim, extent)
        if not shared_scale or name in relative:
            fig.colorbar(im, ax=ax, shrink=0.6)
        else:
            shared_im = im
    if shared_scale:
        fig.colorbar(shared_im, ax=[a for a, n in zip(axes[1:], maps) if n not in relative], shrink=0.6,
                     label=f"sum per {2 * pool:g} µm bin")
    scale = "one colour scale shared by all panels" if shared_scale else "one colour scale per panel"
    fig.suptitle(
        f"{gene}, sample {tiles.sample}: {2 * pool:g} µm bins; {scale}; grey: off tissue", fontsize=9
    )
    save(fig, out_prefix, formats)
    return fig


def _tile_totals(tiles):
    """Masked total count per (tile, gene), read tile by tile: ``[T, G]``."""
    counts, mask = tiles.counts, tiles.mask
    return np.stack([(np.asarray(counts[t]) * np.asarray(mask[t])[None]).sum((1, 2)) for t in range(counts.shape[0])])


def rescue_panels(
    tiles_zarr,
    eval_dir_a,
    eval_dir_b,
    pred_a,
    pred_b,
    out_prefix,
    top_k=4,
    metric="pcc_2um_pooled",
    pool=1,
    formats=FORMATS,
):
    """H&E, truth, model A, model B for the top-k genes by delta (B - A), each on the tile where it is most expressed.

    Parameters
    ----------
    tiles_zarr
        The fold's test patient tile store.
    eval_dir_a, eval_dir_b
        Evaluation folders of A and B on that fold (the delta is computed from their per-gene tables).
    pred_a, pred_b
        Their ``predictions.zarr``.
    out_prefix
        Output path without extension.
    top_k
        Number of genes (config ``figures.rescue_top_k``).
    metric
        Metric whose delta ranks the genes.
    pool
        Display bin size in 2 µm bins (1: native).
    formats
        File formats.

    Returns
    -------
    matplotlib.figure.Figure
    """
    a, sa = read_evaluations([eval_dir_a])
    b, sb = read_evaluations([eval_dir_b])
    tiles = open_tiles(tiles_zarr)
    genes = tiles.genes
    for s in (*sa, *sb):
        if s.get("test_sample") != tiles.sample:
            raise InputError(s["dir"], f"evaluates sample {s.get('test_sample')!r}, not {tiles.sample!r}")
    na, nb = sa[0]["model"], sb[0]["model"]
    delta = b.set_index("gene")[metric] - a.set_index("gene")[metric]
    top = delta.dropna().sort_values(ascending=False, kind="stable").head(int(top_k))
    if top.empty:
        raise InputError(eval_dir_b, f"no gene has a finite {metric} in both evaluations")
    preds = _predictions({na: pred_a, nb: pred_b}, tiles, tiles_zarr)
    totals = _tile_totals(tiles)
    fig = Figure(figsize=(10, 2.6 * len(top) + 0.6), layout="constrained")
    axes = fig.subplots(len(top), 4, squeeze=False)
    for row, (gene, dv) in zip(axes, top.items()):
        g = genes.index(gene)
        t = int(np.argmax(totals[:, g]))
        m = np.asarray(tiles.mask[t])
        maps = [_pool(tiles.counts[t, g], m, pool)] + [_pool(p[t, g], m, pool) for p in preds.values()]
        row[0].imshow(np.asarray(tiles.images[t]))
        row[0].set_xticks([]), row[0].set_yticks([])
        row[0].set_title(
            f"{gene}: Δ = {dv:+.3f}\nH&E, tile {t} (grid {tuple(int(v) for v in tiles.grid[t])})", fontsize=8
        )
        vlim = _scale(maps, True)[0]
        for ax, data, title in zip(row[1:], maps, ["truth (counts)", na, nb]):
            im = _show(ax, data, title, vlim)
        fig.colorbar(im, ax=list(row[1:]), shrink=0.8)
    fig.suptitle(
        f"Top {len(top)} genes by Δ {metric_label(metric)} ({nb} − {na}), fold {sa[0]['fold']}; "
        f"each on its tile with the most counts; {2 * pool:g} µm bins",
        fontsize=9,
    )
    save(fig, out_prefix, formats)
    return fig


def multiscale_panels(tiles_zarr, pred_zarr, genes, out_prefix, model=None, genes_key=GENES_KEY, formats=FORMATS):
    """Truth and prediction at 8, 4 and 2 µm for each gene, on the tile where the gene has the most counts.

    Parameters
    ----------
    tiles_zarr
        The fold's test patient tile store.
    pred_zarr
        ``predictions.zarr`` of the multi-scale model (config ``figures.multiscale_model``).
    genes
        Genes to draw; one not in the data raises :class:`InputError` naming ``genes_key``.
    out_prefix
        Output path without extension.
    model
        Model name for titles (default: the store's ``model`` attribute, else its folder).
    genes_key
        Config key the genes come from (for error messages).
    formats
        File formats.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if not genes:
        raise InputError(genes_key, "no genes to draw")
    tiles = open_tiles(tiles_zarr)
    names = tiles.genes
    idx = [gene_index(names, gene, genes_key, str(tiles_zarr)) for gene in genes]
    store = open_predictions(pred_zarr, tiles.counts.shape)
    rates, attrs = store.rates, store.attrs
    model = model or attrs.get("model") or Path(pred_zarr).parent.parent.name
    totals = _tile_totals(tiles)
    scales = (4, 2, 1)
    fig = Figure(figsize=(9, 5.2 * len(genes) + 0.4), layout="constrained")
    axes = fig.subplots(2 * len(genes), len(scales), squeeze=False)
    for i, (gene, g) in enumerate(zip(genes, idx)):
        t = int(np.argmax(totals[:, g]))
        m = np.asarray(tiles.mask[t])
        for j, k in enumerate(scales):
            maps = [_pool(tiles.counts[t, g], m, k), _pool(rates[t, g], m, k)]
            vlim = _scale(maps, True)[0]  # per scale: sums grow with the bin area
            for r, (data, what) in enumerate(zip(maps, ("truth", model))):
                im = _show(axes[2 * i + r, j], data, f"{gene} {what}, {2 * k} µm (tile {t})", vlim)
            fig.colorbar(im, ax=[axes[2 * i, j], axes[2 * i + 1, j]], shrink=0.7)
    fig.suptitle(
        f"{model}, sample {tiles.sample}: sums over 8, 4, 2 µm bins; "
        "colour scale shared by truth and prediction at each scale",
        fontsize=9,
    )
    save(fig, out_prefix, formats)
    return fig


# ---------------------------------------------------------------------------------------------
# training curves and noise ceiling


def training_curves(log_csvs, out_prefix, formats=FORMATS):
    """Training and validation loss per epoch (and the other ``val_*`` columns), one column per model.

    Parameters
    ----------
    log_csvs
        ``results/models/{model}/{fold}/log.csv`` files; model and fold are read from the path.
    out_prefix
        Output path without extension.
    formats
        File formats.

    Returns
    -------
    matplotlib.figure.Figure
    """
    logs = []
    for path in map(Path, log_csvs):
        df = pd.read_csv(path)
        _require(df, ["epoch", "train_loss", "val_loss"], path)
        logs.append((path.parent.parent.name, path.parent.name, df))
    if not logs:
        raise InputError("log_csvs", "no log.csv files given")
    models = list(dict.fromkeys(mo for mo, _, _ in logs))
    folds = sorted({f for _, f, _ in logs})
    extra = sorted({c for _, _, df in logs for c in df.columns if c.startswith("val_") and c != "val_loss"})
    colours = dict(zip(folds, sns.color_palette("tab10", len(folds))))
    fig = Figure(figsize=(3.2 * len(models), 2.6 * (1 + len(extra))), layout="constrained")
    axes = fig.subplots(1 + len(extra), len(models), squeeze=False)
    for j, mo in enumerate(models):
        for m2, fold, df in logs:
            if m2 != mo:
                continue
            ax = axes[0, j]
            ax.plot(df["epoch"], df["train_loss"], color=colours[fold], label=f"{fold} train")
            ax.plot(df["epoch"], df["val_loss"], color=colours[fold], ls="--", label=f"{fold} validation")
            for i, col in enumerate(extra, start=1):
                if col in df:
                    axes[i, j].plot(df["epoch"], df[col], color=colours[fold], ls="--", label=fold)
        axes[0, j].set_title(mo, fontsize=8)
        axes[0, j].set_ylabel("loss (model's own)")
        for i, col in enumerate(extra, start=1):
            axes[i, j].set_ylabel(col)
        axes[-1, j].set_xlabel("epoch")
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(
        "Training (solid) and validation (dashed: held-out blocks of the training patients) per fold", fontsize=9
    )
    save(fig, out_prefix, formats)
    return fig


def noise_ceiling_chart(eval_dirs, out_prefix, metrics=CEILING_METRICS, formats=FORMATS):
    """Per metric and model: label-shuffle null, model score and noise ceiling (mean ± SD over folds).

    Parameters
    ----------
    eval_dirs
        Evaluation folders of every (model, fold).
    out_prefix
        Output path without extension.
    metrics
        Metric columns, one panel each.
    formats
        File formats.

    Returns
    -------
    matplotlib.figure.Figure
    """
    per_gene, summaries = read_evaluations(eval_dirs)
    kinds = {"null": "_null", "model": "", "ceiling": "_ceiling"}
    cols = [m + s for m in metrics for s in kinds.values()]
    _require(per_gene, cols, "per_gene.csv")
    mean, sd, n = fold_means(per_gene, cols)
    models = _models(summaries)
    colours = dict(zip(kinds, ["0.6", "tab:blue", "tab:green"]))
    fig = Figure(figsize=(max(3.0, 0.9 * len(models) + 1) * len(metrics), 4.2), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    width = 0.27
    for ax, metric in zip(axes, metrics):
        x = np.arange(len(models))
        for i, (kind, sfx) in enumerate(kinds.items()):
            h = [mean.at[mo, metric + sfx] for mo in models]
            e = np.nan_to_num([sd.at[mo, metric + sfx] if n.at[mo, metric + sfx] > 1 else 0 for mo in models])
            yerr = e if e.any() else None  # one fold: no spread to show
            ax.bar(x + (i - 1) * width, h, width, yerr=yerr, color=colours[kind], label=kind, capsize=2)
        for xi, mo in zip(x, models):
            c, v = mean.at[mo, metric + "_ceiling"], mean.at[mo, metric]
            if np.isfinite(c) and c > 0 and np.isfinite(v):
                top = max(v, c) + np.nan_to_num(max(sd.at[mo, metric], sd.at[mo, metric + "_ceiling"]))
                ax.annotate(
                    f"{v / c:.0%}",
                    (xi + width / 2, top),
                    xytext=(0, 3),
                    textcoords="offset points",
                    ha="center",
                    fontsize=7,
                )
        ax.margins(y=0.1)
        ax.set_xticks(x, models, rotation=45, ha="right", fontsize=8)
        ax.set_title(metric_label(metric), fontsize=9)
        ax.axhline(0, color="black", lw=0.5)
    axes[0].set_ylabel("mean over genes (± SD over folds)")
    axes[0].legend(fontsize=7)
    fig.suptitle(
        "Model vs noise ceiling vs label-shuffle null; % = model / ceiling (means over genes)\n"
        + _protocol_line(summaries),
        fontsize=8,
    )
    save(fig, out_prefix, formats)
    return fig
