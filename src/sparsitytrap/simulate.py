"""Simulated Visium HD patients with known ground truth.

A patient is a colorectal-like tissue geometry (`sparsitytrap.morphology`) seen two ways: an H&E
image, and UMI counts on the 2 um bin grid. Expression is factored: K programmes (compartment
fields on the bin grid) times gene loadings,

    rate[g, bin] = sum_k programme[k, bin] * loading[k, g],

then lateral diffusion (a known, linear kernel applied to each programme) and
counts ~ Poisson(diffused rate * capture efficiency). Loadings depend only on the gene table and
`gene_seed`, so every patient of a cohort shares the same biology and differs in geometry, size
and capture efficiency. Counts are drawn in the factored form, UMI by UMI: per bin and programme
a Poisson number of molecules, each assigned a gene from that programme's loadings. This is
exactly Poisson per (bin, gene) and never touches the (bins x genes) zeros.
"""

import copy
import functools
import logging
import math
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import signal

from . import morphology
from .errors import InputError
from .io import atomic_path, write_json

log = logging.getLogger(__name__)

PROGRAMMES = ("epithelial", "secretory", "stromal", "plasma", "lymphoid", "muscle", "housekeeping", "mitochondrial")
GENE_TABLE = Path(__file__).resolve().parents[2] / "resources" / "gene_categories.tsv"

# The seeds' 50 genes (SEED_FACTS section 1): the most expressed, hence the least sparse.
SEED_GENES = (
    "ACTB B2M CD24 CD74 CEACAM5 CEACAM6 CFL1 COL1A1 COL1A2 COL3A1 CST3 DES EEF1G EPCAM FCGBP FTH1 FTL HSPA8 IGHA1 "
    "IGHG1 IGHM IGKC JCHAIN KRT8 LCN2 LGALS3 MT-ATP6 MT-CO2 MT-CO3 MT-CYB MT-ND1 MT-ND2 MT-ND3 MT-ND4 MT-ND4L "
    "MT-ND5 MUC12 OAZ1 OLFM4 PHGR1 PIGR PYGB S100A10 S100A6 SYNGR2 TAGLN TMSB10 TMSB4X TSPAN8 VIM"
).split()

# Target zero fraction over in-tissue 2 um bins (at efficiency 1), drawn uniformly per gene. The
# seed genes are the least sparse (they were the top 50 by count variance), so that a
# variance-based selection on simulated data finds mostly them, as it did on the real data.
ZERO_FRACTION_SEED = {"Mitochondrial": (0.82, 0.91), "Housekeeping": (0.87, 0.94)}
ZERO_FRACTION_SEED_DEFAULT = (0.93, 0.96)
ZERO_FRACTION_OTHER = {
    "mitochondrial": (0.95, 0.975),
    "housekeeping": (0.955, 0.98),
    "lymphoid": (0.97, 0.99),
    "plasma": (0.97, 0.99),
}
ZERO_FRACTION_DEFAULT = (0.955, 0.985)

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


# ---------------------------------------------------------------- parameters
def _merge(base, over, where="params"):
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
    for key in ("n_rows", "n_cols"):
        if not isinstance(p[key], (int, np.integer)) or p[key] < 16:
            raise InputError(f"params.{key}", f"must be an integer >= 16, got {p[key]!r}")
    for key in ("microns_per_pixel", "capture_efficiency", "bin_um"):
        if not p[key] > 0:
            raise InputError(f"params.{key}", f"must be positive, got {p[key]!r}")
    if p["tile_px"] % 16:
        raise InputError("params.tile_px", f"must be a multiple of 16, got {p['tile_px']!r}")
    rng = np.random.default_rng([p["seed"], 5])  # pixel frame details left open by the caller
    if p["rotation_deg"] is None:
        p["rotation_deg"] = round(float(rng.uniform(-1.5, 1.5)), 3)
    if p["pixel_jitter"] is None:
        p["pixel_jitter"] = [round(float(v), 3) for v in rng.uniform(0.1, 0.9, 2)]
    d = p["diffusion"]
    if d["sigma_um"] < 0 or d["tail_um"] < 0 or not 0 <= d["tail_weight"] <= 1:
        raise InputError("params.diffusion", f"needs sigma_um >= 0, tail_um >= 0, 0 <= tail_weight <= 1; got {d}")
    return p


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


