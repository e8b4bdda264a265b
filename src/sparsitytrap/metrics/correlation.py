"""Pearson and Spearman: the one pooled Pearson (from sufficient statistics), per-tile values, ranks."""

import numpy as np
import torch

from ._tensors import F64


def average_ranks(x):
    """1-based ranks along the last axis; ties get the mean of their ranks (``rankdata``'s 'average').

    Vectorised over all leading axes (sort, then tie groups from cumulative max/min of their
    first and last positions).
    """
    s, order = torch.sort(x, dim=-1, stable=True)
    n = x.shape[-1]
    pos = torch.arange(n, device=x.device).expand_as(s)
    first = torch.ones_like(s, dtype=torch.bool)
    first[..., 1:] = s[..., 1:] != s[..., :-1]
    last = torch.ones_like(first)
    last[..., :-1] = first[..., 1:]
    start = torch.where(first, pos, 0).cummax(dim=-1).values
    end = torch.where(last, pos, n).flip(-1).cummin(dim=-1).values.flip(-1)
    avg = (start + end).to(F64) / 2 + 1
    return torch.empty_like(avg).scatter_(-1, order, avg)


def _pearson_from_centered(xc, yc, dims):
    return (xc * yc).sum(dims) / torch.sqrt((xc * xc).sum(dims) * (yc * yc).sum(dims))


def pearson_from_sums(sums, constant):
    """Pearson r from sufficient statistics: the one implementation of a pooled Pearson.

    Parameters
    ----------
    sums
        ``[..., 6]``: n and the sums of x, y, xx, yy, xy (x, y may be shifted by a constant each).
    constant
        ``[...]`` bool: a side is exactly constant (its min equals its max): no correlation.

    Returns
    -------
    ``[...]`` float64 numpy array, NaN where n < 2 or a side is constant.
    """
    n, sx, sy, sxx, syy, sxy = np.moveaxis(np.asarray(sums, dtype=np.float64), -1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cxx, cyy, cxy = sxx - sx * sx / n, syy - sy * sy / n, sxy - sx * sy / n
        r = np.clip(cxy / np.sqrt(cxx * cyy), -1, 1)
    return np.where(np.asarray(constant) | (n < 2), np.nan, r)


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
    x, y = pred.to(F64), target.to(F64)
    m = mask[:, None]
    n = m.sum(dim=(2, 3)).to(F64)
    mf = m.to(F64)
    xc = (x - (x * mf).sum(dim=(2, 3), keepdim=True) / n[..., None, None].clamp(min=1)) * mf
    yc = (y - (y * mf).sum(dim=(2, 3), keepdim=True) / n[..., None, None].clamp(min=1)) * mf
    r = _pearson_from_centered(xc, yc, (2, 3)).clamp(-1, 1)
    # constant means max == min exactly (a variance tolerance would mis-handle tiny signals)
    inf = torch.tensor(float("inf"), dtype=F64, device=x.device)
    const_x = torch.where(m, x, inf).amin(dim=(2, 3)) == torch.where(m, x, -inf).amax(dim=(2, 3))
    const_y = torch.where(m, y, inf).amin(dim=(2, 3)) == torch.where(m, y, -inf).amax(dim=(2, 3))
    bad = const_x | const_y | (n < 2)
    return torch.where(bad, torch.nan, r)


def spearman_per_tile(pred, target, mask):
    """Spearman per (tile, gene) over the tile's tissue bins (average ranks for ties); ``[T, G]``."""
    t, g, h, w = pred.shape
    flat = mask.reshape(t, 1, h * w)

    def ranks(x):
        # float32 holds counts and float16/32 rates exactly (faster sort); float64 stays float64
        x = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(t, g, h * w)
        # off-tissue bins rank after every tissue bin: tissue ranks are those among tissue bins
        return average_ranks(torch.where(flat, x, float("inf")))

    rx, ry = ranks(pred), ranks(target)
    return pearson_per_tile(rx.reshape(t, g, h, w), ry.reshape(t, g, h, w), mask)
