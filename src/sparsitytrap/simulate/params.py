"""Simulation parameters: defaults, presets, the default cohort, and their resolution.

Every parameter has a default here; a preset changes a few at once and a caller any. The
resolved set is written to params.json, so a patient can be simulated again from it alone.
"""

import copy

import numpy as np

from ..errors import InputError

DEFAULT_PARAMS = {
    "preset": "demo",
    "seed": 0,
    "gene_seed": 2024,  # loadings: shared by every patient simulated with the same gene_seed
    "n_rows": 576,
    "n_cols": 576,
    "bin_um": 2.0,
    "microns_per_pixel": 0.48,  # 4.17 px per 2 um bin: the pixel grid never lines up with bins
    "rotation_deg": None,  # of the bin grid in the image; None: drawn from the seed in [-1.5, 1.5]
    "pixel_jitter": None,  # sub-pixel (x, y) part of the image offset; None: drawn from the seed
    "image_margin_px": 40,
    "tile_px": 512,
    "hires_max_px": 2000,
    "lowres_max_px": 600,
    "capture_efficiency": 1.0,
    "diffusion": {"sigma_um": 3.0, "tail_weight": 0.1, "tail_um": 10.0},
    "gene_table": None,  # None: resources/gene_categories.tsv
    "n_genes": None,  # None: the table's genes; more: padded with generated genes SIMG00001...
    "padding_umis_per_bin": 8.0,  # mean UMIs per in-tissue bin from all padding genes together
    "leak": 0.05,  # largest loading of a gene on programmes other than its own (relative)
    "dense_truth_max": 5e7,  # also store rate_* [G, rows, cols] when G * rows * cols is at most this
    "counts_block_rows": 32,
    "morphology": {
        "tissue_extent": 0.95,  # mean tissue diameter / shorter side of the capture area
        "outline_irregularity": 0.25,
        "mucosa_cut": 0.15,  # depth (tissue radii along the layering axis) where the mucosa ends
        "muscle_cut": 0.5,  # ... and the muscularis propria begins
        "muscularis_mucosae_um": 14.0,
        "gland_lumen_um": [5.0, 20.0],  # lumen semi-major axis
        "gland_aspect": [0.35, 1.0],  # lumen semi-minor / semi-major axis
        "epithelium_um": [13.0, 20.0],
        "gland_gap_um": 4.0,
        "gland_irregularity": 1.0,
        "invasive_gland_fraction": 0.08,
        "goblet_fraction": [0.15, 0.6],
        "aggregates_per_mm2": 2.0,
        "aggregate_radius_um": [35.0, 90.0],
        "cells_per_mm2": {
            "fibroblast_mucosa": 3000.0,
            "fibroblast_submucosa": 1800.0,
            "plasma_lamina_propria": 6000.0,
            "plasma_elsewhere": 250.0,
            "lymphocyte_scattered": 700.0,
            "lymphocyte_aggregate": 30000.0,
            "myocyte": 4500.0,
        },
    },
}

PRESETS = {
    "demo": {},
    # A whole 6.5 mm x 6.5 mm capture area with a whole-transcriptome-sized gene list.
    "full": {"n_rows": 3250, "n_cols": 3250, "n_genes": 18000},
}

# Cohort of default patients: sizes keep the workflow CPU-friendly (12-25 kept 256 um tiles each).
COHORT = (
    {"n_rows": 576, "n_cols": 576, "capture_efficiency": 0.8},
    {"n_rows": 640, "n_cols": 576, "capture_efficiency": 1.0},
    {"n_rows": 576, "n_cols": 640, "capture_efficiency": 1.25},
)


def _merge(base, over, where="params"):
    """`base` updated by `over`, nested dicts key by key; a key not in `base` is a typo: refused."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k not in base:
            raise InputError(f"{where}.{k}", f"unknown simulation parameter (known: {', '.join(sorted(base))})")
        out[k] = _merge(base[k], v, f"{where}.{k}") if isinstance(base[k], dict) and isinstance(v, dict) else v
    return out


def resolve_params(params=None):
    """Defaults, then the preset's values, then the caller's: every parameter, explicit.

    Parameters
    ----------
    params
        Overrides (may name a `preset`: "demo" or "full"); unknown keys raise InputError.

    Returns
    -------
    dict
    """
    params = dict(params or {})
    preset = params.get("preset", DEFAULT_PARAMS["preset"])
    if preset not in PRESETS:
        raise InputError("params.preset", f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    p = _merge(_merge(DEFAULT_PARAMS, PRESETS[preset]), params)
    p["preset"] = preset
    _check(p)
    _draw_open_frame(p)
    return p


def _check(p):
    """Refuse values the simulator cannot work with, naming the key."""
    for key in ("n_rows", "n_cols"):
        if not isinstance(p[key], (int, np.integer)) or p[key] < 16:
            raise InputError(f"params.{key}", f"must be an integer >= 16, got {p[key]!r}")
    for key in ("microns_per_pixel", "capture_efficiency", "bin_um"):
        if not p[key] > 0:
            raise InputError(f"params.{key}", f"must be positive, got {p[key]!r}")
    if p["tile_px"] % 16:
        raise InputError("params.tile_px", f"must be a multiple of 16, got {p['tile_px']!r}")
    d = p["diffusion"]
    if d["sigma_um"] < 0 or d["tail_um"] < 0 or not 0 <= d["tail_weight"] <= 1:
        raise InputError("params.diffusion", f"needs sigma_um >= 0, tail_um >= 0, 0 <= tail_weight <= 1; got {d}")


def _draw_open_frame(p):
    """Fill the pixel frame details the caller left open (None) from the seed, so params.json is explicit."""
    rng = np.random.default_rng([p["seed"], 5])
    if p["rotation_deg"] is None:
        p["rotation_deg"] = round(float(rng.uniform(-1.5, 1.5)), 3)
    if p["pixel_jitter"] is None:
        p["pixel_jitter"] = [round(float(v), 3) for v in rng.uniform(0.1, 0.9, 2)]


def cohort_params(preset="demo", n_patients=3, base_seed=101):
    """Parameters of a default cohort: patients P1..Pn with their own seed, size and efficiency.

    Parameters
    ----------
    preset
        "demo" (small grids, the table's genes) or "full" (6.5 mm capture areas, 18,000 genes).
    n_patients
        Number of patients; the three default designs repeat beyond three.
    base_seed
        Patient i gets seed base_seed + 101 * i.

    Returns
    -------
    dict
        sample id -> parameter overrides for `simulate_patient`.
    """
    out = {}
    for i in range(n_patients):
        over = {"preset": preset, "seed": base_seed + 101 * i, **COHORT[i % len(COHORT)]}
        if preset != "demo":
            over = {k: v for k, v in over.items() if k not in ("n_rows", "n_cols")}
        out[f"P{i + 1}"] = over
    return out
