"""Streamed evaluation of one (model, fold): per-gene metrics with a label-shuffle null and a noise ceiling.

The test patient's predictions and counts are read a batch of tiles at a time (never all of a
patient at once). Three sets of per-gene metrics are fed from the same stream
(:class:`sparsitytrap.metrics.GeneMetrics`, definitions in :mod:`sparsitytrap.metrics`):

- model: the prediction of tile t against the counts of tile t;
- null (label shuffle): the prediction of tile ``perm[t]`` against the counts and mask of tile t,
  ``perm`` a random derangement (:func:`sparsitytrap.metrics.shuffle_pairs`); the partner tiles
  are read by index, batch by batch;
- ceiling: on simulated data the true expected count of every bin (the diffused rate times the
  capture efficiency, :func:`sparsitytrap.simulate.truth_rate`) scored as a prediction; on real
  data two binomial half-samples of the counts scored against each other, the correlations then
  Spearman-Brown corrected (:func:`sparsitytrap.metrics.correct_split_half`).

Outputs in ``out_dir``: ``per_gene.csv``, ``per_tile.parquet``, ``summary.json``.
"""

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import zarr

from . import metrics as M
from .errors import InputError
from .io import atomic_path, write_csv

log = logging.getLogger(__name__)

#: Pooling factors evaluated for PCC: 1, 2, 4 x the 2 um bin = 2, 4, 8 um.
SCALES = (1, 2, 4)
#: Columns of a metrics table renamed so that every column names its pooling.
RENAME = {
    "ssim_2um": "ssim_2um_pertile",
    "ssim_pairs": "ssim_2um_pairs",
    "ratio": "ratio_pooled",
    "deviance": "deviance_pooled",
    "mean_pred": "mean_pred_pooled",
    "mean_target": "mean_target_pooled",
    "n_bins": "n_tissue_bins",
}
#: Metrics scored for the model, the null and the ceiling (after renaming).
SCORES = (
    "pcc_2um_pooled",
    "pcc_2um_pertile",
    "pcc_4um_pooled",
    "pcc_4um_pertile",
    "pcc_8um_pooled",
    "pcc_8um_pertile",
    "scc_2um_pooled",
    "scc_2um_pertile",
    "ssim_2um_pertile",
    "ratio_pooled",
    "deviance_pooled",
)
#: Scores where higher is better and 0 is chance: these get a fraction of the ceiling.
SIMILARITIES = tuple(s for s in SCORES if s.startswith(("pcc_", "scc_", "ssim_")))
#: Sufficient statistics kept per (tile, gene) and scale, so that pooled PCC can be bootstrapped over tiles.
SUMS = ("n", "x", "y", "xx", "yy", "xy")


# ---------------------------------------------------------------------------------------------
# reading the stores


def open_tiles(tiles_zarr):
    """Open a tile store read-only and check the arrays evaluation needs.

    Returns
    -------
    zarr.Group with ``counts``, ``mask``, ``grid``, ``bin_origin`` and attribute ``genes``.
    """
    try:
        tiles = zarr.open_group(str(tiles_zarr), mode="r")
    except Exception as err:  # zarr raises several types for a missing or foreign folder
        raise InputError(tiles_zarr, f"cannot open the tile store ({type(err).__name__})") from None
    for name in ("counts", "mask", "grid", "bin_origin"):
        if name not in tiles:
            raise InputError(tiles_zarr, f"tile store has no array {name!r}")
    genes = tiles.attrs.get("genes")
    if not genes or len(genes) != tiles["counts"].shape[1]:
        raise InputError(tiles_zarr, "attribute 'genes' is missing or does not match counts' gene axis")
    return tiles


def open_predictions(pred_zarr, shape=None):
    """Open a predictions store: a zarr array ``[T, G, H, W]`` (or a group holding one, ``rates``).

    Parameters
    ----------
    pred_zarr
        Path of ``predictions.zarr``.
    shape
        Expected shape (the tile store's ``counts``); a mismatch raises :class:`InputError`.
    """
    try:
        node = zarr.open(str(pred_zarr), mode="r")
    except Exception as err:
        raise InputError(pred_zarr, f"cannot open the predictions store ({type(err).__name__})") from None
    if isinstance(node, zarr.Group):
        arrays = dict(node.arrays())
        name = "rates" if "rates" in arrays else (next(iter(arrays)) if len(arrays) == 1 else None)
        if name is None:
            raise InputError(pred_zarr, f"expected an array 'rates', found {sorted(arrays)}")
        node = arrays[name]
    if shape is not None and tuple(node.shape) != tuple(shape):
        raise InputError(pred_zarr, f"shape {tuple(node.shape)} does not match the tile store's counts {tuple(shape)}")
    return node


