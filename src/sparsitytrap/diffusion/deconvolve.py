"""The classical baseline: Richardson-Lucy (Poisson maximum-likelihood) deconvolution per gene.

Used by `validate` only, on one gene's whole grid at a time (scikit-image's implementation; FFT
convolutions, so memory is a few grids). Early stopping (`rl_iterations`) is its only
regulariser: RL started from a flat field first blurs the counts, then sharpens them.
"""

import math

import numpy as np


def gaussian_kernel(length_um, bin_um=2.0, truncate=4.0):
    """Normalised 2-D Gaussian kernel (sd `length_um`) sampled at bin centres, [2R + 1, 2R + 1]."""
    sigma = length_um / bin_um
    radius = max(1, math.ceil(truncate * sigma))
    k = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (k / sigma) ** 2)
    kernel = np.outer(g, g)
    return kernel / kernel.sum()


def richardson_lucy(counts, kernel, n_iter):
    """RL deconvolution of one gene's counts [H, W] with a normalised kernel; float32 [H, W].

    Zero-count grids are returned as zeros (RL would divide 0 by 0 nowhere, but needs no work).
    """
    from skimage.restoration import richardson_lucy as rl

    counts = np.asarray(counts, np.float64)
    if n_iter == 0 or not counts.any():
        return counts.astype(np.float32)
    return rl(counts, np.asarray(kernel, np.float64), num_iter=n_iter, clip=False).astype(np.float32)
