"""Streamed evaluation of one (model, fold): per-gene metrics with a label-shuffle null and a noise ceiling.

The test patient's predictions and counts are read a batch of tiles at a time (never all of a
patient at once). Three sets of per-gene metrics are computed
(:class:`sparsitytrap.metrics.GeneMetrics`, definitions in :mod:`sparsitytrap.metrics`):

- model: the prediction of tile t against the counts of tile t;
- null (label shuffle): the prediction of tile ``perm[t]`` against the counts and mask of tile t,
  ``perm`` a random derangement (:func:`sparsitytrap.metrics.shuffle_pairs`); the partner tiles
  are read by index, batch by batch;
- ceiling: on simulated data the true expected count of every bin (the diffused rate times the
  capture efficiency, :func:`sparsitytrap.stores.truth.truth_rate`) scored as a prediction; on real
  data two binomial half-samples of the counts scored against each other, the correlations then
  Spearman-Brown corrected (:func:`sparsitytrap.metrics.correct_split_half`). The ceiling does
  not depend on the model: :func:`evaluate_ceiling` computes it once per test patient.

Outputs in ``out_dir``: ``per_gene.csv``, ``per_tile.parquet``, ``summary.json``.
"""

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from . import metrics as M
from .bootstrap import interval, replicates
from .errors import InputError
from .io import write_csv
from .stores import evaluation as store
from .stores.predictions import open_predictions
from .stores.tiles import open_tiles

log = logging.getLogger(__name__)

#: Pooling factors evaluated for PCC: 1, 2, 4 x the 2 um bin = 2, 4, 8 um.
SCALES = (1, 2, 4, 8)  # 2, 4, 8, 16 um
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
#: Metrics scored for the model, the null and the ceiling (after renaming): the metric registry.
SCORES = tuple(M.METRICS)
#: Scores where higher is better and 0 is chance: these get a fraction of the ceiling.
SIMILARITIES = tuple(name for name, spec in M.METRICS.items() if spec.similarity)


def _truth_window(truth_zarr, genes, origin, tile_bins):
    """True expected counts ``[G, tile_bins, tile_bins]`` of one tile (:func:`.stores.truth.truth_window`)."""
    from .stores.truth import truth_window

    return truth_window(truth_zarr, genes, origin, tile_bins)


# ---------------------------------------------------------------------------------------------
# the evaluation


def _metrics(n_genes, ssim_min_tissue, source, **kwargs):
    return M.GeneMetrics(n_genes, scales=SCALES, bin_um=2.0, ssim_min_tissue=ssim_min_tissue, source=source, **kwargs)


def _batches(n_tiles, batch_tiles):
    for t0 in range(0, n_tiles, batch_tiles):
        yield t0, min(t0 + batch_tiles, n_tiles)


def _ceiling_batch(counts, origins, t0, truth_zarr, genes, seed, draw=0):
    """Ceiling (prediction, target) of one batch: truth vs counts, or half vs half of the counts."""
    if truth_zarr is not None:
        tile_bins = counts.shape[-1]
        truth = np.stack([_truth_window(truth_zarr, genes, o, tile_bins) for o in origins])
        return truth, counts
    # one draw per (draw, tile), seeded by both indices: results do not depend on the batch size
    halves = [M.split_half_thinning(counts[i], seed=(seed, 1, draw, t0 + i)) for i in range(len(counts))]
    return np.stack([h[0] for h in halves]), np.stack([h[1] for h in halves])


def _table(gm, genes):
    return gm.table(genes).rename(columns=RENAME)


def per_gene_table(model, null, ceiling, genes, fold, categories=None):
    """Join model, null and ceiling tables into one row per gene, in the tile store's gene order.

    Columns: fold, gene, category (if known), sparsity, mean_target_pooled, n_tissue_bins, every
    score of :data:`SCORES`, ``<score>_null``, ``<score>_ceiling`` and, for similarities,
    ``<score>_frac_ceiling`` (model / ceiling; NaN where the ceiling is <= 0).
    """
    df = pd.DataFrame({"fold": fold, "gene": genes})
    if categories is not None:
        df["category"] = [categories.get(g, "Unassigned") for g in genes]
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
        for i, col in enumerate(store.sum_columns(um) + store.range_columns(um)):
            cols[col] = s[..., i].reshape(-1)
    return pd.DataFrame(cols)