# ---------------------------------------------------------------- programmes and diffusion
def programme_fields(fractions, cells, bin_um):
    """Undiffused programme intensities: the ground-truth expression fields.

    Parameters
    ----------
    fractions
        Compartment area fractions per bin (`morphology.Tissue.label_map`).
    cells
        Cell counts per bin and type (`morphology.Tissue.cell_counts`).
    bin_um
        Bin size in um.

    Returns
    -------
    numpy.ndarray
        float32 [K, rows, cols] in PROGRAMMES order; units are the area fraction of the bin
        covered by the compartment (for cell types, by their cell bodies), so a programme is
        about 1 where its compartment fills a bin.
    """
    body = {"epithelial": 7.0, "fibroblast": 8.0, "plasma": 8.0, "lymphocyte": 6.0, "myocyte": 8.0}
    cover = {t: morphology.smooth_cells(cells[t], bin_um, d) * (np.pi * d * d / 4) / bin_um**2 for t, d in body.items()}
    f = fractions
    stroma = f["lamina_propria"] + f["submucosa"] + f["aggregate"]
    living = 1.0 - f["background"] - f["lumen"]
    density = sum(cover.values())
    dmean = float(density[living > 0.5].mean()) if (living > 0.5).any() else 1.0
    housekeeping = living * (0.4 + 0.6 * np.minimum(density / max(dmean, 1e-6), 3.0))
    prog = {
        "epithelial": f["epithelium"],
        "secretory": f["goblet"] + 0.1 * f["mucus"],
        "stromal": stroma * (0.5 + 0.5 * np.minimum(cover["fibroblast"], 1.0)),
        "plasma": np.minimum(cover["plasma"], 1.0),
        "lymphoid": np.minimum(cover["lymphocyte"], 1.0),
        "muscle": f["muscle"],
        "housekeeping": housekeeping,
        "mitochondrial": housekeeping * (0.7 + 0.6 * f["epithelium"] + 0.6 * f["muscle"]),
    }
    return np.stack([np.asarray(prog[k], np.float32) for k in PROGRAMMES])


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


# ---------------------------------------------------------------- genes and loadings
def read_gene_table(path=None):
    """Read the gene table.

    Parameters
    ----------
    path
        TSV with columns gene, category, programme (one of PROGRAMMES); None: the packaged
        resources/gene_categories.tsv.

    Returns
    -------
    pandas.DataFrame
    """
    path = Path(path) if path else GENE_TABLE
    if not path.is_file():
        raise InputError(path, "gene table does not exist")
    df = pd.read_csv(path, sep="\t", dtype=str)
    missing = {"gene", "category", "programme"} - set(df.columns)
    if missing:
        raise InputError(path, f"needs tab-separated columns gene, category, programme (missing {sorted(missing)})")
    bad = sorted(set(df["programme"]) - set(PROGRAMMES))
    if bad:
        raise InputError(path, f"unknown programme(s) {bad} (known: {', '.join(PROGRAMMES)})")
    dup = df["gene"][df["gene"].duplicated()].tolist()
    if dup:
        raise InputError(path, f"duplicated gene(s) {dup[:5]}")
    if df.empty:
        raise InputError(path, "gene table lists no genes")
    return df.reset_index(drop=True)


def _gene_uniform(name, gene_seed, stream):
    """A uniform [0, 1) number fixed by gene name and seed: adding genes never reshuffles others."""
    return np.random.default_rng([gene_seed, stream, zlib.crc32(name.encode())]).random()


