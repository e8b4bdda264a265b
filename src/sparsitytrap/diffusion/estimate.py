"""The diffusion length, estimated from the data: how counts fall off across the tissue edge.

Without diffusion the expected count of a bin is ~A inside the tissue and 0 outside; lateral
diffusion blurs that step. Model: E[count] = A (G_sigma * tissue), a Gaussian blur of the tissue
mask (zero beyond the grid), compared with the total counts of the corrected genes on the
observed bins within `band_um` of the tissue edge (Poisson deviance, A in closed form); sigma is
the grid-search minimiser refined by a parabola in log sigma. Ingested Visium HD tables often
hold only in-tissue bins: then only the inside half of the edge profile is seen, which still
carries sigma (the count deficit of edge bins). Compartments that differ near the edge bias the
estimate; `validate` reports it beside the simulator's value.
"""

import numpy as np
from scipy import ndimage

from ..errors import InputError

N_CANDIDATES = 25
MIN_EDGE_BINS = 100
MIN_EDGE_COUNTS = 500


def _deviance(y, mu):
    ratio = np.where(y > 0, y / np.maximum(mu, 1e-300), 1.0)
    return 2.0 * float(np.sum(y * np.log(ratio) - (y - mu)))


def _profile(counts, tissue, band, sigmas):
    """Poisson deviance of the blurred-step model for each candidate sigma (bins)."""
    mask = tissue.astype(np.float64)
    y = counts[band]
    dev = []
    for sigma in sigmas:
        f = ndimage.gaussian_filter(mask, sigma, mode="constant", truncate=4.0)[band]
        dev.append(_deviance(y, f * (y.sum() / max(f.sum(), 1e-300))))
    return np.array(dev)


def edge_band(tissue, observed, band_bins):
    """Observed bins within `band_bins` of the tissue edge, on either side."""
    inside = ndimage.distance_transform_edt(tissue)
    outside = ndimage.distance_transform_edt(~tissue)
    near = np.where(tissue, inside, outside) <= band_bins
    return near & observed


def estimate_diffusion_length(counts, tissue, observed=None, *, bin_um=2.0, band_um=20.0, where="sample"):
    """Diffusion length (Gaussian sd, um) from the edge profile of the counts.

    Parameters
    ----------
    counts
        [H, W] counts per bin (e.g. summed over the corrected genes).
    tissue
        bool [H, W].
    observed
        bool [H, W], bins whose counts are known (the table's bins); None: all.
    bin_um
        Bin edge in um.
    band_um
        Half-width of the edge band used, um.
    where
        Sample named in errors.

    Returns
    -------
    dict
        ``diffusion_length_um``, ``sigma_bins``, ``edge_bins``, ``edge_counts``, ``method``.

    Raises
    ------
    InputError
        Too few edge bins or counts, or the best fit at a search bound (no measurable blur, or
        one wider than the band): set ``diffusion.diffusion_length_um``.
    """
    tissue = np.asarray(tissue, bool)
    observed = np.ones_like(tissue) if observed is None else np.asarray(observed, bool)
    counts = np.asarray(counts, np.float64)
    band_bins = band_um / bin_um
    band = edge_band(tissue, observed, band_bins)
    n_bins, n_counts = int(band.sum()), float(counts[band].sum())
    hint = "set diffusion.diffusion_length_um"
    if tissue.all() or not tissue.any() or n_bins < MIN_EDGE_BINS or n_counts < MIN_EDGE_COUNTS:
        fault = f"{n_bins} edge bins with {n_counts:.0f} counts (need {MIN_EDGE_BINS} and {MIN_EDGE_COUNTS})"
        raise InputError(where, f"diffusion length cannot be estimated from the tissue edge: {fault}; {hint}")
    sigmas = np.geomspace(0.1, band_bins / 2, N_CANDIDATES)
    dev = _profile(counts, tissue, band, sigmas)
    k = int(np.argmin(dev))
    if k in (0, len(sigmas) - 1):
        fault = f"best fit at the search bound {sigmas[k] * bin_um:.2f} um"
        raise InputError(where, f"diffusion length cannot be estimated from the tissue edge: {fault}; {hint}")
    x, d = np.log(sigmas[k - 1 : k + 2]), dev[k - 1 : k + 2]
    denom = d[0] - 2 * d[1] + d[2]
    step = 0.5 * (d[0] - d[2]) / denom if denom > 0 else 0.0
    sigma = float(np.exp(x[1] + np.clip(step, -1, 1) * (x[2] - x[1])))
    return {
        "diffusion_length_um": sigma * bin_um,
        "sigma_bins": sigma,
        "edge_bins": n_bins,
        "edge_counts": n_counts,
        "method": "edge-spread fit (Gaussian-blurred tissue mask, Poisson deviance)",
    }


def kernel_edge_length(kernel, tissue, observed=None, *, bin_um=2.0, band_um=20.0):
    """The Gaussian sd the same edge fit gives for a known kernel, from noiseless blurred-mask counts.

    The simulator's kernel is a Gaussian plus an exponential tail; this is its
    Gaussian-equivalent under this estimator, the fair value to compare the estimate with.
    """
    from scipy.signal import fftconvolve

    tissue = np.asarray(tissue, bool)
    expected = np.maximum(fftconvolve(tissue.astype(np.float64), kernel, mode="same"), 0.0) * 1e3
    return estimate_diffusion_length(expected, tissue, observed, bin_um=bin_um, band_um=band_um)["diffusion_length_um"]
