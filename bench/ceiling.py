"""The real-data noise ceiling (split-half thinning) validated against the simulated truth (issue 11, item 5).

A simulated patient (:func:`sparsitytrap.simulate.simulate_patient`) is cut into tiles whose
counts are Poisson(expected count), exactly as the simulator draws them; genes are taken evenly
over the ranks of their mean count, sparse to dense. Per gene and metric, three ceilings:

- truth: the true expected count scored as a prediction (the simulated-data ceiling);
- old: one split-half thinning draw, Spearman-Brown corrected (the estimator before issue 11),
  scored for each of the ``--draws`` draws and the scores averaged (its expected agreement);
- new: the half-vs-half scores averaged over the ``--draws`` draws, then corrected (the one in use).

Printed: per metric, the Pearson correlation over genes of each estimate with the truth, the mean
bias (estimate - truth), the mean absolute error and the fraction of genes with an estimate of 0;
then the error of the mean of the first k draws, k = 1, 2, 4, ... (how many draws are worth it).
Written: ``bench/ceiling_validation.png`` (estimate against truth per gene) and a CSV beside it.

    .venv/bin/python bench/ceiling.py              # about 10 minutes on 2 cores
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sparsitytrap.evaluate import ceiling_table, split_half_ceiling, split_half_draws
from sparsitytrap.stores import tiles as tile_store
from sparsitytrap.stores import truth as truth_store

#: Metrics whose real-data ceiling is estimated (SSIM and deviance have none; ratio is ~1 by construction).
METRICS = ("pcc_2um_pooled", "pcc_4um_pooled", "pcc_8um_pooled", "pcc_2um_pertile", "scc_2um_pooled",
           "scc_2um_pertile")  # fmt: skip
HERE = Path(__file__).resolve().parent


def simulated_tiles(root, *, seed=3, n_bins=576, tile_bins=128, n_genes=48, count_seed=1):
    """Simulate a patient under ``root`` and write its tile store (tiles with >= 50 % tissue).

    Returns
    -------
    (tiles_zarr, truth_zarr)
    """
    from sparsitytrap.simulate import simulate_patient

    root = Path(root)
    simulate_patient(root / "P", "P", {"seed": seed, "n_rows": n_bins, "n_cols": n_bins})
    truth = root / "P" / "truth.zarr"
    t = truth_store.open_truth(truth)
    names = list(t.attrs[truth_store.ATTR_GENE_NAMES])
    tissue = np.asarray(t[truth_store.IN_TISSUE])
    n = n_bins // tile_bins
    grid = np.array([(r, c) for r in range(n) for c in range(n)])
    windows = [(slice(r * tile_bins, (r + 1) * tile_bins), slice(c * tile_bins, (c + 1) * tile_bins)) for r, c in grid]
    keep = [i for i, (rs, cs) in enumerate(windows) if tissue[rs, cs].mean() >= 0.5]
    means = truth_store.truth_rate(truth, None, with_efficiency=True)[:, tissue].mean(1)
    order = np.argsort(means)
    genes = [names[i] for i in order[np.linspace(0, len(order) - 1, n_genes).round().astype(int)]]
    out = root / "tiles.zarr"
    images, counts, mask = tile_store.create(
        out, n_tiles=len(keep), genes=genes, tile_bins=tile_bins, image_px=8, attrs={"sample": "P", "bin_um": 2.0},
        grid=grid[keep].astype(np.int32), bin_origin=(grid[keep] * tile_bins).astype(np.int32),
        pixel_box=np.zeros((len(keep), 4), np.int32),
    )  # fmt: skip
    rng = np.random.default_rng(count_seed)
    for j, i in enumerate(keep):
        rs, cs = windows[i]
        counts[j] = rng.poisson(truth_store.truth_rate(truth, genes, rs, cs, with_efficiency=True))
        mask[j] = tissue[rs, cs]
    tile_store.finish(out)
    return out, truth


def ceilings(tiles, truth, draws, seed=7):
    """Per-gene ceilings: ``truth``, ``single`` (each of the ``draws`` single-draw estimates, the old
    estimator) and ``mean_of[k]`` (the new estimator on the first k draws, k = 1, 2, 4, ..., draws)."""
    table = ceiling_table(tiles, truth_zarr=truth)
    raw = split_half_draws(tiles, seed=seed, n_draws=draws)
    ks = sorted({2**i for i in range(int(np.log2(draws)) + 1)} | {draws})
    return {
        "genes": table["gene"].to_numpy(),
        "truth": table,
        "single": [split_half_ceiling([d]) for d in raw],
        "mean_of": {k: split_half_ceiling(raw[:k]) for k in ks},
    }


def _scores(est, truth):
    ok = np.isfinite(est) & np.isfinite(truth)
    e, t = est[ok], truth[ok]
    return {"n_genes": int(ok.sum()), "corr": float(np.corrcoef(e, t)[0, 1]), "bias": float((e - t).mean()),
            "mae": float(np.abs(e - t).mean()), "zero_fraction": float((e == 0).mean())}  # fmt: skip


def agreement(c):
    """Per metric: the old estimator (one draw; scores averaged over the single draws) and the new one
    (mean of all draws) against the truth over genes: correlation, bias, MAE, fraction of zeros."""
    rows = []
    n = max(c["mean_of"])
    for m in METRICS:
        t = c["truth"][m].to_numpy()
        old = pd.DataFrame([_scores(d[m].to_numpy(), t) for d in c["single"]]).mean()
        rows.append({"metric": m, "estimator": "old", **old.to_dict(), "n_genes": int(old["n_genes"])})
        rows.append({"metric": m, "estimator": "new", **_scores(c["mean_of"][n][m].to_numpy(), t)})
    return pd.DataFrame(rows)


def by_draws(c):
    """MAE against the truth of the mean of the first k draws, per metric (columns: k)."""
    return pd.DataFrame(
        {
            k: [_scores(t[m].to_numpy(), c["truth"][m].to_numpy())["mae"] for m in METRICS]
            for k, t in c["mean_of"].items()
        },
        index=list(METRICS),
    )


def long_table(c):
    """gene, metric, truth, old (the first single draw), new (mean of all draws)."""
    n = max(c["mean_of"])
    return pd.concat(
        [pd.DataFrame({"gene": c["genes"], "metric": m, "truth": c["truth"][m].to_numpy(),
                       "old": c["single"][0][m].to_numpy(), "new": c["mean_of"][n][m].to_numpy()})
         for m in METRICS],
        ignore_index=True,
    )  # fmt: skip


def figure(long, stats, out_png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(long["metric"]))
    fig, axes = plt.subplots(2, (len(metrics) + 1) // 2, figsize=(4 * ((len(metrics) + 1) // 2), 8), squeeze=False)
    for ax, metric in zip(axes.ravel(), metrics, strict=False):
        df = long[long["metric"] == metric]
        for est, colour in (("old", "tab:grey"), ("new", "tab:blue")):
            s = stats.query("metric == @metric and estimator == @est").iloc[0]
            label = f"{est}: r={s['corr']:.3f}, bias={s['bias']:+.3f}, MAE={s['mae']:.3f}"
            ax.scatter(df["truth"], df[est], s=12, color=colour, alpha=0.7, label=label)
        hi = float(np.nanmax(df[["truth", "old", "new"]].to_numpy())) * 1.05
        ax.plot([0, hi], [0, hi], "k--", lw=0.8)
        ax.set(title=metric, xlabel="true ceiling (expected count vs counts)", ylabel="split-half estimate")
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("Noise ceiling per gene: split-half thinning (old: 1 draw, new: mean of draws) vs simulated truth")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bins", type=int, default=576, help="patient side in 2 um bins (576: the demo cohort's)")
    p.add_argument("--genes", type=int, default=48)
    p.add_argument("--draws", type=int, default=16)
    p.add_argument("--seed", type=int, default=3, help="patient seed")
    p.add_argument("--out", default=str(HERE / "ceiling_validation.png"))
    a = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tiles, truth = simulated_tiles(tmp, seed=a.seed, n_bins=a.bins, n_genes=a.genes)
        n_tiles = tile_store.open_tiles(tiles).n_tiles
        c = ceilings(tiles, truth, a.draws)
    stats, long = agreement(c), long_table(c)
    print(f"{n_tiles} tiles of 128 x 128 bins, {a.genes} genes, {a.draws} draws, {time.perf_counter() - t0:.0f} s")
    print("old: one draw (scores averaged over the single draws); new: mean of all draws")
    print(stats.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("MAE against the truth of the mean of the first k draws:")
    print(by_draws(c).to_string(float_format=lambda v: f"{v:.4f}"))
    figure(long, stats, a.out)
    long.to_csv(Path(a.out).with_suffix(".csv"), index=False)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