def target_zero_fractions(table, gene_seed):
    """Target zero fraction of each gene over in-tissue 2 um bins at capture efficiency 1.

    Drawn uniformly per gene (fixed by name and gene_seed) from a range set by whether the gene
    is one of the seeds' 50 (by its category) or not (by its programme).

    Parameters
    ----------
    table
        From `read_gene_table`.
    gene_seed
        Seed of the cohort's gene programmes.

    Returns
    -------
    numpy.ndarray
        float64 [G].
    """
    out = []
    for name, cat, prog in zip(table["gene"], table["category"], table["programme"]):
        if name in SEED_GENES:
            lo, hi = ZERO_FRACTION_SEED.get(cat, ZERO_FRACTION_SEED_DEFAULT)
        else:
            lo, hi = ZERO_FRACTION_OTHER.get(prog, ZERO_FRACTION_DEFAULT)
        out.append(lo + (hi - lo) * _gene_uniform(name, gene_seed, 1))
    return np.array(out)


def _directions(programmes, leak, draws):
    """Loading direction per gene [K, G]: 1 on its own programme, a small random leak elsewhere.

    `draws` [K, G] are uniform numbers; the leak is leak * draws**2 (mostly tiny, a few larger).
    """
    w = leak * draws**2
    w[[PROGRAMMES.index(p) for p in programmes], np.arange(len(programmes))] = 1.0
    return w


def _gene_draws(names, gene_seed):
    """Uniform [K, G] numbers fixed per gene name, so that editing the table never reshuffles others."""
    return np.stack(
        [np.random.default_rng([gene_seed, 2, zlib.crc32(n.encode())]).random(len(PROGRAMMES)) for n in names], axis=1
    )


@functools.lru_cache(maxsize=4)
def _reference_programmes(gene_seed, n_bins=320, max_bins=8000):
    """Diffused programmes at in-tissue bins of a reference tissue (default geometry, seed gene_seed)."""
    p = DEFAULT_PARAMS
    tissue, _, frac = morphology.generate_tissue(n_bins, n_bins, p["bin_um"], gene_seed, p["morphology"])
    und = programme_fields(frac, tissue.cell_counts(n_bins, n_bins, p["bin_um"]), p["bin_um"])
    prog = diffuse(und, diffusion_kernel(p["bin_um"], **p["diffusion"]))
    ref = prog[:, frac["background"] <= 0.5].T.astype(np.float64)  # [N, K]
    if len(ref) > max_bins:
        ref = ref[np.random.default_rng([gene_seed, 3]).choice(len(ref), max_bins, replace=False)]
    return ref


def _calibrate(ref_rates, targets, iters=36):
    """Scale s per gene with mean over bins of exp(-s * rate) = target (bisection in log s)."""
    lo = np.full(ref_rates.shape[1], -12.0)
    hi = np.full(ref_rates.shape[1], 8.0)
    for _ in range(iters):
        mid = (lo + hi) / 2
        zero = np.exp(-np.exp(mid)[None, :] * ref_rates).mean(axis=0)
        too_sparse = zero > targets
        lo = np.where(too_sparse, mid, lo)
        hi = np.where(too_sparse, hi, mid)
    return np.exp((lo + hi) / 2)


