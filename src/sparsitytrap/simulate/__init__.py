"""Simulated Visium HD patients with known ground truth.

A patient is a colorectal-like tissue geometry (`morphology`) seen two ways: an H&E image
(`image`), and UMI counts on the 2 um bin grid. Expression is factored (`expression`): K
programmes (compartment fields on the bin grid) times gene loadings,

    rate[g, bin] = sum_k programme[k, bin] * loading[k, g],

then lateral diffusion (`diffusion`: a known, linear kernel applied to each programme) and
counts ~ Poisson(diffused rate * capture efficiency) (`counts`). `params` holds every parameter
and the default cohort; `patient` writes one patient; its truth.zarr belongs to
`sparsitytrap.stores.truth`, which reads it without this package.

Modules import from the submodule that owns a name; the names below are re-exported for callers.
"""

from ..stores.truth import truth_rate, write_truth
from .counts import sample_counts
from .diffusion import diffuse, diffusion_kernel
from .expression import (
    GENE_TABLE,
    PROGRAMMES,
    SEED_GENES,
    ZERO_FRACTION_DEFAULT,
    ZERO_FRACTION_OTHER,
    ZERO_FRACTION_SEED,
    ZERO_FRACTION_SEED_DEFAULT,
    gene_loadings,
    programme_fields,
    read_gene_table,
    target_zero_fractions,
)
from .image import pixel_frame
from .params import COHORT, DEFAULT_PARAMS, PRESETS, cohort_params, resolve_params
from .patient import simulate_patient

__all__ = [
    "COHORT",
    "DEFAULT_PARAMS",
    "GENE_TABLE",
    "PRESETS",
    "PROGRAMMES",
    "SEED_GENES",
    "ZERO_FRACTION_DEFAULT",
    "ZERO_FRACTION_OTHER",
    "ZERO_FRACTION_SEED",
    "ZERO_FRACTION_SEED_DEFAULT",
    "cohort_params",
    "diffuse",
    "diffusion_kernel",
    "gene_loadings",
    "pixel_frame",
    "programme_fields",
    "read_gene_table",
    "resolve_params",
    "sample_counts",
    "simulate_patient",
    "target_zero_fractions",
    "truth_rate",
    "write_truth",
]