def _bootstrap(per_tile, n_boot, seed):
    """95 % intervals over tiles of the mean over genes of the pooled PCCs and the per-tile SSIM."""
    if n_boot <= 0:
        return {}
    metrics = ("pcc_2um_pooled", "pcc_4um_pooled", "pcc_8um_pooled", "ssim_2um_pertile")
    return {m: interval(replicates(per_tile, m, n_boot, seed)) for m in metrics}


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


def _protocol(fold, sample, ceiling_kind, shuffle_seed, batch_tiles, ssim_min_tissue, n_boot, boot_seed):
    simulated = ceiling_kind == "simulated truth"
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
        "ceiling_kind": ceiling_kind,
        "ceiling": (
            "simulated truth: the true diffused rate times the capture efficiency (the expected count) "
            "scored as a prediction"
            if simulated
            else "split-half binomial thinning of the counts, the half-vs-half scores averaged over seeded "
            "thinning draws (16 by default); PCC and SCC then Spearman-Brown corrected (sqrt of the full-depth "
            "replicate correlation, exact for Pearson on Poisson counts; validated against simulated truth in "
            "bench/ceiling.py); ratio half vs half; no ceiling for SSIM and deviance "
            "(half-depth values are not comparable to full depth)"
        ),
        "frac_ceiling": "model score / ceiling score, per gene",
        "bootstrap": f"{n_boot} resamples of test tiles with replacement (seed {boot_seed}); 95 % expanded BCa "
        "interval of the mean over genes (bias correction from the resamples, acceleration from the "
        "leave-one-tile-out jackknife, tails widened by sqrt(n/(n-1)) t_(n-1) for n tiles; Hesterberg 2015)",
        "batch_tiles": batch_tiles,
    }


#: Thinning draws averaged by the real-data ceiling (bench/ceiling.py: the error against the truth falls
#: by about 30 % from 1 to 16 draws for 2 um PCC, most of it by 8).
CEILING_DRAWS = 16


def _ceiling_pass(tiles, truth_zarr, batch_tiles, seed, draw, ssim_min_tissue, source):
    """One streamed pass of the ceiling's (prediction, target) pairs: a metrics table per gene."""
    counts, mask, genes = tiles.counts, tiles.mask, tiles.genes
    origins = np.asarray(tiles.bin_origin[:])
    split = truth_zarr is None  # half-depth SSIM is never used: not computed
    gm = M.GeneMetrics(len(genes), scales=SCALES, bin_um=2.0, ssim=not split, ssim_min_tissue=ssim_min_tissue,
                       source=source)  # fmt: skip
    for t0, t1 in _batches(counts.shape[0], int(batch_tiles)):
        y, m = np.asarray(counts[t0:t1]), np.asarray(mask[t0:t1]).astype(bool)
        gm.update(*_ceiling_batch(y, origins[t0:t1], t0, truth_zarr, genes, seed, draw), m)
    return _table(gm, genes)


def split_half_draws(tiles_zarr, *, batch_tiles=4, seed=7, n_draws=CEILING_DRAWS):
    """Half-vs-half metrics tables of ``n_draws`` thinning draws, each seeded by ``seed``, the draw and the tile."""
    if int(n_draws) < 1:
        raise InputError("evaluation.ceiling_draws", f"must be >= 1, got {n_draws}")
    tiles = open_tiles(tiles_zarr)
    return [_ceiling_pass(tiles, None, batch_tiles, seed, d, 0.0, str(tiles_zarr)) for d in range(int(n_draws))]


def split_half_ceiling(draws):
    """Ceiling table from :func:`split_half_draws`: their mean, then Spearman-Brown corrected.

    Half-depth SSIM and deviance have no correction to full depth: NaN, no ceiling rather than a wrong one.
    """
    from .metrics.controls import correct_split_half, mean_of_draws

    table = correct_split_half(mean_of_draws(draws))
    table[["ssim_2um_pertile", "deviance_pooled"]] = np.nan
    return table


