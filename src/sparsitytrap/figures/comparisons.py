"""Two models compared gene by gene (:func:`sparsitytrap.stats.compare`): sparsity scatter, heatmap."""

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from .. import stats
from ._common import (
    FORMATS,
    NA,
    metric_label,
    model_order,
    protocol_line,
    read_evaluations,
    require,
    save,
    suptitle,
    wrap,
)

HEATMAP_METRICS = ("pcc_2um_pooled", "ssim_2um_pertile")


def _pair(eval_dirs_a, eval_dirs_b):
    """Per-gene tables of A and B, their names, and the summaries of both."""
    a, sa = read_evaluations(eval_dirs_a)
    b, sb = read_evaluations(eval_dirs_b)
    return (a, b), (model_order(sa)[0], model_order(sb)[0]), sa + sb


def _compare(tables, names, metric, categories=None):
    """stats.compare of B vs A on ``metric``, categories from the per-gene tables unless given."""
    a, b = tables
    for side, df in zip(names, tables):
        require(df, [metric, "sparsity"], f"per_gene.csv of {side}")
    if categories is None and "category" in a.columns:
        categories = dict(zip(a["gene"], a["category"]))
    return stats.compare(a, b, metric, categories=categories, names=names)


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
    tables, (na, nb), summaries = _pair(eval_dirs_a, eval_dirs_b)
    res = _compare(tables, (na, nb), metric, categories)
    s1, s2, summ = res["s1"], res["s2"], res["summary"].iloc[0]
    c = s1[s1["compared"]]
    colours = _category_colours(s1["category"])
    fig = Figure(figsize=(11, 5), layout="constrained")
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
    ax.set_title(f"{stat}, n = {len(c)} genes", fontsize=8)  # a title, not a box in the plot: hides no point
    ax.set_xlabel("sparsity: % of tissue bins with zero count (test patient, mean over folds)")
    ax.set_ylabel(wrap(f"Δ {metric_label(metric)} ({nb} − {na})", 45))
    if c.empty:  # e.g. SSIM of a ranking model: no gene has a value for both
        for axis in (ax, bx):
            axis.text(
                0.5,
                0.5,
                f"{NA}: no gene has {metric_label(metric)} for both models",
                ha="center",
                transform=axis.transAxes,
                fontsize=8,
                wrap=True,
            )
    else:  # below the plot, where it covers no point
        fig.legend(
            *ax.get_legend_handles_labels(), loc="outside lower center", ncols=min(6, len(colours) + 1), fontsize=7
        )
    s2 = s2.dropna(subset=["delta_mean"]).sort_values("delta_mean")
    y = np.arange(len(s2))
    bx.barh(
        y, s2["delta_mean"], xerr=np.nan_to_num(s2["delta_sd"]), color=[colours[k] for k in s2["category"]], capsize=2
    )
    bx.set_yticks(y, [f"{k} ({w})" for k, w in zip(s2["category"], s2["wins"])], fontsize=8)
    bx.axvline(0, color="grey", lw=0.5)
    bx.set_xlabel(wrap(f"mean Δ ± SD over genes per category (wins of {nb})", 32))
    suptitle(fig, f"{nb} vs {na}, {metric_label(metric)}\n{protocol_line(summaries)}", fontsize=8)
    save(fig, out_prefix, formats)
    return fig


def _heatmap_block(ax, table, annot, fmt, label, **kw):
    """One seaborn heatmap with its own colour bar; NaN cells (no value: a ranking model's SSIM) read "n/a"."""
    sns.heatmap(
        table.astype(float),
        ax=ax,
        annot=annot,
        fmt=fmt,
        annot_kws={"fontsize": 6},
        yticklabels=False,
        cbar_kws={"shrink": 0.8, "pad": 0.03},
        **kw,
    )
    bar = ax.collections[0].colorbar
    bar.set_label(label, fontsize=7)
    bar.ax.tick_params(labelsize=7)
    if annot:
        for i, j in zip(*np.nonzero(table.isna().to_numpy())):
            ax.text(j + 0.5, i + 0.5, NA, ha="center", va="center", fontsize=6, color="0.3")
    ax.set_ylabel("")
    ax.tick_params(axis="x", labelsize=7)


def heatmap(eval_dirs_a, eval_dirs_b, out_prefix, metrics=HEATMAP_METRICS, formats=FORMATS):
    """Per-gene heatmap of both models' scores, their label-shuffle nulls and the deltas, one scale per metric.

    Rows are the genes of the evaluation (largest delta B - A of the first metric on top; genes
    without a delta last). Per metric: the scores of A and B and their nulls (means over folds)
    on one colour scale of that metric, then the delta B - A (over the folds where both are
    defined, :func:`sparsitytrap.stats.compare`) on its own diverging scale. A cell without a
    value (a ranking model's count-scale metric) reads "n/a".

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
        ``fig.axes[0]`` carries the gene labels; ``fig.axes[2 * i]`` and ``fig.axes[2 * i + 1]``
        are metric ``i``'s scores and delta.
    """
    tables, (na, nb), summaries = _pair(eval_dirs_a, eval_dirs_b)
    means = pd.concat(tables).groupby(["model", "gene"], sort=False).mean(numeric_only=True)
    blocks = []
    for metric in metrics:
        res = _compare(tables, (na, nb), metric)
        require(means, [metric + "_null"], "per_gene.csv")
        scores = pd.DataFrame(
            {
                label: means.loc[model, col]
                for col, what in ((metric, ""), (metric + "_null", "null "))
                for model, label in ((na, f"{what}A"), (nb, f"{what}B"))  # short: names are in the title
            }
        )
        blocks.append((metric, scores, res["s1"].set_index("gene")["delta"].rename("Δ B − A")))
    order = blocks[0][2].sort_values(ascending=False, na_position="last", kind="stable").index
    n_cols = sum(s.shape[1] + 1 for _, s, _ in blocks)
    fig = Figure(figsize=(2.5 + 1.6 * len(metrics) + 0.55 * n_cols, 2.4 + 0.22 * len(order)), layout="constrained")
    axes = fig.subplots(1, 2 * len(blocks), width_ratios=[w for _, s, _ in blocks for w in (s.shape[1], 1.2)])
    annot = len(order) <= 80
    for i, (metric, scores, delta) in enumerate(blocks):
        scores, delta = scores.reindex(order), delta.reindex(order).to_frame()
        label = metric_label(metric)
        _heatmap_block(axes[2 * i], scores, annot, ".2f", label, cmap="viridis")
        finite = delta.to_numpy(dtype=float)
        lim = np.nanmax(np.abs(finite)) if np.isfinite(finite).any() else 1.0
        _heatmap_block(
            axes[2 * i + 1], delta, annot, "+.2f", wrap(f"Δ {label}", 24), cmap="RdBu_r", center=0, vmin=-lim, vmax=lim
        )
        axes[2 * i].set_title(label, fontsize=8)
    axes[0].set_yticks(np.arange(len(order)) + 0.5, order, fontsize=7)
    axes[0].set_ylabel("gene", fontsize=8)
    suptitle(
        fig,
        f"B = {nb} vs A = {na}, means over folds; genes sorted by Δ {metric_label(metrics[0])}; one colour scale "
        f"per metric; 'null' columns: each model's label-shuffle null\n{protocol_line(summaries, 80)}",
        fontsize=8,
    )
    save(fig, out_prefix, formats)
    return fig
