"""Grid statistics shared by the loss and the validation: Moran's I, SSIM, gradients, TV.

All take fields [G, H, W] (torch, any float dtype) and compute local sums by separable
convolution, so they are linear in the number of bins: the seed's dense N x N spatial weight
matrix is replaced by a Gaussian neighbourhood with a zero centre.
"""

import math

import torch

from .sinkhorn import blur, grid4

MORAN_SIGMA_BINS = 1.0  # Moran's I neighbourhood: Gaussian weights, sd 1 bin, truncated at 3 sd
SSIM_SIGMA_BINS = 1.5  # SSIM window (the usual 11-tap Gaussian at sd 1.5)
SMOOTH_SIGMA_BINS = 1.0  # expression smoothed before gradient and TV terms
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2  # SSIM constants for fields scaled to [0, 1]


def gaussian_taps(sigma_bins, n_genes, dtype=torch.float32, truncate=3.0):
    """Normalised 1-D Gaussian taps [n_genes, 2R + 1] with R = ceil(truncate sigma)."""
    radius = max(1, math.ceil(truncate * sigma_bins))
    k = torch.arange(-radius, radius + 1, dtype=dtype)
    g = torch.exp(-0.5 * (k / sigma_bins) ** 2)
    return (g / g.sum()).expand(n_genes, -1).contiguous()


def _blur3(x, taps):
    """Separable correlation of [G, H, W] (converted to the solver's 4-D layout and back)."""
    return blur(grid4(x), taps)[0]


def smooth(x, sigma_bins):
    """Gaussian smoothing of [G, H, W] (zero outside the window)."""
    return _blur3(x, gaussian_taps(sigma_bins, x.shape[0], x.dtype))


def morans_i(x, mask, sigma_bins=MORAN_SIGMA_BINS):
    """Moran's I per gene over the bins of `mask`, with local Gaussian weights (w_ii = 0).

    I = (n / S0) sum_ij w_ij z_i z_j / sum_i z_i^2, z = x - mean over the mask, w restricted to
    mask bins. A constant field gives 0.
    """
    m = torch.as_tensor(mask).to(x.dtype)[None]
    taps = gaussian_taps(sigma_bins, x.shape[0], x.dtype)
    centre = taps[0, taps.shape[1] // 2] ** 2
    n = m.sum()
    z = (x - (x * m).sum((1, 2), keepdim=True) / n.clamp_min(1)) * m
    wz = (_blur3(z, taps) - centre * z) * m
    s0 = ((_blur3(m, taps[:1]) - centre * m) * m).sum()
    return n / s0.clamp_min(1e-12) * (z * wz).sum((1, 2)) / (z * z).sum((1, 2)).clamp_min(1e-12)


def ssim(e, img):
    """Mean SSIM per gene between fields e [G, H, W] and one image [H, W], both scaled to [0, 1]."""
    img = img.to(e.dtype).expand_as(e)
    taps = gaussian_taps(SSIM_SIGMA_BINS, e.shape[0], e.dtype)
    mu_e, mu_i = _blur3(e, taps), _blur3(img, taps)
    var_e = _blur3(e * e, taps) - mu_e**2
    var_i = _blur3(img * img, taps) - mu_i**2
    cov = _blur3(e * img, taps) - mu_e * mu_i
    num = (2 * mu_e * mu_i + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_e**2 + mu_i**2 + SSIM_C1) * (var_e + var_i + SSIM_C2)
    return (num / den).mean((1, 2))


def gradients(x):
    """Forward differences along rows and columns, [G, H-1, W] and [G, H, W-1]."""
    return x[:, 1:, :] - x[:, :-1, :], x[:, :, 1:] - x[:, :, :-1]


def total_variation(x):
    """Mean anisotropic total variation per gene (per bin, so windows of any size compare)."""
    dr, dc = gradients(x)
    return dr.abs().mean((1, 2)) + dc.abs().mean((1, 2))


def image_alignment(e, img):
    """The seed's image term per gene: (1 - SSIM) + |grad e - grad I|_1 + |TV(e) - TV(I)|.

    `e` is scaled by its window maximum and smoothed (sd 1 bin) first: one gene's 2 um counts are
    mostly zeros, and raw finite differences would measure Poisson noise, not structure.
    """
    e = smooth(e / e.amax((1, 2), keepdim=True).clamp_min(1e-12), SMOOTH_SIGMA_BINS)
    img = img.to(e.dtype)[None]
    (er, ec), (ir, ic) = gradients(e), gradients(img)
    grad = (er - ir).abs().mean((1, 2)) + (ec - ic).abs().mean((1, 2))
    tv = (total_variation(e) - total_variation(img)).abs()
    return (1.0 - ssim(e, img[0])) + grad + tv