def gene_loadings(params):
    """Gene names, categories and loadings of a parameter set.

    Table genes are calibrated on a reference tissue (default geometry, seed `gene_seed`) so
    that their zero fraction over in-tissue bins at efficiency 1 meets `target_zero_fractions`;
    generated padding genes (`n_genes` beyond the table) share `padding_umis_per_bin` UMIs per
    bin with log-normal levels. Only the gene table and `gene_seed` matter, not the patient.

    Parameters
    ----------
    params
        Resolved parameters (`resolve_params`).

    Returns
    -------
    names, categories
        Lists of length G.
    loadings
        float32 [K, G].
    """
    table = read_gene_table(params["gene_table"])
    seed, leak = params["gene_seed"], params["leak"]
    ref = _reference_programmes(seed)
    w = _directions(list(table["programme"]), leak, _gene_draws(table["gene"], seed))
    scale = _calibrate(ref @ w, target_zero_fractions(table, seed))
    loadings = w * scale[None, :]
    names, cats = list(table["gene"]), list(table["category"])
    n_pad = (params["n_genes"] or len(names)) - len(names)
    if n_pad < 0:
        raise InputError("params.n_genes", f"must be at least the {len(names)} genes of the gene table")
    if n_pad:
        rng = np.random.default_rng([seed, 4])
        progs = rng.choice(table["programme"].to_numpy(), n_pad)
        pad_names = [f"SIMG{i:05d}" for i in range(1, n_pad + 1)]
        wp = _directions(list(progs), leak, rng.random((len(PROGRAMMES), n_pad)))
        level = rng.lognormal(0.0, 1.0, n_pad)
        level *= params["padding_umis_per_bin"] / level.sum()
        loadings = np.concatenate([loadings, wp * (level / (ref.mean(axis=0) @ wp))[None, :]], axis=1)
        names += pad_names
        cats += ["Simulated"] * n_pad
    return names, cats, loadings.astype(np.float32)


# ---------------------------------------------------------------- counts
def sample_counts(programmes, loadings, efficiency, seed, block_rows=32):
    """Poisson counts of every bin and gene, drawn in factored form.

    Per bin and programme k, n ~ Poisson(efficiency * programme_k * sum_g L[k, g]) molecules,
    each given gene g with probability L[k, g] / sum_g L[k, g]. Summed over k this is exactly
    Poisson(efficiency * sum_k programme_k L[k, g]) independently for every (bin, gene), and
    costs one draw per molecule, not per (bin, gene). Each bin row has its own random stream
    ([seed, 1, row]), so counts do not depend on the block size.

    Parameters
    ----------
    programmes
        Diffused programmes [K, rows, cols].
    loadings
        [K, G].
    efficiency
        Capture efficiency (multiplies every rate).
    seed
        Patient seed.
    block_rows
        Bin rows assembled at a time (memory only).

    Returns
    -------
    scipy.sparse.csr_matrix
        int32 [rows * cols, G], row = array_row * cols + array_col.
    """
    K, n_rows, n_cols = programmes.shape
    G = loadings.shape[1]
    load = loadings.astype(np.float64)
    totals = load.sum(axis=1)
    cdf = np.cumsum(load, axis=1) / np.maximum(totals, 1e-300)[:, None]
    data, indices, indptr = [], [], [np.zeros(1, np.int64)]
    nnz = 0
    for r0 in range(0, n_rows, block_rows):
        r1 = min(r0 + block_rows, n_rows)
        keys = []
        for r in range(r0, r1):
            rng = np.random.default_rng([seed, 1, r])
            n = rng.poisson(programmes[:, r, :].astype(np.float64) * (efficiency * totals)[:, None])
            base = (r - r0) * n_cols
            for k in range(K):
                m = int(n[k].sum())
                if m:
                    genes = np.minimum(np.searchsorted(cdf[k], rng.random(m), side="right"), G - 1)
                    keys.append((base + np.repeat(np.arange(n_cols), n[k])) * G + genes)
        keys, counts = np.unique(np.concatenate(keys) if keys else np.zeros(0, np.int64), return_counts=True)
        rows = keys // G
        data.append(counts.astype(np.int32))
        indices.append((keys % G).astype(np.int32))
        indptr.append(nnz + np.cumsum(np.bincount(rows, minlength=(r1 - r0) * n_cols)))
        nnz += len(keys)
    return sp.csr_matrix(
        (np.concatenate(data), np.concatenate(indices), np.concatenate(indptr)), shape=(n_rows * n_cols, G)
    )


