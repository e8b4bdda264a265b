"""Controls: the label-shuffle null and the split-half noise ceiling on real counts."""

import warnings

import numpy as np

from ..errors import InputError
from ._tensors import is_tensor, like


def shuffle_pairs(n_tiles, seed):
    """A random derangement of tiles for the label-shuffle null.

    The null scores the prediction of tile ``perm[t]`` against the target and mask of tile
    ``t`` (``perm[t] != t`` for every t), so every target is scored once, on its own tissue.

    Parameters
    ----------
    n_tiles
        Number of tiles (at least 2).
    seed
        Random seed.

    Returns
    -------
    ``[n_tiles]`` int64 numpy array.
    """
    if n_tiles < 2:
        raise InputError("n_tiles", f"a label shuffle needs at least 2 tiles, got {n_tiles}")
    rng = np.random.default_rng(seed)
    idx = np.arange(n_tiles)
    while True:  # rejection sampling: uniform over derangements, about e tries on average
        perm = rng.permutation(n_tiles)
        if not (perm == idx).any():
            return perm


def split_half_thinning(counts, seed):
    """Split counts into two halves by binomial thinning: ``y1 ~ Binomial(y, 0.5)``, ``y2 = y - y1``.

    For Poisson counts the halves are independent Poisson(rate / 2) given the rate, i.e. two
    half-depth replicates. Scoring ``y1`` against ``y2``, averaging over draws
    (:func:`mean_of_draws`) and correcting with :func:`correct_split_half` estimates the noise ceiling.

    Parameters
    ----------
    counts
        Non-negative integer counts (numpy array or torch tensor), any shape.
    seed
        Int, or a sequence such as ``(seed, first_tile_index)`` so that streamed batches get
        distinct but reproducible draws.

    Returns
    -------
    y1, y2
        Same type, shape and dtype as ``counts``.
    """
    is_torch = is_tensor(counts)
    y = counts.cpu().numpy() if is_torch else np.asarray(counts)
    if y.size and (y < 0).any():
        raise InputError("counts", "binomial thinning needs non-negative counts")
    if y.size and not np.array_equal(y, np.round(y)):
        raise InputError("counts", "binomial thinning needs integer counts")
    rng = np.random.default_rng(seed)
    y1 = rng.binomial(y.astype(np.int64), 0.5).astype(y.dtype)
    y2 = y - y1
    if is_torch:
        return like(counts, y1), like(counts, y2)
    return y1, y2


def spearman_brown(r):
    """Full-depth replicate correlation from a split-half correlation: ``2 r / (1 + r)``."""
    r = np.asarray(r, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 2 * r / (1 + r)


def noise_ceiling(r_half):
    """Noise ceiling of a correlation metric from its split-half value.

    Spearman-Brown gives the correlation between two full-depth replicates,
    ``rho = 2 r / (1 + r)``; for counts y = rate + independent noise this is
    ``var(rate) / var(y)``, and the best correlation any prediction can reach against y (the
    true rate's) is ``sqrt(rho)``. Exact for Pearson on Poisson counts; an approximation for
    Spearman. Split-half values <= 0 give a ceiling of 0.
    """
    rho = spearman_brown(np.clip(np.asarray(r_half, dtype=float), 0.0, None))
    return np.sqrt(rho)


def mean_of_draws(tables):
    """Mean per gene over thinning draws of half-vs-half metrics tables (same genes, same columns).

    Averaged before :func:`correct_split_half`: the correction clips at 0 and is concave, so
    correcting each draw and then averaging would keep every draw's clipping and bias. NaN values
    (a draw where a half is constant) are left out of the mean.
    """
    if not tables:
        raise InputError("evaluation.ceiling_draws", "no thinning draw to average")
    numeric = [c for c in tables[0].columns if np.issubdtype(tables[0][c].dtype, np.number)]
    out = tables[0].copy()
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN genes stay NaN
        out[numeric] = np.nanmean(np.stack([t[numeric].to_numpy(dtype=float) for t in tables]), axis=0)
    return out


def correct_split_half(table):
    """Turn a metrics table of ``y1`` scored against ``y2`` into noise ceilings.

    The ``pcc_*`` and ``scc_*`` columns are replaced by :func:`noise_ceiling` of their values;
    the other columns (SSIM, ratio, deviance) stay the raw half-vs-half values, for which no
    standard correction exists.
    """
    out = table.copy()
    for col in out.columns:
        if col.startswith(("pcc_", "scc_")):
            out[col] = noise_ceiling(out[col].to_numpy())
    return out
