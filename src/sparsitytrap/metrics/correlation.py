"""Pearson and Spearman: per-tile values from per-(tile, gene) moments and ranks, pooled from sums."""

from dataclasses import dataclass

import numpy as np

from . import compiled as K
from ._tensors import kernel_array, like
from .sums import pearson_from_sums  # noqa: F401 - part of this module's API

#: Rates are clamped at this in the Poisson deviance.
DEVIANCE_EPS = 1e-8


def average_ranks(x, valid=None):
    """1-based ranks along the last axis; ties get the mean of their ranks (``rankdata``'s 'average').

    Vectorised over all leading axes (:func:`.kernels.rank_rows`: a radix sort, or counting when
    few bit patterns vary, e.g. counts and float16). ``valid`` (bool, same shape): rank among the
    valid entries only (invalid entries get rank 0). float64 ranks (a tensor on ``x``'s device for a tensor).
    """
    a = kernel_array(x)
    if a.size == 0:
        return like(x, np.zeros(a.shape))
    rows = a.reshape(-1, a.shape[-1] if a.ndim else 1)
    v = np.ones(rows.shape, dtype=bool) if valid is None else kernel_array(valid).astype(bool).reshape(rows.shape)
    r = K.rank_rows(rows, v).reshape(a.shape)
    return like(x, r)


@dataclass
class TileSide:
    """The counts' side of a batch at one pooling, shared by every prediction scored against it.

    ``values``: ``[G, N]`` float64 tissue values, tiles in order (:func:`.kernels.gather`);
    ``offsets``: ``[T + 1]`` the tiles' starts in them; ``moments``: ``[T, G, 3]`` mean, min and
    max (NaN: no tissue); ``ranks``: ``[G, N]`` centred average ranks within each tile, or ``[G, 0]``
    without Spearman.
    """

    values: np.ndarray
    offsets: np.ndarray
    moments: np.ndarray
    ranks: np.ndarray

    @property
    def counts(self):
        """Tissue bins per tile, ``[T]``."""
        return np.diff(self.offsets)


def tile_side(x, mask, ranks=True):
    """:class:`TileSide` of ``x [T, G, h, w]`` at tissue ``mask [T, h, w]``; ``ranks``: for Spearman."""
    values, offsets = K.gather(x, mask)
    r = K.tile_ranks(values, offsets) if ranks else np.empty((len(values), 0))
    return TileSide(values, offsets, K.moments(values, offsets), r)


@dataclass
class Pair:
    """Predictions at one pooling scored against a :class:`TileSide` of the counts (:func:`score`).

    ``moments`` ``[T, G, 3]`` of the predictions (mean, min, max); ``sums`` ``[T, G, 6]`` centred
    sums: of squared deviations from the tile means of predictions and of counts, of their
    products, then the same of the centred ranks (0 without ranks); ``raw`` ``[T, G, 5]`` sums of
    x, y, xx, yy, xy (zeros unless asked); ``count_sums`` ``[4, G]`` (see :func:`.kernels.pair`);
    ``stored`` ``[G, N]`` float32 tissue predictions (``[G, 0]`` unless asked).
    """

    target: TileSide
    moments: np.ndarray
    sums: np.ndarray
    raw: np.ndarray
    count_sums: np.ndarray
    stored: np.ndarray

    @property
    def undefined(self):
        """``[T, G]`` bool: either side is constant on the tile's tissue (max == min exactly), or < 2 bins."""
        (lo, hi), (lo_y, hi_y) = ((m[..., 1], m[..., 2]) for m in (self.moments, self.target.moments))
        return (self.target.counts < 2)[:, None] | ~(lo < hi) | ~(lo_y < hi_y)


def score(x, mask, target, ranks=False, raw=False, counts=False, stored=False, eps=DEVIANCE_EPS):
    """The :class:`Pair` of predictions ``x [T, G, h, w]`` at ``mask`` against the counts' ``target`` side."""
    out = K.pair(x, mask, target.values, target.moments[..., 0], target.ranks, target.offsets, ranks, raw, counts,
                 stored, eps)  # fmt: skip
    return Pair(target, *out)


def _correlation(num, ss_a, ss_b, undefined):
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.clip(num / np.sqrt(ss_a * ss_b), -1, 1)
    return np.where(undefined, np.nan, r)


def tile_pearson(pair):
    """Pearson per (tile, gene) of a :class:`Pair`, ``[T, G]``, NaN where undefined."""
    s = pair.sums
    return _correlation(s[..., 2], s[..., 0], s[..., 1], pair.undefined)


def tile_spearman(pair):
    """Spearman per (tile, gene) of a :class:`Pair` scored with ranks: Pearson of the centred ranks."""
    s = pair.sums
    few = (pair.target.counts < 2)[:, None]
    return _correlation(s[..., 5], s[..., 3], s[..., 4], (s[..., 3] == 0) | (s[..., 4] == 0) | few)


def _batch_pair(pred, target, mask, **kwargs):
    """The :class:`Pair` of one batch of tensors or arrays ``pred, target [T, G, H, W]``, ``mask [T, H, W]``."""
    m = kernel_array(mask).astype(bool)
    side = tile_side(kernel_array(target), m, ranks=kwargs.get("ranks", False))
    return score(kernel_array(pred), m, side, **kwargs)


def pearson_per_tile(pred, target, mask):
    """Pearson per (tile, gene) over the tile's tissue bins.

    Parameters
    ----------
    pred, target
        ``[T, G, H, W]``.
    mask
        ``[T, H, W]`` bool.

    Returns
    -------
    ``[T, G]`` float64 (a tensor for tensor predictions); NaN where a tile has < 2 tissue bins or
    either side is constant.
    """
    return like(pred, tile_pearson(_batch_pair(pred, target, mask)))


def spearman_per_tile(pred, target, mask):
    """Spearman per (tile, gene) over the tile's tissue bins (average ranks for ties); ``[T, G]``.

    NaN where a tile has < 2 tissue bins or either side is constant there.
    """
    return like(pred, tile_spearman(_batch_pair(pred, target, mask, ranks=True)))
