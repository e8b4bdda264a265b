"""Comparisons of two models per gene, tables S1-S3, Benjamini-Hochberg, bootstrap, 2x2 factorial.

Inputs are per-gene tables as written by evaluation: one row per (fold, gene) with the metric
columns of :func:`sparsitytrap.metrics.evaluate_stream` (``sparsity`` is the fraction of tissue
bins with zero count in the fold's test patient).

Conventions:

- delta = B - A; B *wins* a gene when delta > 0 (a tie is not a win).
- A gene is *compared* when both models have a finite metric (per fold; pooled: in at least
  one fold, over the folds where both are finite). Other genes are excluded and counted, and
  every win rate is wins / compared genes, so it cannot exceed 100 %.
- Pooled over folds, only genes that every fold scored are compared: with leak-free selection
  (each fold's genes chosen on its training patients) a gene chosen by some folds only is
  ``shared = False``, excluded and counted (``n_fold_specific``).
- Wilcoxon signed-rank p-values need n >= 5 compared genes (else NaN); Benjamini-Hochberg
  adjusts the p-values within each table (S2, S3).
"""

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats as ss

from .bootstrap import interval, paired_delta
from .config import defaults
from .errors import InputError
from .io import write_csv
from .stores import evaluation

MIN_WILCOXON = 5
UNASSIGNED = "Unassigned"


# ---------------------------------------------------------------------------------------------
# tests and corrections


def bh_adjust(pvalues):
    """Benjamini-Hochberg adjusted p-values (q-values); NaN stays NaN and is not counted.

    Parameters
    ----------
    pvalues
        1-D array-like of p-values in [0, 1] (NaN allowed).

    Returns
    -------
    numpy array of the same length.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    n = int(ok.sum())
    if n == 0:
        return out
    order = np.argsort(p[ok], kind="stable")
    scaled = p[ok][order] * n / np.arange(1, n + 1)
    # step-up: each q is the smallest scaled p at its rank or above
    q = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    adjusted = np.empty(n)
    adjusted[order] = q
    out[ok] = adjusted
    return out


def wilcoxon_p(delta, min_n=MIN_WILCOXON):
    """Two-sided Wilcoxon signed-rank p-value of paired differences (NaN if fewer than `min_n`).

    All-zero differences give p = 1 (no evidence of a difference).
    """
    d = np.asarray(delta, dtype=float)
    d = d[np.isfinite(d)]
    if len(d) < min_n:
        return np.nan
    if not np.any(d != 0):
        return 1.0
    return float(ss.wilcoxon(d).pvalue)


def spearman(x, y):
    """Spearman rho and its p-value over pairs where both are finite (NaN if < 3 or constant)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return np.nan, np.nan
    res = ss.spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)


# ---------------------------------------------------------------------------------------------
# one comparison: tables S1-S3


def _categories(categories):
    """gene -> category from a dict, a Series, a DataFrame (gene, category) or a TSV/CSV path."""
    if categories is None:
        return {}
    if isinstance(categories, (str, Path)):
        path = Path(categories)
        df = pd.read_csv(path, sep="\t" if path.suffix in (".tsv", ".txt") else ",")
        if not {"gene", "category"} <= set(df.columns):
            raise InputError(path, "needs columns 'gene' and 'category'")
        categories = df
    if isinstance(categories, pd.DataFrame):
        return dict(zip(categories["gene"], categories["category"]))
    return dict(categories)


def _check_table(df, name, metric):
    need = ["fold", "gene", metric]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise InputError(name, f"missing column(s) {missing} (has {list(df.columns)})")
    dup = df.duplicated(["fold", "gene"])
    if dup.any():
        fold, gene = df.loc[dup, ["fold", "gene"]].iloc[0]
        raise InputError(name, f"more than one row for fold {fold!r}, gene {gene!r}")


def _summary_stats(delta, win):
    n = len(delta)
    wins = int(np.sum(win))
    return {
        "n_genes": n,
        "delta_mean": float(np.mean(delta)) if n else np.nan,
        "delta_sd": float(np.std(delta, ddof=1)) if n > 1 else np.nan,
        "wins": f"{wins}/{n}",
        "win_rate": wins / n if n else np.nan,
        "p_wilcoxon": wilcoxon_p(delta),
    }