def ceiling_table(tiles_zarr, *, truth_zarr=None, batch_tiles=4, seed=7, ssim_min_tissue=0.05, n_draws=CEILING_DRAWS):
    """Noise ceiling per gene of one test patient (the same for every model), streamed by tile batches.

    Parameters
    ----------
    tiles_zarr
        The patient's tile store.
    truth_zarr
        Simulated ground truth: the expected counts are scored as a prediction. ``None``: split-half
        binomial thinning of the counts, the half-vs-half scores of ``n_draws`` draws averaged, then
        Spearman-Brown corrected (:func:`split_half_draws`, :func:`split_half_ceiling`; validated
        against the simulated truth by ``bench/ceiling.py``).
    batch_tiles, seed, ssim_min_tissue
        As in :func:`evaluate`.
    n_draws
        Thinning draws (real data only; one pass over the tiles each).

    Returns
    -------
    pandas.DataFrame: gene, ceiling_kind and the columns of :data:`SCORES`.
    """
    if truth_zarr is not None:
        tiles = open_tiles(tiles_zarr)
        table = _ceiling_pass(tiles, truth_zarr, batch_tiles, seed, 0, ssim_min_tissue, str(truth_zarr))
        kind = "simulated truth"
    else:
        draws = split_half_draws(tiles_zarr, batch_tiles=batch_tiles, seed=seed, n_draws=n_draws)
        table, kind = split_half_ceiling(draws), "split-half thinning"
    return pd.concat([pd.DataFrame({"gene": table["gene"], "ceiling_kind": kind}), table[list(SCORES)]], axis=1)


def evaluate_ceiling(tiles_zarr, out_csv, *, truth_zarr=None, batch_tiles=4, shuffle_seed=7, ssim_min_tissue=0.05,
                     n_draws=CEILING_DRAWS):  # fmt: skip
    """Write :func:`ceiling_table` of one test patient to ``out_csv`` (computed once, used by every model).

    Returns
    -------
    pandas.DataFrame, the table written.
    """
    table = ceiling_table(tiles_zarr, truth_zarr=truth_zarr, batch_tiles=batch_tiles, seed=shuffle_seed,
                          ssim_min_tissue=ssim_min_tissue, n_draws=n_draws)  # fmt: skip
    write_csv(table, out_csv)
    return table


def _read_ceiling(path, genes):
    """The ceiling table's rows of `genes`, in their order (it holds every gene of the tile store)."""
    table = pd.read_csv(path)
    missing = [c for c in ("gene", "ceiling_kind", *SCORES) if c not in table.columns]
    if missing:
        raise InputError(path, f"missing column(s) {missing}: not a ceiling table")
    return _rows_of(table, genes, path)


def _rows_of(table, genes, where):
    absent = [g for g in genes if g not in set(table["gene"])]
    if absent:
        raise InputError(where, f"{len(absent)} genes of the predictions are not in it, e.g. {absent[0]!r}")
    return table.set_index("gene").loc[list(genes)].reset_index()


def _stream(pred, tiles, perm, batch_tiles, ssim_min_tissue, source, gene_index=None):
    """Model and label-shuffle metrics, and per-tile sums, over tile batches (partners read by index).

    gene_index: the predicted genes' positions in the tile store (a fold's genes among the union).
    """
    counts, mask = tiles.counts, tiles.mask
    n_tiles, n_genes = pred.shape[:2]
    gm_model = _metrics(n_genes, ssim_min_tissue, source, keep_sums=True)
    gm_null = _metrics(n_genes, ssim_min_tissue, source, counts_of=gm_model)
    for t0, t1 in _batches(n_tiles, batch_tiles):
        y = np.asarray(counts[t0:t1])
        y = y if gene_index is None else y[:, gene_index]
        m = np.asarray(mask[t0:t1]).astype(bool)
        p = np.asarray(pred[t0:t1])
        shared = {}  # the count side of this batch, computed once for the model and the null
        gm_model.update(p, y, m, shared)
        partner = np.stack([np.asarray(pred[int(i)]) for i in perm[t0:t1]])
        gm_null.update(partner, y, m, shared)
        log.info("evaluated tiles %d-%d of %d", t0, t1, n_tiles)
    return gm_model, gm_null, gm_model.tile_sums()


