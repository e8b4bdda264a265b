"""SSIM at native resolution per (tile, gene), as scikit-image's (within 1e-15), one compiled pass per pair.

A compiled kernel (:func:`.kernels.ssim_tiles`): a pair's masking, range scaling, five window
moments and SSIM map are computed row by row in cache, where the vectorised torch version it
replaced made a dozen passes over float64 copies of every pair.
"""

import numpy as np

from . import compiled as K
from ._tensors import kernel_array, like

SSIM_WIN = 7
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_MIN_TISSUE = 0.05
SSIM_MIN_RANGE = 1e-6


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
    return like(a, K.ssim_images(x, y, win, *_constants(data_range)))


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
        K.ssim_tiles(kernel_array(pred), kernel_array(target), m, tiles, SSIM_WIN, *_constants(), SSIM_MIN_RANGE, out)
    return like(pred, out)
