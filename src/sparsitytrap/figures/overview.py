"""Overview of every model: results table, bar chart with tile-bootstrap intervals, noise ceiling."""

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from ..bootstrap import fold_mean, interval
from ..io import atomic_path
from ..stores import evaluation
from ._common import (
    COUNT_SCALE,
    FORMATS,
    NA,
    fold_means,
    fraction_of_ceiling,
    mean_sd,
    metric_label,
    model_order,
    protocol_line,
    read_evaluations,
    relative_models,
    require,
    save,
    suptitle,
    wrap,
)

TABLE_METRICS = ("pcc_2um_pooled", "pcc_4um_pooled", "pcc_8um_pooled", "ssim_2um_pertile", "ratio_pooled")
BAR_METRICS = ("pcc_8um_pooled", "pcc_2um_pooled", "ssim_2um_pertile")
CEILING_METRICS = ("pcc_2um_pooled", "pcc_8um_pooled", "scc_2um_pooled", "ssim_2um_pertile")


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
    relative = relative_models(summaries)
    cells = [
        [
            (
                f"{NA}: relative scores, not counts"
                if mo in relative and m in COUNT_SCALE
                else f"{mean_sd(mean.at[mo, m], sd.at[mo, m], n.at[mo, m])}\n"
                f"null {mean_sd(mean.at[mo, m + '_null'], np.nan, 1)} | "
                f"ceiling {mean_sd(mean.at[mo, m + '_ceiling'], np.nan, 1)}"
            )
            for m in metrics
        ]
        for mo in models
    ]
    fig = Figure(figsize=(2.3 * len(metrics) + 2.5, 0.6 * len(models) + 1.4), layout="constrained")
    ax = fig.add_subplot()
    ax.axis("off")
    table = ax.table(
        cellText=cells,
        rowLabels=[f"{mo} ({n.at[mo, metrics[0]]} folds)" for mo in models],
        colLabels=[metric_label(m) for m in metrics],
        bbox=(0, 0, 1, 1),  # the whole table, row labels included, inside the axes the layout sized
        cellLoc="center",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(8)
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


def _na_labels(ax, x, heights):
    """ "n/a" just above the zero line where a model has no value (a ranking model's count-scale metric)."""
    for xi, h in zip(x, heights):
        if not np.isfinite(h):
            ax.annotate(NA, (xi, 0), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7)


def _collapse_labels(models, ratio, collapse):
    """Tick labels with the mean prediction/target ratio of the models whose ratio is off by ``collapse``."""
    far = {mo for mo in models if np.isfinite(ratio[mo]) and (ratio[mo] > collapse or ratio[mo] < 1 / collapse)}
    return [f"{mo}\nratio {ratio[mo]:.1f}x" if mo in far else mo for mo in models], far


def bar_chart(
    eval_dirs, out_prefix, metrics=BAR_METRICS, bootstrap=1000, bootstrap_seed=0, collapse=1.5, formats=FORMATS
):
    """Bars of each model's mean per-gene score per metric, with 95 % bootstrap intervals over tiles.

    The label-shuffle null is drawn as a black tick on each bar. A model whose mean
    prediction/target ratio is above ``collapse`` or below ``1 / collapse`` gets the ratio in
    red under its name (the seeds' "collapse": a calibrated-looking PCC with rates off by a
    factor); under the bars, so that it never covers one. A metric a model has no value for (a
    ranking model's SSIM) is marked "n/a".

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
    cols = list(metrics) + [m + "_null" for m in metrics] + ["ratio_pooled"]
    require(per_gene, cols, "per_gene.csv")
    mean, sd, n = fold_means(per_gene, cols)
    models = model_order(summaries)
    labels, far = _collapse_labels(models, mean["ratio_pooled"], collapse)
    fig = Figure(figsize=(max(3.0, 0.8 * len(models) + 1) * len(metrics), 4.6), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    colours = dict(zip(models, sns.color_palette("tab10", len(models))))
    for ax, metric in zip(axes, metrics):
        x = np.arange(len(models))
        heights = np.array([mean.at[mo, metric] for mo in models])
        ci = np.array(
            [
                bootstrap_interval([s for s in summaries if s["model"] == mo], metric, bootstrap, bootstrap_seed)
                if np.isfinite(h)
                else (np.nan, np.nan)
                for mo, h in zip(models, heights)
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
        _na_labels(ax, x, heights)
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
        for tick, mo in zip(ax.get_xticklabels(), models):
            tick.set_color("firebrick" if mo in far else "black")
        ax.set_ylabel(wrap(f"mean over genes, {metric_label(metric)}", 40))
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(metric_label(metric), fontsize=9)
        ax.margins(y=0.12)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", fontsize=7)
    suptitle(
        fig,
        f"95 % bootstrap intervals over tiles ({bootstrap} resamples, within folds); red: mean pred/target ratio "
        f"beyond {collapse:g}x\n{protocol_line(summaries)}",
        fontsize=8,
    )
    save(fig, out_prefix, formats)
    return fig


def noise_ceiling_chart(eval_dirs, out_prefix, metrics=CEILING_METRICS, formats=FORMATS):
    """Per metric and model: label-shuffle null, model score and noise ceiling (mean ± SD over folds).

    Each model is labelled with how far its score went from the null towards the ceiling,
    :func:`fraction_of_ceiling` of the means: 0 % is chance, 100 % the ceiling; "n/a" where the
    ceiling is not above the null or is missing (no SSIM ceiling on real data), or where the
    model has no value (a ranking model's SSIM).

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
    fig = Figure(figsize=(max(3.0, 0.9 * len(models) + 1) * len(metrics), 4.4), layout="constrained")
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
            values = [mean.at[mo, metric + sfx] for sfx in kinds.values()]
            spread = [sd.at[mo, metric + sfx] for sfx in kinds.values()]
            frac = fraction_of_ceiling(*(mean.at[mo, metric + sfx] for sfx in ("", "_null", "_ceiling")))
            top = np.nanmax([0.0, *(np.add(values, np.nan_to_num(spread)))])  # above every bar and error bar
            ax.annotate(
                f"{frac:.0%}" if np.isfinite(frac) else NA,
                (xi, top),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                fontsize=7,
            )
        ax.margins(y=0.12)
        ax.set_xticks(x, models, rotation=45, ha="right", fontsize=8)
        ax.set_title(metric_label(metric), fontsize=9)
        ax.axhline(0, color="black", lw=0.5)
    axes[0].set_ylabel("mean over genes (± SD over folds)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=7)
    suptitle(
        fig,
        "Model vs noise ceiling vs label-shuffle null; % = (model − null) / (ceiling − null) of the means over "
        "genes: 0 % chance, 100 % the ceiling\n" + protocol_line(summaries),
        fontsize=8,
    )
    save(fig, out_prefix, formats)
    return fig
