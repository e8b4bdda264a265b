"""Pearson and Spearman: per-tile values from per-(tile, gene) moments and ranks, pooled from sums."""

from dataclasses import dataclass

import numpy as np
import torch

from . import kernels as K
from ._tensors import kernel_array
from .sums import pearson_from_sums  # noqa: F401 - part of this module's API


def average_ranks(x, valid=None):
    """1-based ranks along the last axis; ties get the mean of their ranks (``rankdata``'s 'average').

    Vectorised over all leading axes (:func:`.kernels.rank_rows`: a radix sort, or counting when
    few bit patterns vary, e.g. counts and float16). ``valid`` (bool, same shape): rank among the
    valid entries only (invalid entries get rank 0). float64 ranks, a tensor on ``x``'s device.
    """
    a = kernel_array(x)
    if a.size == 0:
        return torch.zeros(a.shape, dtype=torch.float64)
    rows = a.reshape(-1, a.shape[-1] if a.ndim else 1)
    v = np.ones(rows.shape, dtype=bool) if valid is None else kernel_array(valid).astype(bool).reshape(rows.shape)
    r = K.rank_rows(rows, v).reshape(a.shape)
    return torch.from_numpy(r).to(x.device if isinstance(x, torch.Tensor) else "cpu")


@dataclass
class TileSide:
    """One side (predictions or counts) of a batch at one pooling, as every per-tile metric needs it.

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

    @property
    def constant(self):
        """``[T, G]`` bool: the side is constant on the tile's tissue (max == min exactly) or has < 2 bins."""
        lo, hi = self.moments[..., 1], self.moments[..., 2]
        return ~(lo < hi) | (self.counts < 2)[:, None]


def tile_side(values, offsets, ranks=True):
    """:class:`TileSide` of tissue values ``[G, N]`` with tile ``offsets``; ``ranks``: for Spearman."""
    r = K.tile_ranks(values, offsets) if ranks else np.empty((len(values), 0))
    return TileSide(values, offsets, K.moments(values, offsets), r)


def tile_pair(a, b):
    """Per (tile, gene) centred sums of two :class:`TileSide` s, ``[T, G, 6]``: of squared deviations
    from the tile means of a and of b, of their products, then the same of the centred ranks."""
    return K.centred(a.values, a.moments[..., 0], b.values, b.moments[..., 0], a.ranks, b.ranks, a.offsets)


def _correlation(num, ss_a, ss_b, undefined):
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.clip(num / np.sqrt(ss_a * ss_b), -1, 1)
    return np.where(undefined, np.nan, r)


def tile_pearson(a, b, sums):
    """Pearson per (tile, gene) of two :class:`TileSide` s with their :func:`tile_pair` sums, NaN where undefined."""
    return _correlation(sums[..., 2], sums[..., 0], sums[..., 1], a.constant | b.constant)


def tile_spearman(a, b, sums):
    """Spearman per (tile, gene): Pearson of the centred ranks (:func:`tile_pair`), NaN where undefined."""
    ss_a, ss_b = sums[..., 3], sums[..., 4]
    return _correlation(sums[..., 5], ss_a, ss_b, (ss_a == 0) | (ss_b == 0) | (a.counts < 2)[:, None])


def _sides(pred, target, mask, ranks):
    m = kernel_array(mask).astype(bool)
    x, offsets = K.gather(kernel_array(pred), m)
    y, _ = K.gather(kernel_array(target), m)
    return tile_side(x, offsets, ranks), tile_side(y, offsets, ranks)


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
    ``[T, G]`` float64 tensor; NaN where a tile has < 2 tissue bins or either side is constant.
    """
    a, b = _sides(pred, target, mask, ranks=False)
    return torch.from_numpy(tile_pearson(a, b, tile_pair(a, b)))


def spearman_per_tile(pred, target, mask):
    """Spearman per (tile, gene) over the tile's tissue bins (average ranks for ties); ``[T, G]``.

    NaN where a tile has < 2 tissue bins or either side is constant there.
    """
    a, b = _sides(pred, target, mask, ranks=True)
    return torch.from_numpy(tile_spearman(a, b, tile_pair(a, b)))