def per_fold_table(per_gene_a, per_gene_b, metric, categories=None, names=("A", "B")):
    """Table S1 per fold: one row per (fold, gene) with both models' metric, delta and win.

    Parameters
    ----------
    per_gene_a, per_gene_b
        Per-gene tables with columns ``fold``, ``gene``, `metric` and ``sparsity`` (fraction).
    metric
        Metric column, e.g. ``pcc_2um_pooled``.
    categories
        gene -> category (dict, DataFrame with ``gene, category``, or a TSV/CSV path).
    names
        Model names for the column headers ``{metric}_{name}``.

    Returns
    -------
    DataFrame: fold, gene, category, sparsity_pct, ``{metric}_{A}``, ``{metric}_{B}``, delta,
    compared, win (nullable boolean, NA where not compared).
    """
    _check_table(per_gene_a, "per_gene_a", metric)
    _check_table(per_gene_b, "per_gene_b", metric)
    col_a, col_b = f"{metric}_{names[0]}", f"{metric}_{names[1]}"
    if col_a == col_b:
        raise InputError("names", f"the two models need distinct names, got {names}")
    keep = ["fold", "gene", metric] + (["sparsity"] if "sparsity" in per_gene_a.columns else [])
    a = per_gene_a[keep].rename(columns={metric: col_a, "sparsity": "sparsity_a"})
    keep = ["fold", "gene", metric] + (["sparsity"] if "sparsity" in per_gene_b.columns else [])
    b = per_gene_b[keep].rename(columns={metric: col_b, "sparsity": "sparsity_b"})
    # left merges keep the input (channel) order; an outer merge would sort the genes by name
    keys = pd.concat([a[["fold", "gene"]], b[["fold", "gene"]]]).drop_duplicates()
    df = keys.merge(a, on=["fold", "gene"], how="left").merge(b, on=["fold", "gene"], how="left")
    # sparsity is a property of the test patient's counts: the same for both models
    sparsity = df.get("sparsity_a", pd.Series(np.nan, index=df.index))
    if "sparsity_b" in df:
        sparsity = sparsity.fillna(df["sparsity_b"])
    cat = _categories(categories)
    out = pd.DataFrame(
        {
            "fold": df["fold"],
            "gene": df["gene"],
            "category": [cat.get(g, UNASSIGNED) for g in df["gene"]],
            "sparsity_pct": 100 * sparsity.astype(float),
            col_a: df[col_a].astype(float),
            col_b: df[col_b].astype(float),
        }
    )
    out["delta"] = out[col_b] - out[col_a]
    out["compared"] = np.isfinite(out["delta"])
    out["win"] = pd.array(np.where(out["compared"], out["delta"] > 0, pd.NA), dtype="boolean")
    return out.reset_index(drop=True)


def pooled_table(folds_table, metric, names=("A", "B")):
    """Table S1 pooled over folds: per gene, means over the folds where both models are finite.

    Returns
    -------
    DataFrame: gene, category, sparsity_pct (mean over folds), both metrics, delta, n_folds,
    shared (every fold scored the gene), compared, win.
    """
    col_a, col_b = f"{metric}_{names[0]}", f"{metric}_{names[1]}"
    n_total = folds_table["fold"].nunique()
    rows = []
    for gene, g in folds_table.groupby("gene", sort=False):
        both = g[g["compared"]]
        rows.append(
            {
                "gene": gene,
                "category": g["category"].iloc[0],
                "sparsity_pct": g["sparsity_pct"].mean(),
                col_a: both[col_a].mean() if len(both) else np.nan,
                col_b: both[col_b].mean() if len(both) else np.nan,
                "delta": both["delta"].mean() if len(both) else np.nan,
                "n_folds": len(both),
                "shared": g["fold"].nunique() == n_total,
            }
        )
    out = pd.DataFrame(rows)
    out["compared"] = (out["n_folds"] > 0) & out["shared"]
    out["win"] = pd.array(np.where(out["compared"], out["delta"] > 0, pd.NA), dtype="boolean")
    return out


def category_table(s1):
    """Table S2: per category n_genes, n_excluded, mean sparsity, mean/SD delta, Wilcoxon p, BH q, wins."""
    rows = []
    for category, g in s1.groupby("category", sort=False):
        c = g[g["compared"]]
        row = {"category": category}
        row.update(_summary_stats(c["delta"].to_numpy(), c["win"].to_numpy(dtype=bool)))
        row["n_excluded"] = int((~g["compared"]).sum())
        row["sparsity_pct_mean"] = c["sparsity_pct"].mean()
        rows.append(row)
    cols = ["category", "n_genes", "n_excluded", "sparsity_pct_mean", "delta_mean", "delta_sd",
            "p_wilcoxon", "wins", "win_rate"]  # fmt: skip
    out = pd.DataFrame(rows, columns=cols)
    out["q_bh"] = bh_adjust(out["p_wilcoxon"])
    return out