# ---------------------------------------------------------------- image
def pixel_frame(params):
    """Where the bin grid lies in the full-resolution image: rotated, offset, non-integer scale.

    Pixel (i, j) has its centre at (x, y) = (j, i); a point u (um, capture-area frame) is at
    pixel rot @ u / microns_per_pixel + offset.

    Parameters
    ----------
    params
        Resolved parameters.

    Returns
    -------
    A
        2x3 affine, (x, y) = A @ (array_row, array_col, 1), the pixel of a bin centre.
    rot, offset
        Rotation matrix and pixel offset (x, y).
    shape
        (height, width) of the image.
    """
    b, mpp = params["bin_um"], params["microns_per_pixel"]
    th = math.radians(params["rotation_deg"])
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    w, h = params["n_cols"] * b, params["n_rows"] * b
    corners = rot @ np.array([[0, w, 0, w], [0, 0, h, h]]) / mpp
    offset = params["image_margin_px"] - corners.min(axis=1) + np.asarray(params["pixel_jitter"])
    shape = tuple(int(v) for v in np.ceil(corners.max(axis=1) + offset + params["image_margin_px"])[::-1])
    # (x, y) = rot @ (u_x, u_y) / mpp + offset, with u = ((col + 0.5) b, (row + 0.5) b)
    lin = rot @ np.array([[0.0, b], [b, 0.0]]) / mpp  # columns: d/d row, d/d col
    A = np.column_stack([lin, lin @ np.array([0.5, 0.5]) + offset])
    return A, rot, offset, shape


