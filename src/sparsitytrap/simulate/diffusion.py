"""Lateral diffusion: a known, linear kernel on the bin grid, applied to each programme.

Because the kernel is linear, diffusing the K programmes and then multiplying by the loadings
gives the diffused rate of every gene: the G genes are never diffused one by one.
"""

import math

import numpy as np
from scipy import signal


def diffusion_kernel(bin_um, sigma_um, tail_weight=0.0, tail_um=0.0, supersample=5):
    """Lateral diffusion kernel on the bin grid: a Gaussian plus an exponential tail.

    kernel(r) = (1 - w) N(r; sigma) + w exp(-r / tail) / (2 pi tail^2), integrated over each bin
    (midpoint rule on a supersample x supersample sub-grid) and normalised to sum 1.

    Parameters
    ----------
    bin_um
        Bin size in um.
    sigma_um
        Gaussian standard deviation in um (0: no Gaussian part).
    tail_weight, tail_um
        Weight w and length of the exponential tail.
    supersample
        Sub-grid points per bin side.

    Returns
    -------
    numpy.ndarray
        float32 [2h + 1, 2h + 1], h bins covering 4 sigma and 6 tail lengths.
    """
    reach = max(4.0 * sigma_um, 6.0 * tail_um if tail_weight > 0 else 0.0)
    half = int(math.ceil(reach / bin_um))
    if half == 0:
        return np.ones((1, 1), np.float32)
    sub = (np.arange(supersample) + 0.5) / supersample - 0.5
    off = (np.arange(-half, half + 1)[:, None] + sub[None, :]).ravel() * bin_um
    r = np.hypot(off[:, None], off[None, :])
    k = np.zeros_like(r)
    if sigma_um > 0:
        k += (1 - tail_weight) * np.exp(-0.5 * (r / sigma_um) ** 2) / (2 * np.pi * sigma_um**2)
    if tail_weight > 0 and tail_um > 0:
        k += tail_weight * np.exp(-r / tail_um) / (2 * np.pi * tail_um**2)
    n = 2 * half + 1
    k = k.reshape(n, supersample, n, supersample).sum(axis=(1, 3))
    return (k / k.sum()).astype(np.float32)


def diffuse(programmes, kernel):
    """Diffuse every programme: convolution with the kernel, zero outside the grid.

    Convolution is linear, so diffused gene rates are the diffused programmes times the loadings.

    Parameters
    ----------
    programmes
        [K, rows, cols].
    kernel
        From `diffusion_kernel`.

    Returns
    -------
    numpy.ndarray
        float32 [K, rows, cols].
    """
    out = np.empty_like(programmes, dtype=np.float32)
    for k in range(programmes.shape[0]):
        out[k] = np.maximum(signal.fftconvolve(programmes[k], kernel, mode="same"), 0.0)
    return out
