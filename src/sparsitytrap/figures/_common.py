"""What every figure shares: saving, labels, reading evaluation folders, means over folds.

Evaluation folders are read only through :mod:`sparsitytrap.stores.evaluation`.
"""

import re
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ..io import atomic_path
from ..metrics import METRICS
from ..stores import evaluation

FORMATS = ("png", "pdf")
DPI = 150
#: Metrics that need rates on the count scale (``relative_ok`` false): n/a for a ranking model's relative scores.
COUNT_SCALE = tuple(m for m, spec in METRICS.items() if not spec.relative_ok)
NA = "n/a"


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


def wrap(label, width=60):
    """A long axis label (model names make them long) on several lines, so the layout can fit it."""
    return textwrap.fill(label, width, break_on_hyphens=False)


def suptitle(fig, text, fontsize=9):
    """The figure's title, each line wrapped to the figure's width (model names make titles long)."""
    chars = max(20, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))  # ~0.6 em per character
    lines = [textwrap.fill(line, chars, break_on_hyphens=False) for line in text.split("\n")]
    return fig.suptitle("\n".join(lines), fontsize=fontsize)


def relative_models(summaries):
    """Models whose predictions are a ranking model's relative scores (``relative_scores`` in summary.json)."""
    return {s["model"] for s in summaries if s.get("relative_scores")}


def blank_count_scale(per_gene, summaries):
    """NaN for the count-scale metrics (and their null and ceiling) of ranking models: n/a, not a number.

    SSIM on min-max scaled maps, the rate ratio and the deviance of ``exp(score)`` are computed
    by the evaluation but mean nothing; blanking them here keeps every figure from drawing them.
    """
    rows = per_gene["model"].isin(relative_models(summaries))
    cols = [m + sfx for m in COUNT_SCALE for sfx in ("", "_null", "_ceiling", "_frac_ceiling")]
    cols = [c for c in cols if c in per_gene.columns]
    per_gene.loc[rows, cols] = np.nan
    return per_gene


def fraction_of_ceiling(model, null, ceiling):
    """How far a score went from the null towards the ceiling: (model - null) / (ceiling - null).

    0 is no better than the label-shuffle null, 1 reaches the ceiling; NaN where the ceiling is
    not above the null (nothing to reach) or a value is missing. Works on scalars and arrays.
    """
    model, null, ceiling = (np.asarray(v, dtype=float) for v in (model, null, ceiling))
    span = ceiling - null
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(span > 0, (model - null) / span, np.nan)
    return out if out.ndim else float(out)


def read_evaluations(eval_dirs):
    """Per-gene tables of evaluations, concatenated, with ``model`` and ``fold`` from their summaries.

    Count-scale metrics of ranking models are NaN (:func:`blank_count_scale`).

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
    return blank_count_scale(pd.concat(frames, ignore_index=True), summaries), summaries


def model_order(summaries):
    """Model names in the order given (the config's), each once."""
    return list(dict.fromkeys(s["model"] for s in summaries))


def fold_means(per_gene, columns):
    """Mean over genes per (model, fold), then mean, SD (ddof 1) and count over folds per model."""
    per_fold = per_gene.groupby(["model", "fold"], sort=False)[list(columns)].mean()
    grouped = per_fold.groupby(level="model", sort=False)
    return grouped.mean(), grouped.std(ddof=1), grouped.count()


def mean_sd(mean, sd, n):
    if not np.isfinite(mean):
        return NA
    return f"{mean:.3f} ± {sd:.3f}" if n > 1 and np.isfinite(sd) else f"{mean:.3f}"


def protocol_line(summaries, width=110):
    """Which folds, null and ceiling the numbers come from, wrapped for a figure title."""
    folds = sorted({s["fold"] for s in summaries})
    ceilings = sorted({s["protocol"].get("ceiling_kind", "?") for s in summaries})
    line = (
        f"folds {', '.join(folds)} (each tests one held-out patient); null: label shuffle across tiles; "
        f"ceiling: {', '.join(ceilings)}"
    )
    return textwrap.fill(line, width, break_on_hyphens=False)


def require(df, columns, where):
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(where, f"missing column(s) {missing}")