def _truth_window(truth_zarr, genes, origin, tile_bins):
    """True expected counts ``[G, tile_bins, tile_bins]`` of one tile; bins outside the truth are 0."""
    from .simulate import truth_rate

    r0, c0 = int(origin[0]), int(origin[1])
    rows, cols = slice(max(r0, 0), r0 + tile_bins), slice(max(c0, 0), c0 + tile_bins)
    rate = np.asarray(truth_rate(truth_zarr, genes, rows=rows, cols=cols, diffused=True), dtype=np.float32)
    out = np.zeros((len(genes), tile_bins, tile_bins), dtype=np.float32)
    h, w = rate.shape[1:]
    out[:, rows.start - r0 : rows.start - r0 + h, cols.start - c0 : cols.start - c0 + w] = rate
    return out


# ---------------------------------------------------------------------------------------------
# per (tile, gene) sufficient statistics


def tile_sums(pred, target, mask, k):
    """Per (tile, gene) n and sums x, y, xx, yy, xy over tissue bins, after sum-pooling by ``k``.

    Summing these over any multiset of tiles gives that multiset's pooled Pearson, so a
    bootstrap over tiles needs no second pass over the data.

    Returns
    -------
    ``[T, G, 6]`` float64 numpy array, in the order of :data:`SUMS`.
    """
    x, y, m = M.pool_batch(pred.to(M.F64), target.to(M.F64), mask, k)
    mf = m[:, None].to(M.F64)
    x, y = x * mf, y * mf
    n = mf.sum((2, 3)).expand(x.shape[:2])
    parts = [n, x.sum((2, 3)), y.sum((2, 3)), (x * x).sum((2, 3)), (y * y).sum((2, 3)), (x * y).sum((2, 3))]
    return torch.stack(parts, dim=-1).numpy()