def sparsity_quartiles(sparsity):
    """Quartile 1-4 of each value by rank (ties broken by order): four groups of equal size.

    Rank-based groups never collapse, unlike quantile edges, when many genes share a sparsity.
    """
    s = np.asarray(sparsity, dtype=float)
    pos = np.empty(len(s), dtype=int)
    pos[np.argsort(s, kind="stable")] = np.arange(len(s))
    return pos * 4 // max(len(s), 1) + 1


def quartile_table(s1):
    """Table S3: compared genes in sparsity quartiles (Q1 least sparse): range, n, delta, wins, p, q."""
    c = s1[s1["compared"]].copy()
    c["quartile"] = sparsity_quartiles(c["sparsity_pct"])
    rows = []
    for q, g in c.groupby("quartile", sort=True):
        lo, hi = g["sparsity_pct"].min(), g["sparsity_pct"].max()
        row = {"quartile": f"Q{q}", "sparsity_min_pct": lo, "sparsity_max_pct": hi, "range": f"{lo:.1f}-{hi:.1f} %"}
        row.update(_summary_stats(g["delta"].to_numpy(), g["win"].to_numpy(dtype=bool)))
        rows.append(row)
    cols = ["quartile", "sparsity_min_pct", "sparsity_max_pct", "range", "n_genes", "delta_mean", "delta_sd",
            "wins", "win_rate", "p_wilcoxon"]  # fmt: skip
    out = pd.DataFrame(rows, columns=cols)
    out["q_bh"] = bh_adjust(out["p_wilcoxon"])
    return out


def compare(per_gene_a, per_gene_b, metric, categories=None, names=("A", "B")):
    """One comparison, B vs A (delta = B - A), on one metric: tables S1-S3 and a summary.

    Parameters
    ----------
    per_gene_a, per_gene_b
        Per-gene tables, one row per (fold, gene), with columns ``fold``, ``gene``, `metric`,
        ``sparsity`` (fraction of tissue bins with zero count).
    metric
        Metric column, e.g. ``pcc_2um_pooled``.
    categories
        gene -> category (dict, DataFrame with ``gene, category``, or a TSV/CSV path); genes
        without one are ``Unassigned``.
    names
        Names of A and B, used in column headers.

    Returns
    -------
    dict of DataFrames
        ``s1`` (per gene, pooled over folds), ``s1_folds`` (per fold and gene), ``s2`` (per
        category), ``s3`` (per sparsity quartile), ``summary`` (one row: genes compared and
        excluded, mean metrics, mean delta, wins, win rate, paired Wilcoxon p across genes,
        Spearman rho between sparsity and delta with its p).
    """
    folds = per_fold_table(per_gene_a, per_gene_b, metric, categories, names)
    s1 = pooled_table(folds, metric, names)
    c = s1[s1["compared"]]
    col_a, col_b = f"{metric}_{names[0]}", f"{metric}_{names[1]}"
    rho, rho_p = spearman(c["sparsity_pct"], c["delta"])
    summary = {
        "metric": metric,
        "model_a": names[0],
        "model_b": names[1],
        "n_folds": folds["fold"].nunique(),
        "n_excluded": int((~s1["compared"]).sum()),
        "n_fold_specific": int((~s1["shared"]).sum()),
        "mean_a": c[col_a].mean(),
        "mean_b": c[col_b].mean(),
    }
    summary.update(_summary_stats(c["delta"].to_numpy(), c["win"].to_numpy(dtype=bool)))
    summary.update({"spearman_rho": rho, "spearman_p": rho_p})
    return {
        "s1": s1,
        "s1_folds": folds,
        "s2": category_table(s1),
        "s3": quartile_table(s1),
        "summary": pd.DataFrame([summary]),
    }


# ---------------------------------------------------------------------------------------------
# 2x2 factorial: decoder x loss


