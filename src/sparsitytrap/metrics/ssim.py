"""SSIM at native resolution per (tile, gene), as scikit-image's (within 1e-15), one compiled pass per pair.

numba kernels (compiled on first use, cached next to this file): a pair's masking, range scaling,
five window moments and SSIM map are computed row by row in cache, where the vectorised torch
version it replaced made a dozen passes over float64 copies of every pair.
"""

import numba
import numpy as np

from ._tensors import kernel_array, like

SSIM_WIN = 7
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_MIN_TISSUE = 0.05
SSIM_MIN_RANGE = 1e-6


#: Floating-point freedoms of the SSIM kernel (no NaN or infinity assumptions): reordered sums,
#: fused multiply-adds and reciprocals change its numbers by about 1e-16 and halve its time.
_FREEDOMS = {"reassoc", "contract", "arcp", "nsz"}


@numba.njit(cache=True, nogil=True, fastmath=_FREEDOMS)
def _ssim_mean(a, b, lo, scale, win, c1, c2, v, c, row):
    """Mean SSIM map of one pair ``(a - lo) * scale, (b - lo) * scale`` (``a, b [H, W]`` float64),
    skimage's uniform window, cropped borders.

    Scratch: ``v [5, H - win + 1, W]``, ``c [5, W + 1]`` (``c[:, 0]`` is 0), ``row [W]``. The five
    moments' window sums go down the rows by a sliding window and along them by differences of a
    running sum; each row of the SSIM map is made in vector lanes, then summed. Within 1e-15 of skimage.
    """
    h, w = a.shape
    n, m = h - win + 1, w - win + 1
    v[:, 0, :] = 0.0
    for d in range(win):
        for j in range(w):
            x, y = (a[d, j] - lo) * scale, (b[d, j] - lo) * scale
            v[0, 0, j] += x
            v[1, 0, j] += y
            v[2, 0, j] += x * x
            v[3, 0, j] += y * y
            v[4, 0, j] += x * y
    for i in range(1, n):
        for j in range(w):
            x, y = (a[i + win - 1, j] - lo) * scale, (b[i + win - 1, j] - lo) * scale
            p, q = (a[i - 1, j] - lo) * scale, (b[i - 1, j] - lo) * scale
            v[0, i, j] = v[0, i - 1, j] + (x - p)
            v[1, i, j] = v[1, i - 1, j] + (y - q)
            v[2, i, j] = v[2, i - 1, j] + (x * x - p * p)
            v[3, i, j] = v[3, i - 1, j] + (y * y - q * q)
            v[4, i, j] = v[4, i - 1, j] + (x * y - p * q)
    area = win * win
    inv, cov_norm = 1.0 / area, area / (area - 1)
    total = 0.0
    for i in range(n):
        r0 = r1 = r2 = r3 = r4 = 0.0  # five running sums side by side: independent chains
        for j in range(w):
            r0 += v[0, i, j]
            r1 += v[1, i, j]
            r2 += v[2, i, j]
            r3 += v[3, i, j]
            r4 += v[4, i, j]
            c[0, j + 1], c[1, j + 1], c[2, j + 1], c[3, j + 1], c[4, j + 1] = r0, r1, r2, r3, r4
        for j in range(m):
            e = j + win
            ux, uy = (c[0, e] - c[0, j]) * inv, (c[1, e] - c[1, j]) * inv
            sxx, syy, sxy = (c[2, e] - c[2, j]) * inv, (c[3, e] - c[3, j]) * inv, (c[4, e] - c[4, j]) * inv
            uxy, uxx, uyy = ux * uy, ux * ux, uy * uy
            vx, vy, vxy = (sxx - uxx) * cov_norm, (syy - uyy) * cov_norm, (sxy - uxy) * cov_norm
            row[j] = ((uxy * 2 + c1) * (vxy * 2 + c2)) / ((uxx + uyy + c1) * (vx + vy + c2))
        for j in range(m):
            total += row[j]
    return total / (n * m)


@numba.njit(cache=True, nogil=True)
def _scratch(h, w, win):
    return np.empty((5, h - win + 1, w)), np.zeros((5, w + 1)), np.empty(w)


@numba.njit(cache=True, nogil=True)
def _ssim_images(a, b, win, c1, c2):
    n_img, h, w = a.shape
    v, c, row = _scratch(h, w, win)
    out = np.empty(n_img)
    for k in range(n_img):
        out[k] = _ssim_mean(a[k], b[k], 0.0, 1.0, win, c1, c2, v, c, row)
    return out


@numba.njit(cache=True, nogil=True)
def _ssim_tiles(pred, target, mask, tiles, win, c1, c2, min_range, out):
    """SSIM of every gene of ``tiles`` into ``out [T, G]``: ``pred, target [T, G, H, W]``, ``mask [T, H, W]``."""
    _, g, h, w = pred.shape
    a, b = np.empty((h, w)), np.empty((h, w))
    v, c, row = _scratch(h, w, win)
    for t in tiles:
        for k in range(g):
            lo, hi = np.inf, -np.inf
            for i in range(h):
                for j in range(w):
                    on = mask[t, i, j]  # off tissue 0, whatever is there (a NaN times 0 would be NaN)
                    x = np.float64(pred[t, k, i, j]) if on else 0.0
                    y = np.float64(target[t, k, i, j]) if on else 0.0
                    a[i, j], b[i, j] = x, y
                    lo, hi = min(lo, x, y), max(hi, x, y)
            span = hi - lo
            if span >= min_range:  # min-max scaled with the pair's shared range, on the fly
                out[t, k] = _ssim_mean(a, b, lo, 1.0 / span, win, c1, c2, v, c, row)


def _constants(data_range=1.0):
    return (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2


def ssim_images(a, b, win=SSIM_WIN, data_range=1.0):
    """Mean SSIM of image pairs, exactly as ``skimage.metrics.structural_similarity``.

    Uniform ``win x win`` window, K1 0.01, K2 0.03, sample covariance (``NP / (NP - 1)``), mean
    over the region skimage keeps after cropping ``(win - 1) // 2`` bins from each border.

    Parameters
    ----------
    a, b
        ``[N, H, W]`` float tensors (computed in float64).

    Returns
    -------
    ``[N]`` float64 tensor.
    """
    x, y = (kernel_array(t).astype(np.float64) for t in (a, b))
    return like(a, _ssim_images(x, y, win, *_constants(data_range)))


def ssim_per_tile(pred, target, mask, ssim_min_tissue=SSIM_MIN_TISSUE):
    """SSIM at native resolution per (tile, gene), the seeds' definition (see module docstring).

    Parameters
    ----------
    pred, target
        ``[T, G, H, W]`` tensors or arrays.
    mask
        ``[T, H, W]`` bool.
    ssim_min_tissue
        Tiles need a tissue fraction above this.

    Returns
    -------
    ``[T, G]`` float64 tensor, NaN for skipped pairs (little tissue, or shared range < 1e-6).
    """
    t, g = pred.shape[:2]
    out = np.full((t, g), np.nan)
    m = kernel_array(mask).astype(bool)
    tiles = np.flatnonzero(m.mean(axis=(1, 2)) > ssim_min_tissue)
    if len(tiles):
        _ssim_tiles(kernel_array(pred), kernel_array(target), m, tiles, SSIM_WIN, *_constants(), SSIM_MIN_RANGE, out)
    return like(pred, out)