def evaluate(
    pred_zarr,
    tiles_zarr,
    out_dir,
    *,
    truth_zarr=None,
    ceiling_csv=None,
    genes_csv=None,
    model=None,
    fold=None,
    batch_tiles=4,
    shuffle_seed=7,
    bootstrap=1000,
    bootstrap_seed=7,
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
    ceiling_csv
        A ceiling table of this patient from :func:`evaluate_ceiling`; when given, the ceiling is
        read from it instead of computed (it does not depend on the model).
    genes_csv
        Optional ``genes.csv``; its ``category`` column is copied into ``per_gene.csv``.
    model, fold
        Names written into ``summary.json`` and ``per_gene.csv``; default: the store's attributes,
        else the two folders above ``pred_zarr``.
    batch_tiles
        Tiles per batch (memory: a few ``batch_tiles * G * 128 * 128 * 8`` bytes; the pooled
        Spearman keeps ``tissue bins * G * 4`` bytes of counts, and as many of predictions for the
        model and for the null).
    shuffle_seed
        Seed of the label-shuffle derangement and of the split-half thinning.
    bootstrap, bootstrap_seed
        Resamples of tiles for the confidence intervals in ``summary.json`` (0: none), and their seed.
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
    store_p = open_predictions(pred_zarr)
    pred, attrs = store_p.rates, store_p.attrs
    # the model's genes (its fold's selection) among the tile store's (the union over folds)
    genes, sample = list(attrs.get("genes") or tiles.genes), tiles.sample
    absent = [g for g in genes if g not in set(tiles.genes)]
    if absent:
        raise InputError(pred_zarr, f"{len(absent)} predicted genes are not in the tile store, e.g. {absent[0]!r}")
    n, _, side, _ = tiles.counts.shape
    if tuple(pred.shape) != (n, len(genes), side, side):
        raise InputError(pred_zarr, f"rates {tuple(pred.shape)} does not match {n} tiles x {len(genes)} genes x {side}")
    gene_index = None if genes == tiles.genes else np.array([tiles.genes.index(g) for g in genes])
    if attrs.get("sample") and sample and attrs["sample"] != sample:
        raise InputError(pred_zarr, f"predicts sample {attrs['sample']!r} but the tile store is {sample!r}")
    if ceiling_csv is not None:
        ceiling = _read_ceiling(ceiling_csv, genes)
    else:
        ceiling = ceiling_table(
            tiles_zarr,
            truth_zarr=truth_zarr,
            batch_tiles=batch_tiles,
            seed=shuffle_seed,
            ssim_min_tissue=ssim_min_tissue,
        )
        ceiling = _rows_of(ceiling, genes, tiles_zarr)
    perm = M.shuffle_pairs(tiles.n_tiles, shuffle_seed)
    gm_model, gm_null, sums = _stream(pred, tiles, perm, int(batch_tiles), ssim_min_tissue, str(pred_zarr), gene_index)
    model = model or attrs.get("model") or pred_zarr.parent.parent.name
    fold = fold or attrs.get("fold") or pred_zarr.parent.name
    table = per_gene_table(
        _table(gm_model, genes), _table(gm_null, genes), ceiling, genes, fold, _categories(genes_csv)
    )
    per_tile = _per_tile_frame(genes, np.asarray(tiles.grid[:]), gm_model.per_tile(), sums)
    summary = {
        "model": model,
        "fold": fold,
        "test_sample": sample,
        # scores of a ranking model are not counts: ratio and deviance do not apply to them
        "relative_scores": store_p.relative,
        "n_tiles": tiles.n_tiles,
        "n_genes": len(genes),
        "n_tissue_bins": int(table["n_tissue_bins"].iloc[0]),
        "protocol": _protocol(
            fold,
            sample,
            ceiling["ceiling_kind"].iloc[0],
            shuffle_seed,
            int(batch_tiles),
            ssim_min_tissue,
            int(bootstrap),
            bootstrap_seed,
        ),
        "mean_over_genes": {
            c: float(np.nanmean(table[c])) if table[c].notna().any() else None
            for c in table.columns
            if c not in ("fold", "gene", "category", "n_tissue_bins", "ssim_2um_pairs")
        },
        "ci95": _bootstrap(per_tile, int(bootstrap), bootstrap_seed),
    }
    summary["protocol"]["gene_selection"] = _selection(genes_csv, fold, len(genes), len(tiles.genes))
    store.write(out_dir, table, per_tile, _clean(summary))
    return table


def _selection(genes_csv, fold, n_genes, n_union):
    """How this fold's genes were chosen (genes.csv has a ``rank_<fold>`` column when per fold)."""
    per_fold = genes_csv is not None and f"rank_{fold}" in pd.read_csv(genes_csv, nrows=0).columns
    if per_fold:
        return (
            f"leak-free: {n_genes} genes chosen on this fold's training patients only (genes.samples: training); "
            f"the tile stores hold the union over folds ({n_union} genes)"
        )
    return f"{n_genes} genes chosen once for every fold (genes.samples: all or a list, or a panel)"


def _categories(genes_csv):
    if genes_csv is None:
        return None
    df = pd.read_csv(genes_csv)
    if not {"gene", "category"} <= set(df.columns):
        raise InputError(genes_csv, "needs columns 'gene' and 'category'")
    return dict(zip(df["gene"], df["category"].fillna("Unassigned")))