def _render_tiles(tissue, params, rot, offset, shape, seed, mosaic, factor):
    """Yield the H&E tiles in row-major order; keep a `factor`-times smaller copy in `mosaic`."""
    tile, mpp = params["tile_px"], params["microns_per_pixel"]
    height, width = shape
    for ty in range(0, height, tile):
        for tx in range(0, width, tile):
            th, tw = min(tile, height - ty), min(tile, width - tx)
            # Pixel (i, j) has its centre at (x, y) = (j, i) px; um = rot^T (px - offset) * mpp.
            grid = morphology.Grid(
                rot.T @ (np.array([tx, ty]) - offset) * mpp, rot.T[:, 1] * mpp, rot.T[:, 0] * mpp, th, tw
            )
            rgb = tissue.render(grid, np.random.default_rng([seed, 2, ty, tx]))
            small = rgb[: th - th % factor, : tw - tw % factor].reshape(th // factor, factor, tw // factor, factor, 3)
            mosaic[ty // factor : ty // factor + small.shape[0], tx // factor : tx // factor + small.shape[2]] = (
                small.mean(axis=(1, 3))
            )
            yield rgb


def _downscale(mosaic, shape, max_px):
    """The image scaled so that its longer side is max_px (never enlarged), from its mosaic."""
    from PIL import Image

    s = min(1.0, max_px / max(shape))
    size = (max(1, round(shape[1] * s)), max(1, round(shape[0] * s)))
    return np.asarray(Image.fromarray(mosaic).resize(size, Image.Resampling.LANCZOS))


# ---------------------------------------------------------------- truth
def write_truth(path, und, dif, loadings, names, categories, efficiency, kernel, in_tissue, labels, dense_max):
    """Write truth.zarr (zarr v3 group).

    Arrays: `programmes_undiffused`, `programmes_diffused` float32 [K, rows, cols];
    `loadings` float32 [K, G]; `gene_names`; `capture_efficiency`; `kernel`; `in_tissue` bool
    [rows, cols]; `compartments` uint8 [2 rows, 2 cols] (morphology.LABELS at half-bin
    resolution); and, when G * rows * cols <= dense_max, `rate_undiffused` and `rate_diffused`
    float32 [G, rows, cols] chunked per gene. Attributes: programmes, compartments, gene_names,
    categories, capture_efficiency, dense_rates.
    """
    import zarr

    K, n_rows, n_cols = und.shape
    G = loadings.shape[1]
    with atomic_path(path) as tmp:
        root = zarr.open_group(tmp, mode="w", zarr_format=3)
        chunk = (1, min(n_rows, 512), min(n_cols, 512))
        for name, arr in (("programmes_undiffused", und), ("programmes_diffused", dif)):
            root.create_array(name, data=arr, chunks=chunk)
        root.create_array("loadings", data=loadings)
        root.create_array("gene_names", data=np.array(names, dtype=np.dtypes.StringDType()))
        root.create_array("capture_efficiency", data=np.array(efficiency, dtype=np.float64))
        root.create_array("kernel", data=kernel)
        root.create_array("in_tissue", data=in_tissue.reshape(n_rows, n_cols), chunks=chunk[1:])
        root.create_array("compartments", data=labels, chunks=(1024, 1024))
        root.attrs.update(
            {
                "programmes": list(PROGRAMMES),
                "compartments": list(morphology.LABELS),
                "gene_names": list(names),
                "categories": list(categories),
                "capture_efficiency": float(efficiency),
                "dense_rates": bool(G * n_rows * n_cols <= dense_max),
            }
        )
        if G * n_rows * n_cols <= dense_max:
            for name, prog in (("rate_undiffused", und), ("rate_diffused", dif)):
                arr = root.create_array(name, shape=(G, n_rows, n_cols), dtype=np.float32, chunks=(1, n_rows, n_cols))
                for g0 in range(0, G, 16):
                    g1 = min(g0 + 16, G)
                    arr[g0:g1] = np.tensordot(loadings[:, g0:g1].T, prog, axes=(1, 0))


def truth_rate(truth_zarr, genes=None, rows=slice(None), cols=slice(None), diffused=True, with_efficiency=False):
    """Ground-truth rates of any genes over any window of bins, from the factored truth.

    Parameters
    ----------
    truth_zarr
        A simulated patient's truth.zarr.
    genes
        Gene names or indices (None: all genes).
    rows, cols
        Slices of the bin grid.
    diffused
        Rates after lateral diffusion (what the counts are drawn from) or before.
    with_efficiency
        Multiply by the patient's capture efficiency (the expected counts).

    Returns
    -------
    numpy.ndarray
        float32 [n_genes, n_rows_window, n_cols_window].
    """
    import zarr

    if not Path(truth_zarr).is_dir():
        raise InputError(truth_zarr, "truth store does not exist")
    root = zarr.open_group(truth_zarr, mode="r")
    names = list(root.attrs["gene_names"])
    if genes is None:
        idx = np.arange(len(names))
    else:
        lookup = {n: i for i, n in enumerate(names)}
        try:
            idx = np.array([g if isinstance(g, (int, np.integer)) else lookup[g] for g in genes], dtype=np.int64)
        except KeyError as err:
            raise InputError(truth_zarr, f"gene {err.args[0]!r} is not in the truth") from None
    prog = root["programmes_diffused" if diffused else "programmes_undiffused"][:, rows, cols]
    load = root["loadings"][:][:, idx]
    out = np.tensordot(load.T, prog, axes=(1, 0)).astype(np.float32)
    if with_efficiency:
        out *= np.float32(root.attrs["capture_efficiency"])
    return out


# ---------------------------------------------------------------- patient
def _progress(sample_id, what, t0):
    """Log a step with the time since t0 and the peak memory so far (the rule's log shows both)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    log.info("%s: %s at %.1f s, peak RSS %.0f MB", sample_id, what, time.perf_counter() - t0, peak)


def simulate_patient(out_root, sample_id, params=None):
    """Simulate one patient: Space Ranger outs/, truth.zarr and params.json under out_root.

    Parameters
    ----------
    out_root
        Patient folder; `outs/` (Visium HD layout), `truth.zarr` and `params.json` are written in
        it, each atomically.
    sample_id
        Dataset id (file prefixes in outs/).
    params
        Overrides of `DEFAULT_PARAMS` (may name a `preset`), see `resolve_params`.
    """
    from .spaceranger import write_fullres_image, write_sample

    t0 = time.perf_counter()
    p = resolve_params(params)
    out_root = Path(out_root)
    n_rows, n_cols, b = p["n_rows"], p["n_cols"], p["bin_um"]
    tissue, labels, frac = morphology.generate_tissue(n_rows, n_cols, b, p["seed"], p["morphology"])
    in_tissue = (frac["background"] <= 0.5).ravel()
    und = programme_fields(frac, tissue.cell_counts(n_rows, n_cols, b), b)
    del frac
    kernel = diffusion_kernel(b, **p["diffusion"])
    dif = diffuse(und, kernel)
    _progress(sample_id, "geometry and programmes", t0)
    names, cats, loadings = gene_loadings(p)
    _progress(sample_id, f"{len(names)} gene loadings", t0)
    counts = sample_counts(dif, loadings, p["capture_efficiency"], p["seed"], p["counts_block_rows"])
    _progress(sample_id, f"{counts.sum()} UMIs drawn", t0)
    A, rot, offset, shape = pixel_frame(p)
    factor = 1
    while factor * 2 <= max(shape) / p["hires_max_px"] and p["tile_px"] % (factor * 2) == 0:
        factor *= 2
    mosaic = np.zeros((shape[0] // factor, shape[1] // factor, 3), np.uint8)

    out_root.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_root / "outs") as outs, tempfile.TemporaryDirectory(dir=out_root, prefix=".image-") as stage:
        tiles = _render_tiles(tissue, p, rot, offset, shape, p["seed"], mosaic, factor)
        tif = write_fullres_image(stage, sample_id, tiles, shape, tile=p["tile_px"])
        _progress(sample_id, f"H&E {shape} rendered", t0)
        write_sample(
            outs,
            sample_id,
            counts=counts,
            gene_ids=names,
            gene_names=names,
            n_rows=n_rows,
            n_cols=n_cols,
            in_tissue=in_tissue,
            bin_to_pixel=A,
            microns_per_pixel=p["microns_per_pixel"],
            fullres_shape=shape,
            hires_image=_downscale(mosaic, shape, p["hires_max_px"]),
            lowres_image=_downscale(mosaic, shape, p["lowres_max_px"]),
        )
        shutil.move(tif, Path(outs) / tif.name)
    _progress(sample_id, "Space Ranger folder written", t0)
    write_truth(
        out_root / "truth.zarr",
        und,
        dif,
        loadings,
        names,
        cats,
        p["capture_efficiency"],
        kernel,
        in_tissue,
        labels,
        p["dense_truth_max"],
    )
    _progress(sample_id, "truth written", t0)
    umis = np.asarray(counts.sum(axis=1)).ravel()[in_tissue]
    nnz = np.diff(counts.indptr)[in_tissue]
    derived = {
        "bin_to_pixel": A.tolist(),
        "fullres_shape": list(shape),
        "pixels_per_bin": b / p["microns_per_pixel"],
        "n_genes": len(names),
        "programmes": list(PROGRAMMES),
        "kernel_shape": list(kernel.shape),
        "n_glands": int(len(tissue.glands["x"])),
        "n_cells": int(len(tissue.cells["x"])),
        "n_in_tissue_bins": int(in_tissue.sum()),
        "total_umis": int(counts.sum()),
        "umis_per_in_tissue_bin": float(umis.mean()) if umis.size else 0.0,
        "zero_fraction_in_tissue": float(1 - nnz.sum() / max(1, nnz.size * len(names))),
    }
    write_json({"sample_id": sample_id, "params": p, "derived": derived}, out_root / "params.json")
    _progress(sample_id, "done", t0)
