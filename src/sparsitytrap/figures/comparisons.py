"""Two models compared gene by gene (:func:`sparsitytrap.stats.compare`): sparsity scatter, heatmap."""

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from .. import stats
from ._common import FORMATS, metric_label, model_order, protocol_line, read_evaluations, require, save

HEATMAP_METRICS = ("pcc_2um_pooled", "ssim_2um_pertile")


def _comparison(eval_dirs_a, eval_dirs_b, metric, categories=None):
    """stats.compare of B vs A on ``metric``, categories from the per-gene tables unless given."""
    a, sa = read_evaluations(eval_dirs_a)
    b, sb = read_evaluations(eval_dirs_b)
    names = (model_order(sa)[0], model_order(sb)[0])
    require(a, [metric, "sparsity"], eval_dirs_a[0])
    require(b, [metric, "sparsity"], eval_dirs_b[0])
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
    fig.suptitle(f"{nb} vs {na}, {metric_label(metric)}\n{protocol_line(summaries)}", fontsize=8)
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
        f"{nb} vs {na}, means over folds; genes sorted by {first_delta}\n{protocol_line(summaries, 80)}", fontsize=8
    )
    save(fig, out_prefix, formats)
    return fig
