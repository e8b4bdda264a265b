"""The tile bootstrap: test tiles resampled with replacement, one implementation for every interval.

The evaluation's ``ci95`` (one fold), the bar chart's intervals (mean over folds) and the
statistics' paired intervals of a difference between two models all come from
:func:`replicates`, seeded per purpose by ``evaluation.bootstrap_seed``. Within a fold the
resampled tiles depend only on the seed and the number of tiles, so two models of one fold are
resampled with the same tiles: their difference is paired.
"""

import re

import numpy as np

from .metrics import pearson_from_sums
from .stores import evaluation as store

#: Replicates per einsum chunk: bounds memory to chunk x genes x 6 floats.
CHUNK = 100


def weights(n_tiles, n_boot, seed):
    """``[n_boot, n_tiles]`` multiplicities of tiles drawn with replacement (rows sum to n_tiles).

    ``seed`` is the bootstrap seed; the stream ``[seed, 2]`` is the one earlier releases used.
    """
    rng = np.random.default_rng([seed, 2])
    return rng.multinomial(n_tiles, np.full(n_tiles, 1.0 / n_tiles), size=n_boot).astype(np.float64)


def gene_mean(values):
    """Mean over the last axis (genes) ignoring NaN; NaN, without a warning, where none is defined."""
    ok = np.isfinite(values)
    n = ok.sum(-1)
    return np.where(n > 0, np.where(ok, values, 0.0).sum(-1) / np.maximum(n, 1), np.nan)


def replicates(per_tile, metric, n_boot, seed):
    """Bootstrap replicates of the mean over genes of a metric, over the tiles of one evaluation.

    Pooled PCC is recomputed from the per-tile sums and ranges; a per-tile metric is re-averaged
    over the drawn tiles (NaN tiles left out).

    Returns
    -------
    ``[n_boot]`` float array, or None when the metric cannot be resampled from ``per_tile``.
    """
    n_tiles = int(per_tile["tile"].max()) + 1
    n_genes = len(per_tile) // n_tiles
    w = weights(n_tiles, n_boot, seed)
    pooled = re.fullmatch(r"pcc_(\d+um)_pooled", metric)
    if pooled and store.sum_columns(pooled[1])[0] in per_tile.columns:
        sums = per_tile[store.sum_columns(pooled[1])].to_numpy().reshape(n_tiles, n_genes, len(store.SUMS))
        ranges = per_tile[store.range_columns(pooled[1])].to_numpy().reshape(n_tiles, n_genes, len(store.RANGES))
        r = [_pooled_pcc(w[i : i + CHUNK], sums, ranges) for i in range(0, len(w), CHUNK)]
        return gene_mean(np.concatenate(r))
    if metric in per_tile.columns:
        v = per_tile[metric].to_numpy().reshape(n_tiles, n_genes)
        ok = np.isfinite(v)
        with np.errstate(invalid="ignore", divide="ignore"):
            return gene_mean((w @ np.where(ok, v, 0.0)) / (w @ ok))
    return None


def _pooled_pcc(w, sums, ranges):
    """Pooled Pearson ``[B, G]`` of B weighted multisets of tiles."""
    drawn = (w > 0)[:, :, None]
    lo = lambda a: np.where(drawn, a[None], np.inf).min(1)  # noqa: E731
    hi = lambda a: np.where(drawn, a[None], -np.inf).max(1)  # noqa: E731
    constant = (lo(ranges[..., 0]) == hi(ranges[..., 1])) | (lo(ranges[..., 2]) == hi(ranges[..., 3]))
    return pearson_from_sums(np.einsum("bt,tgs->bgs", w, sums), constant)


def interval(values, level=0.95):
    """Percentile interval ``[low, high]`` of finite replicates; ``[None, None]`` if there are none."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return [None, None]
    tail = round((1 - level) / 2, 12)  # 0.025, not 0.025000000000000022
    return [float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))]


def fold_mean(per_tiles, metric, n_boot, seed):
    """Replicates of the mean over folds (one ``per_tile`` table each); None if not resamplable."""
    reps = [replicates(t, metric, n_boot, seed) for t in per_tiles]
    if not reps or any(r is None for r in reps):
        return None
    return gene_mean(np.stack(reps, axis=-1))  # mean over folds, NaN folds left out


def paired_delta(per_tiles_a, per_tiles_b, metric, n_boot, seed):
    """Replicates of the mean over folds of B - A, both resampled with the same tiles in each fold."""
    deltas = []
    for ta, tb in zip(per_tiles_a, per_tiles_b, strict=True):
        ra, rb = replicates(ta, metric, n_boot, seed), replicates(tb, metric, n_boot, seed)
        if ra is None or rb is None:
            return None
        deltas.append(rb - ra)
    return gene_mean(np.stack(deltas, axis=-1)) if deltas else None
