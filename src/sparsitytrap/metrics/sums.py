"""Pearson from sufficient statistics, in numpy only: what the bootstrap needs without torch."""

import numpy as np


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
