"""Overview of every model: results table, bar chart with tile-bootstrap intervals, noise ceiling."""

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from ..bootstrap import fold_mean, interval
from ..io import atomic_path
from ..metrics import METRICS
from ..stores import evaluation
from ._common import (
    FORMATS,
    fold_means,
    mean_sd,
    metric_label,
    model_order,
    protocol_line,
    read_evaluations,
    require,
    save,
)

TABLE_METRICS = ("pcc_2um_pooled", "pcc_4um_pooled", "pcc_8um_pooled", "ssim_2um_pertile", "ratio_pooled")
BAR_METRICS = ("pcc_8um_pooled", "pcc_2um_pooled", "ssim_2um_pertile")
CEILING_METRICS = ("pcc_2um_pooled", "pcc_8um_pooled", "scc_2um_pooled", "ssim_2um_pertile")
#: Metrics that need rates on the count scale (``relative_ok`` false): n/a for a ranking model's relative scores.
COUNT_SCALE = tuple(m for m, spec in METRICS.items() if not spec.relative_ok)


def _scores(eval_dirs, metrics, kinds):
    """Summaries, models in config order, and mean/SD/count over folds of each metric with each suffix."""
    per_gene, summaries = read_evaluations(eval_dirs)
    cols = [m + sfx for m in metrics for sfx in kinds.values()]
    require(per_gene, cols, "per_gene.csv")
    return summaries, model_order(summaries), fold_means(per_gene, cols)


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
    kinds = {"model": "", "null": "_null", "ceiling": "_ceiling"}
    summaries, models, (mean, sd, n) = _scores(eval_dirs, metrics, kinds)
    relative = {s["model"] for s in summaries if s.get("relative_scores")}
    cells = [
        [
            (
                "n/a: relative scores, not counts"
                if mo in relative and m in COUNT_SCALE
                else f"{mean_sd(mean.at[mo, m], sd.at[mo, m], n.at[mo, m])}\n"
                f"null {mean_sd(mean.at[mo, m + '_null'], np.nan, 1)} | "
                f"ceiling {mean_sd(mean.at[mo, m + '_ceiling'], np.nan, 1)}"
            )
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
    ax.set_title("Mean over genes, mean ± SD over folds\n" + protocol_line(summaries, 150), fontsize=8)
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


def bootstrap_interval(summaries, metric, bootstrap=1000, bootstrap_seed=0):
    """95 % interval of the mean over folds of a metric's mean over genes, tiles resampled per fold.

    The same tile bootstrap as the evaluation's and the statistics' intervals
    (:mod:`sparsitytrap.bootstrap`). Returns ``(low, high)``, or ``(nan, nan)`` when the metric
    is not resampled per tile.
    """
    reps = fold_mean([evaluation.read_per_tile(s["dir"]) for s in summaries], metric, bootstrap, bootstrap_seed)
    low, high = interval(reps) if reps is not None else (None, None)
    return (np.nan, np.nan) if low is None else (low, high)


def bar_chart(
    eval_dirs, out_prefix, metrics=BAR_METRICS, bootstrap=1000, bootstrap_seed=0, collapse=1.5, formats=FORMATS
):
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
    bootstrap, bootstrap_seed
        Bootstrap resamples of tiles (within each fold) and their seed (config
        ``evaluation.bootstrap``, ``evaluation.bootstrap_seed``).
    collapse
        Ratio factor that triggers the annotation.
    formats
        File formats.

    Returns
    -------
    matplotlib.figure.Figure
    """
    per_gene, summaries = read_evaluations(eval_dirs)
    require(per_gene, list(metrics) + [m + "_null" for m in metrics] + ["ratio_pooled"], "per_gene.csv")
    mean, sd, n = fold_means(per_gene, list(metrics) + [m + "_null" for m in metrics] + ["ratio_pooled"])
    models = model_order(summaries)
    relative = {s["model"] for s in summaries if s.get("relative_scores")}
    fig = Figure(figsize=(max(3.0, 0.8 * len(models) + 1) * len(metrics), 4.2), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    colours = dict(zip(models, sns.color_palette("tab10", len(models))))
    for ax, metric in zip(axes, metrics):
        x = np.arange(len(models))
        heights = np.array([mean.at[mo, metric] for mo in models])
        ci = np.array(
            [
                bootstrap_interval([s for s in summaries if s["model"] == mo], metric, bootstrap, bootstrap_seed)
                for mo in models
            ]
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
        f"95 % bootstrap intervals over tiles ({bootstrap} resamples, within folds)\n{protocol_line(summaries)}",
        fontsize=8,
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
    kinds = {"null": "_null", "model": "", "ceiling": "_ceiling"}
    summaries, models, (mean, sd, n) = _scores(eval_dirs, metrics, kinds)
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
        + protocol_line(summaries),
        fontsize=8,
    )
    save(fig, out_prefix, formats)
    return fig