def decompose_2x2(table, metric, decoders=("img2st", "hist2st"), losses=("mse", "poisson")):
    """Loss effect, decoder effect and interaction of a 2 x 2 (decoder x loss) design, per fold.

    With cells ``c[decoder][loss]`` (the metric's mean over genes in one fold), reference
    levels ``decoders[0]``, ``losses[0]`` and the others ``decoders[1]``, ``losses[1]``:

    - loss effect = mean over decoders of (c[d][loss1] - c[d][loss0]) (e.g. Poisson - MSE);
    - decoder effect = mean over losses of (c[dec1][l] - c[dec0][l]) (e.g. hist2st - img2st);
    - interaction = (c[dec1][loss1] - c[dec1][loss0]) - (c[dec0][loss1] - c[dec0][loss0]),
      i.e. (E' - D') - (F - G) in the seeds' names.

    Parameters
    ----------
    table
        Rows with columns ``fold``, ``decoder``, ``loss``, `metric`, and optionally ``gene``
        (then, per fold, only genes with a finite metric in all four cells are averaged).
    metric
        Metric column.
    decoders, losses
        (reference, other) levels.

    Returns
    -------
    DataFrame: one row per fold, then rows ``mean`` and ``sd`` (over folds, ddof 1); columns
    fold, n_genes, the four cells ``{decoder}_{loss}``, loss_effect, decoder_effect, interaction.
    """
    missing = [c for c in ("fold", "decoder", "loss", metric) if c not in table.columns]
    if missing:
        raise InputError("table", f"missing column(s) {missing} (has {list(table.columns)})")
    cells = [(d, l) for d in decoders for l in losses]  # noqa: E741
    rows = []
    for fold, f in table.groupby("fold", sort=False):
        rows.append({"fold": fold, **_fold_cells(f, fold, metric, cells)})
    out = pd.DataFrame(rows)
    (d0, d1), (l0, l1) = decoders, losses
    c = {cell: out[f"{cell[0]}_{cell[1]}"] for cell in cells}
    out["loss_effect"] = ((c[d0, l1] - c[d0, l0]) + (c[d1, l1] - c[d1, l0])) / 2
    out["decoder_effect"] = ((c[d1, l0] - c[d0, l0]) + (c[d1, l1] - c[d0, l1])) / 2
    out["interaction"] = (c[d1, l1] - c[d1, l0]) - (c[d0, l1] - c[d0, l0])
    num = out.columns.drop("fold")
    summary = pd.DataFrame([{"fold": "mean", **out[num].mean()}, {"fold": "sd", **out[num].std(ddof=1)}])
    return pd.concat([out, summary], ignore_index=True)


def _fold_cells(f, fold, metric, cells):
    """Mean metric per cell of one fold, over the genes defined in all four cells."""
    values = {}
    for d, l in cells:  # noqa: E741
        cell = f[(f["decoder"] == d) & (f["loss"] == l)]
        if cell.empty:
            raise InputError("table", f"fold {fold!r} has no rows for decoder {d!r} with loss {l!r}")
        values[f"{d}_{l}"] = cell
    if "gene" not in f.columns:
        return {"n_genes": np.nan, **{k: v[metric].mean() for k, v in values.items()}}
    wide = pd.concat({k: v.set_index("gene")[metric] for k, v in values.items()}, axis=1)
    wide = wide[np.isfinite(wide.astype(float)).all(axis=1)]
    return {"n_genes": len(wide), **wide.mean().to_dict()}


# ---------------------------------------------------------------------------------------------
# the workflow's `stats` and `factorial` stages

#: Metrics compared by default: the seeds' headline numbers.
STATS_METRICS = tuple(defaults("stats")["metrics"])  # the schema default of `stats.metrics`
#: Output files of :func:`run_comparison`, one row block per metric in each.
STATS_TABLES = {
    "s1": "S1_per_gene.csv",
    "s1_folds": "S1_per_fold.csv",
    "s2": "S2_per_category.csv",
    "s3": "S3_per_quartile.csv",
    "summary": "summary.csv",
}


def _read_eval(eval_dir):
    """Fold name, ``per_gene.csv`` and ``per_tile.parquet`` of one evaluation folder."""
    per_gene = evaluation.read_per_gene(eval_dir).drop(columns="model")
    return per_gene["fold"].iloc[0], per_gene, evaluation.read_per_tile(eval_dir)


