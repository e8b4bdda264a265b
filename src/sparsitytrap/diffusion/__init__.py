"""Lateral-diffusion correction of Visium HD 2 um counts by optimal transport (seed 003), linear in the bins.

Method, per gene g (observed counts x on the 2 um grid):

1. Sources: b_g = sigmoid(beta (x - Q_g(q_g)) / range(x)) * x + floor_g, beta = 50. Q_g is a
   differentiable quantile (inverse of the smoothed CDF of the gene's counts over the whole
   sample), q_g initialised at the cutoff that maximises Moran's I of the thresholded counts.
   floor_g = `source_floor` x the gene's mean count per tissue bin: a background prior, because at
   2 um most bins of a source region hold no count and a molecule must be allowed to originate
   there (with floor 0, KL(p | b) forbids any mass where x = 0, the output keeps the input's
   support, and bins outside the tissue, which an ingested table does not hold, are unreachable,
   so the tissue cost could never act).
2. Transport: unbalanced entropic OT, every observed count moved (source marginal = x, exact),
   the target marginal pulled towards b by KL with strength rho. The corrected field is the
   plan's target marginal, so it depends on the transport (seed fault 1: with both marginals
   fixed it equals b whatever the cost). Cost C_ij = s |r_i - r_j|^2 + lam (1 - tissue_j): a
   function of distance and tissue membership (2 parameters, not a free N x N matrix), hence
   K = exp(-C / eps_g) = Gaussian convolution x diagonal, exact as separable convolutions on the
   bin grid, truncated at `truncate` diffusion lengths (`sinkhorn.py`).
3. Learning: s, lam, eps_g, q_g by Adam through the unrolled Sinkhorn iterations, on a seeded
   sample of windows, minimising image alignment with the H&E (1 - SSIM + gradient L1 + |TV
   difference|, haematoxylin resampled onto the bin grid; weight 1, seed fault 3) + fraction of
   mass outside the tissue + negative Moran's I (local Gaussian weights by convolution).
4. Correction: the fitted solver applied window by window (core + halo of `halo` diffusion
   lengths, core kept), one window of all genes in memory. Mass the plan puts outside the tissue
   is removed and reported per gene; all other counts are conserved.
5. The diffusion length: `diffusion_length_um`, or estimated from how counts fall across the
   tissue edge (`estimate.py`); it sets the initial s (kernel sd = length at eps = 1), the
   kernel support and the halo.

What it does in practice (bench/DIFFUSION_RESULTS.md): at Visium HD depth (~0.1 count per bin
and gene) the plan mostly reassigns counts to nearby bins, a Poisson denoiser; the seed's
objective pulls that way (Moran's I rewards smooth fields, so fitting widens the kernel). It beats
raw counts and Richardson-Lucy against the undiffused truth on the simulated patients, and ties
a plain Gaussian blur of the counts at 8 um. A blurred point source is sharpened only when the
threshold quantile sits on its peak (`quantile_init` ~0.99, `source_floor` 0); with the
Moran's-I initialisation it is smoothed.

Choices. Plain torch rather than POT/geomloss/kornia: POT's solvers and the seed's code take a
dense N x N cost (10^13 entries for one sample); geomloss's grid solvers are balanced and
multiscale, not the one-sided unbalanced problem, and a CUDA/KeOps stack is not needed here;
kornia's SSIM is eleven lines of separable convolutions, written here so every statistic shares
one convolution routine (channels-last grouped conv2d, 4x faster on CPU than the default
layout). POT is used only as the reference in the tests. Genes do not share a plan: the plan is
never materialised (only two scalings per gene), so sharing would save no memory, and a shared
eps would couple genes of different spatial scales. The validation (`validate.py`) compares
with Richardson-Lucy deconvolution (estimated and true kernel) against the simulator's
undiffused truth.

Public API: `correct_sample`, `DEFAULTS`, `check_settings`, `open_corrected`, `read_window`,
`read_gene_grids`, `validate_against_truth`, `figure_methods`, `estimate_diffusion_length`; lower
level: `correct_arrays`, `sinkhorn_grid`, `richardson_lucy`.
"""

from .correct import correct_arrays, correct_sample
from .deconvolve import gaussian_kernel, richardson_lucy
from .estimate import estimate_diffusion_length, kernel_edge_length
from .settings import DEFAULTS, check_settings
from .sinkhorn import sinkhorn_grid
from .store import open_corrected, read_gene_grids, read_window
from .validate import figure_methods, summarise_validation, validate_against_truth

__all__ = [
    "DEFAULTS",
    "check_settings",
    "correct_arrays",
    "correct_sample",
    "estimate_diffusion_length",
    "figure_methods",
    "gaussian_kernel",
    "kernel_edge_length",
    "open_corrected",
    "read_gene_grids",
    "read_window",
    "richardson_lucy",
    "sinkhorn_grid",
    "summarise_validation",
    "validate_against_truth",
]
