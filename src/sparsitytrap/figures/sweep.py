"""Where the sparsity trap begins: Poisson minus MSE against the bin size the loss is computed at.

One figure for ``config/resolution_sweep.yaml``: MSE and Poisson twins trained at 2, 4, 8 and 16 um
(model option ``training.train_um``), every model evaluated at every bin size. For each training
bin size and each evaluation bin size: the mean over genes and folds of the per-gene difference
Poisson - MSE (paired on fold and gene), with a 95 % interval from a bootstrap of genes within
folds (the folds are strata: each replicate keeps every fold), for PCC and for SCC. The second
axis shows the zero-count fraction of the test patients' in-tissue bins at each bin size.
"""

import numpy as np
import pandas as pd

from ..bins import pool_mask, sum_pool
from ..io import write_csv
from ..stores.tiles import open_tiles
from ._common import read_evaluations, save

UMS = (2, 4, 8, 16)
N_BOOT = 1000


def _pairs(per_gene, train_um, losses):
    """Per (train_um, fold, gene): the Poisson and the MSE rows side by side."""
    df = per_gene.assign(train_um=per_gene["model"].map(train_um), loss=per_gene["model"].map(losses))
    df = df[df["loss"].isin(["mse", "poisson"])]
    keys = ["train_um", "fold", "gene"]
    return df[df.loss == "poisson"].merge(df[df.loss == "mse"], on=keys, suffixes=("_poisson", "_mse"))


def delta_with_interval(pairs, metric, seed=0, n_boot=N_BOOT, level=0.95):
    """Mean over folds of the mean over genes of Poisson - MSE, and its stratified bootstrap interval."""
    d = pairs[f"{metric}_poisson"] - pairs[f"{metric}_mse"]
    folds = [g.to_numpy() for _, g in d.groupby(pairs["fold"]) if np.isfinite(g).any()]
    folds = [f[np.isfinite(f)] for f in folds]
    if not folds:
        return np.nan, np.nan, np.nan
    rng = np.random.default_rng(seed)
    boot = np.mean([f[rng.integers(0, len(f), (n_boot, len(f)))].mean(axis=1) for f in folds], axis=0)
    tail = (1 - level) / 2
    low, high = np.quantile(boot, [tail, 1 - tail])
    return float(np.mean([f.mean() for f in folds])), float(low), float(high)


def zero_fraction(tiles_zarrs, ums=UMS):
    """Per bin size: the fraction of (in-tissue bin, gene) values that are zero in these tile stores."""
    import torch

    zeros, total = dict.fromkeys(ums, 0), dict.fromkeys(ums, 0)
    for path in tiles_zarrs:
        store = open_tiles(path)
        for t in range(store.n_tiles):
            counts = torch.from_numpy(store.counts[t].astype(np.float64))
            mask = torch.from_numpy(store.mask[t].astype(bool))
            for um in ums:
                k = um // 2
                tissue = pool_mask(mask, k)
                pooled = sum_pool(counts * mask, k)[:, tissue]
                zeros[um] += int((pooled == 0).sum())
                total[um] += pooled.numel()
    return {um: zeros[um] / total[um] for um in ums if total[um]}


def sweep_table(eval_dirs, train_um, losses, seed=0):
    """One row per (metric family, train_um, eval_um): mean delta and its interval, genes and folds used."""
    per_gene, _ = read_evaluations(eval_dirs)
    pairs = _pairs(per_gene, train_um, losses)
    rows = []
    for family in ("pcc", "scc"):
        for eval_um in UMS:
            metric = f"{family}_{eval_um}um_pooled"
            if f"{metric}_poisson" not in pairs:
                continue
            for tum, part in pairs.groupby("train_um"):
                mean, low, high = delta_with_interval(part, metric, seed)
                rows.append(
                    {
                        "metric": family,
                        "train_um": tum,
                        "eval_um": eval_um,
                        "delta": mean,
                        "low": low,
                        "high": high,
                        "n_genes": int(part["gene"].nunique()),
                        "n_folds": int(part["fold"].nunique()),
                    }
                )
    return pd.DataFrame(rows)


def resolution_sweep(eval_dirs, tiles_zarrs, train_um, losses, out_prefix, formats=("png",), bootstrap_seed=0):
    """Draw the sweep (two panels: PCC, SCC) and write its table as ``{out_prefix}.csv``."""
    from matplotlib.figure import Figure

    table = sweep_table(eval_dirs, train_um, losses, bootstrap_seed)
    zeros = zero_fraction(tiles_zarrs)
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=False)
    colours = dict(zip(UMS, ("#1b9e77", "#d95f02", "#7570b3", "#e7298a")))
    for ax, family in zip(axes, ("pcc", "scc")):
        part = table[table.metric == family]
        for eval_um, line in part.groupby("eval_um"):
            line = line.sort_values("train_um")
            x = line["train_um"].to_numpy()
            ax.errorbar(
                x,
                line["delta"],
                yerr=[line["delta"] - line["low"], line["high"] - line["delta"]],
                marker="o",
                capsize=3,
                color=colours[eval_um],
                label=f"evaluated at {eval_um} µm",
            )
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(UMS, [f"{u}" for u in UMS])
        ax.set_xlabel("bin size the loss is computed at (µm)")
        ax.set_ylabel(f"{family.upper()}: Poisson − MSE (mean over genes and folds)")
        twin = ax.twinx()
        twin.plot(list(zeros), list(zeros.values()), ls=":", color="black", marker="s", ms=3, label="zero fraction")
        twin.set_ylim(0, 1)
        twin.set_ylabel("zero-count fraction of in-tissue bins")
        ax.set_title(f"{family.upper()} (pooled over test tiles)", fontsize=9)
    axes[0].legend(fontsize=7, loc="best")
    n = table[["n_genes", "n_folds"]].max()
    fig.suptitle(
        f"Poisson − MSE by training bin size; 95 % bootstrap of genes within folds ({int(n.n_genes)} genes, "
        f"{int(n.n_folds)} folds); dotted: zero fraction at each bin size",
        fontsize=9,
    )
    save(fig, out_prefix, formats)
    write_csv(table.assign(zero_fraction=table["eval_um"].map(zeros)), f"{out_prefix}.csv")
    return fig