def delta_ci(tiles_a, tiles_b, metric, bootstrap=1000, bootstrap_seed=7, level=0.95):
    """Paired tile-bootstrap interval of the mean over folds of the mean-over-genes delta B - A.

    The expanded BCa interval of :func:`sparsitytrap.bootstrap.interval` (folds are the strata of
    its jackknife).

    Returns
    -------
    low, high (NaN when the metric cannot be resampled or ``bootstrap`` is 0).
    """
    reps = paired_delta(tiles_a, tiles_b, metric, bootstrap, bootstrap_seed) if bootstrap >= 1 else None
    low, high = interval(reps, level) if reps is not None else (None, None)
    return (np.nan, np.nan) if low is None else (low, high)


def run_comparison(eval_dirs_a, eval_dirs_b, out_dir, metrics=STATS_METRICS, names=("A", "B"), categories=None,
                   bootstrap=1000, bootstrap_seed=7):  # fmt: skip
    """Compare model B with model A over the folds: write tables S1-S3 and a summary (CSV).

    Parameters
    ----------
    eval_dirs_a, eval_dirs_b
        Evaluation folders of A and B, one per fold, same fold order.
    out_dir
        Output folder for :data:`STATS_TABLES`; every table has a ``metric`` column.
    metrics
        Metric columns of ``per_gene.csv``.
    names
        Model names (column headers and the summary).
    categories
        gene -> category (see :func:`compare`); default: the ``category`` column of the tables.
    bootstrap, bootstrap_seed
        Paired tile bootstrap of the mean delta (:func:`delta_ci`).

    Returns
    -------
    dict of DataFrames, as written.
    """
    a = [_read_eval(d) for d in eval_dirs_a]
    b = [_read_eval(d) for d in eval_dirs_b]
    if [f for f, *_ in a] != [f for f, *_ in b]:
        raise InputError("comparisons", f"folds of {names[0]} and {names[1]} differ")
    gene_a = pd.concat([g for _, g, _ in a], ignore_index=True)
    gene_b = pd.concat([g for _, g, _ in b], ignore_index=True)
    if categories is None and "category" in gene_a.columns:
        categories = dict(zip(gene_a["gene"], gene_a["category"]))
    # the interval is of the same mean as delta_mean: over the genes every fold scored (see compare)
    shared = set.intersection(*(set(g["gene"]) for _, g, _ in a + b))
    tiles_a, tiles_b = ([t[t["gene"].isin(shared)] for *_, t in x] for x in (a, b))
    out = {k: [] for k in STATS_TABLES}
    for metric in metrics:
        tables = compare(gene_a, gene_b, metric, categories, names)
        low, high = delta_ci(tiles_a, tiles_b, metric, bootstrap, bootstrap_seed)
        tables["summary"] = tables["summary"].assign(delta_ci_low=low, delta_ci_high=high)
        for k in STATS_TABLES:
            out[k].append(tables[k].rename(columns=lambda c, m=metric: c.replace(f"{m}_", "")).assign(metric=metric))
    result = {}
    for k, name in STATS_TABLES.items():
        df = pd.concat(out[k], ignore_index=True)
        result[k] = df[["metric", *[c for c in df.columns if c != "metric"]]]
        write_csv(result[k], Path(out_dir) / name)
    return result


def run_factorial(cells, out_csv, metrics=STATS_METRICS, reference=("img2st", "mse")):
    """The 2 x 2 decomposition (loss effect, decoder effect, interaction) per fold and pooled.

    Parameters
    ----------
    cells
        The four cells, each ``{"decoder", "loss", "dirs": [evaluation folders, one per fold]}``
        (config ``factorial.cells``; the decoder and loss are given, never parsed from names).
    out_csv
        Output table: :func:`decompose_2x2` per metric, with a ``metric`` column.
    reference
        (decoder, loss) reference levels: effects are the other level minus these.
    """
    rows = []
    for cell in cells:
        for d in cell["dirs"]:
            _, per_gene, _ = _read_eval(d)
            rows.append(per_gene.assign(decoder=cell["decoder"], loss=cell["loss"]))
    table = pd.concat(rows, ignore_index=True)
    levels = {key: [r] + sorted({c[key] for c in cells} - {r}) for key, r in zip(("decoder", "loss"), reference)}
    out = pd.concat(
        [decompose_2x2(table, m, levels["decoder"], levels["loss"]).assign(metric=m) for m in metrics],
        ignore_index=True,
    )
    out = out[["metric", *[c for c in out.columns if c != "metric"]]]
    write_csv(out, out_csv)
    return out