def pearson_from_sums(s):
    """Pearson from summed sufficient statistics ``[..., 6]`` (order :data:`SUMS`); NaN if undefined."""
    s = np.asarray(s, dtype=np.float64)
    n, sx, sy, sxx, syy, sxy = np.moveaxis(s, -1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cxx, cyy, cxy = sxx - sx * sx / n, syy - sy * sy / n, sxy - sx * sy / n
        r = cxy / np.sqrt(cxx * cyy)
    # a side constant up to rounding has no correlation
    bad = (n < 2) | (cxx <= 1e-12 * np.abs(sxx)) | (cyy <= 1e-12 * np.abs(syy))
    return np.where(bad, np.nan, np.clip(r, -1, 1))


def bootstrap_weights(n_tiles, n_boot, seed):
    """``[n_boot, n_tiles]`` multiplicities of tiles drawn with replacement (rows sum to n_tiles)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_tiles, np.full(n_tiles, 1.0 / n_tiles), size=n_boot).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# the evaluation


def _metrics(n_genes, min_tissue, source):
    return M.GeneMetrics(n_genes, scales=SCALES, bin_um=2.0, min_tissue=min_tissue, source=source)


def _batches(n_tiles, batch_tiles):
    for t0 in range(0, n_tiles, batch_tiles):
        yield t0, min(t0 + batch_tiles, n_tiles)


def _ceiling_batch(counts, origins, t0, truth_zarr, genes, seed):
    """Ceiling (prediction, target) of one batch: truth vs counts, or half vs half of the counts."""
    if truth_zarr is not None:
        tile_bins = counts.shape[-1]
        truth = np.stack([_truth_window(truth_zarr, genes, o, tile_bins) for o in origins])
        return torch.from_numpy(truth), counts
    # one draw per tile (seeded by its index): results do not depend on the batch size
    halves = [M.split_half_thinning(counts[i], seed=(seed, 1, t0 + i)) for i in range(len(counts))]
    return torch.stack([h[0] for h in halves]), torch.stack([h[1] for h in halves])


def _table(gm, genes):
    return gm.table(genes).rename(columns=RENAME)


def per_gene_table(model, null, ceiling, genes, categories=None):
    """Join model, null and ceiling tables into one row per gene, in the tile store's gene order.

    Columns: gene, category (if known), sparsity, mean_target_pooled, n_tissue_bins, every
    score of :data:`SCORES`, ``<score>_null``, ``<score>_ceiling`` and, for similarities,
    ``<score>_frac_ceiling`` (model / ceiling; NaN where the ceiling is <= 0).
    """
    df = pd.DataFrame({"gene": genes})
    if categories is not None:
        df["category"] = [categories.get(g, "Other") for g in genes]
    for col in ("sparsity", "mean_target_pooled", "n_tissue_bins"):
        df[col] = model[col].to_numpy()
    for s in SCORES:
        df[s] = model[s].to_numpy()
    for s in SCORES:
        df[f"{s}_null"] = null[s].to_numpy()
    for s in SCORES:
        df[f"{s}_ceiling"] = ceiling[s].to_numpy()
    for s in SIMILARITIES:
        c = ceiling[s].to_numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            df[f"{s}_frac_ceiling"] = np.where(c > 0, model[s].to_numpy() / c, np.nan)
    df["ssim_2um_pairs"] = model["ssim_2um_pairs"].to_numpy()
    return df


def _per_tile_frame(genes, grid, per_tile, sums):
    """Long table: one row per (tile, gene) with per-tile metrics and pooled-PCC sums per scale."""
    t, g = sums[1].shape[:2]
    cols = {
        "tile": np.repeat(np.arange(t), g),
        "grid_row": np.repeat(grid[:, 0], g),
        "grid_col": np.repeat(grid[:, 1], g),
        "gene": np.tile(np.asarray(genes, dtype=object), t),
    }
    for name, v in per_tile.items():
        cols[RENAME.get(name, name)] = v.reshape(-1)
    for k, s in sums.items():
        um = f"{2 * k}um"
        for i, part in enumerate(SUMS):
            cols[f"sum_{part}_{um}"] = s[..., i].reshape(-1)
    return pd.DataFrame(cols)


def _bootstrap(per_tile, n_boot, seed):
    """95 % bootstrap intervals over tiles of the mean over genes of the pooled PCCs and per-tile SSIM."""
    if n_boot <= 0:
        return {}
    tiles = per_tile["tile"].to_numpy()
    n_tiles, n_genes = tiles.max() + 1, int((tiles == 0).sum())
    w = bootstrap_weights(n_tiles, n_boot, seed)
    out = {}
    for um in ("2um", "4um", "8um"):
        s = per_tile[[f"sum_{p}_{um}" for p in SUMS]].to_numpy().reshape(n_tiles, n_genes, 6)
        # resamples in chunks bound the memory to 100 x genes x 6 floats
        r = np.concatenate([pearson_from_sums(np.einsum("bt,tgs->bgs", w[i : i + 100], s)) for i in range(0, n_boot, 100)])
        out[f"pcc_{um}_pooled"] = _interval(np.nanmean(r, axis=1))
    v = per_tile["ssim_2um_pertile"].to_numpy().reshape(n_tiles, n_genes)
    ok = np.isfinite(v)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (w @ np.where(ok, v, 0.0)) / (w @ ok)
    out["ssim_2um_pertile"] = _interval(np.nanmean(mean, axis=1))
    return out


def _interval(values):
    values = values[np.isfinite(values)]
    if not len(values):
        return [None, None]
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def _clean(x):
    """JSON-safe: NaN and infinities become null."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _protocol(fold, sample, truth, shuffle_seed, batch_tiles, ssim_min_tissue, n_boot):
    return {
        "fold": fold,
        "test_sample": sample,
        "pooling": "pooled: per gene over all tissue bins of all test tiles; pertile: per (tile, gene), "
        "then the mean over tiles; 4 and 8 um: masked counts and predictions sum-pooled, mask max-pooled",
        "ssim": f"2 um, per (tile, gene) on tiles with tissue fraction > {ssim_min_tissue}, prediction and "
        "target masked and min-max scaled with one shared range, 7x7 uniform window, data range 1; "
        "mean over pairs",
        "null": f"label shuffle: the prediction of tile perm[t] scored against the counts and mask of tile t, "
        f"perm a random derangement of the test tiles (seed {shuffle_seed})",
        "ceiling": (
            "simulated truth: the true diffused rate times the capture efficiency scored as a prediction"
            if truth
            else f"split-half binomial thinning of the counts (seed {shuffle_seed}); PCC and SCC "
            "Spearman-Brown corrected (sqrt of the full-depth replicate correlation), SSIM, ratio "
            "and deviance are half vs half"
        ),
        "frac_ceiling": "model score / ceiling score, per gene",
        "bootstrap": f"{n_boot} resamples of test tiles with replacement; 95 % percentile interval of the mean over genes",
        "batch_tiles": batch_tiles,
    }


def evaluate(
    pred_zarr,
    tiles_zarr,
    out_dir,
    *,
    truth_zarr=None,
    genes_csv=None,
    model=None,
    fold=None,
    batch_tiles=4,
    shuffle_seed=7,
    bootstrap=1000,
    ssim_min_tissue=0.05,
):
    """Evaluate one (model, fold) on its test patient, streaming tile batches.

    Parameters
    ----------
    pred_zarr
        ``results/models/{model}/{fold}/predictions.zarr``: float rates ``[T, G, 128, 128]`` in the
        tile order of ``tiles_zarr``.
    tiles_zarr
        The test patient's tile store (counts, mask, grid, bin_origin, attrs genes, sample).
    out_dir
        Folder for ``per_gene.csv``, ``per_tile.parquet`` and ``summary.json``.
    truth_zarr
        Ground truth of a simulated patient (noise ceiling from the true rates); ``None`` for real
        data (noise ceiling by split-half binomial thinning).
    genes_csv
        Optional ``genes.csv``; its ``category`` column is copied into ``per_gene.csv``.
    model, fold
        Names written into ``summary.json``; default: the two folders above ``pred_zarr``.
    batch_tiles
        Tiles per batch (memory: about ``3 * batch_tiles * G * 128 * 128 * 8`` bytes).
    shuffle_seed
        Seed of the label-shuffle derangement, the split-half thinning and the bootstrap.
    bootstrap
        Resamples of tiles for the confidence intervals in ``summary.json`` (0: none).
    ssim_min_tissue
        SSIM is computed on tiles with a tissue fraction above this.

    Returns
    -------
    pandas.DataFrame, the per-gene table written to ``per_gene.csv``.
    """
    pred_zarr, out_dir = Path(pred_zarr), Path(out_dir)
    if int(batch_tiles) < 1:
        raise InputError("evaluation.batch_tiles", f"must be >= 1, got {batch_tiles}")
    tiles = open_tiles(tiles_zarr)
    counts, mask = tiles["counts"], tiles["mask"]
    pred = open_predictions(pred_zarr, counts.shape)
    genes = list(tiles.attrs["genes"])
    pred_genes = getattr(pred, "attrs", {}).get("genes")
    if pred_genes is not None and list(pred_genes) != genes:
        raise InputError(pred_zarr, "attribute 'genes' differs from the tile store's genes (order or names)")
    n_tiles, n_genes = counts.shape[:2]
    perm = M.shuffle_pairs(n_tiles, shuffle_seed)
    origins = np.asarray(tiles["bin_origin"][:])
    source = str(pred_zarr)
    gm_model, gm_null = _metrics(n_genes, ssim_min_tissue, source), _metrics(n_genes, ssim_min_tissue, source)
    gm_ceiling = _metrics(n_genes, ssim_min_tissue, str(truth_zarr or tiles_zarr))
    sums = {k: [] for k in SCALES}
    for t0, t1 in _batches(n_tiles, int(batch_tiles)):
        y = torch.from_numpy(np.asarray(counts[t0:t1]))
        m = torch.from_numpy(np.asarray(mask[t0:t1])).bool()
        p = torch.from_numpy(np.asarray(pred[t0:t1]))
        gm_model.update(p, y, m)
        for k in SCALES:
            sums[k].append(tile_sums(p, y, m, k))
        partner = torch.from_numpy(np.stack([np.asarray(pred[int(i)]) for i in perm[t0:t1]]))
        gm_null.update(partner, y, m)
        gm_ceiling.update(*_ceiling_batch(y, origins[t0:t1], t0, truth_zarr, genes, shuffle_seed), m)
        log.info("evaluated tiles %d-%d of %d", t0, t1, n_tiles)
    ceiling = _table(gm_ceiling, genes)
    if truth_zarr is None:
        ceiling = M.correct_split_half(ceiling)
    categories = _categories(genes_csv)
    table = per_gene_table(_table(gm_model, genes), _table(gm_null, genes), ceiling, genes, categories)
    sums = {k: np.concatenate(v) for k, v in sums.items()}
    per_tile = _per_tile_frame(genes, np.asarray(tiles["grid"][:]), gm_model.per_tile(), sums)
    model = model or pred_zarr.parent.parent.name
    fold = fold or pred_zarr.parent.name
    summary = {
        "model": model,
        "fold": fold,
        "test_sample": tiles.attrs.get("sample"),
        "n_tiles": n_tiles,
        "n_genes": n_genes,
        "n_tissue_bins": int(table["n_tissue_bins"].iloc[0]),
        "protocol": _protocol(fold, tiles.attrs.get("sample"), truth_zarr is not None, shuffle_seed,
                              int(batch_tiles), ssim_min_tissue, int(bootstrap)),
        "mean_over_genes": {c: float(np.nanmean(table[c])) if table[c].notna().any() else None
                            for c in table.columns if c not in ("gene", "category", "n_tissue_bins", "ssim_2um_pairs")},
        "ci95": _bootstrap(per_tile, int(bootstrap), [shuffle_seed, 2]),
    }
    write_csv(table, out_dir / "per_gene.csv")
    with atomic_path(out_dir / "per_tile.parquet") as tmp:
        per_tile.to_parquet(tmp, index=False)
    with atomic_path(out_dir / "summary.json") as tmp:
        tmp.write_text(json.dumps(_clean(summary), indent=2) + "\n")
    return table


def _categories(genes_csv):
    if genes_csv is None:
        return None
    df = pd.read_csv(genes_csv)
    if not {"gene", "category"} <= set(df.columns):
        raise InputError(genes_csv, "needs columns 'gene' and 'category'")
    return dict(zip(df["gene"], df["category"].fillna("Other")))
