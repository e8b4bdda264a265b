"""The expression model: programme fields on the bin grid and the gene loadings on them.

rate[g, bin] = sum_k programme[k, bin] * loading[k, g]. Programmes follow the tissue geometry of
one patient; loadings depend only on the gene table and `gene_seed`, so every patient of a cohort
shares the same biology. Each gene's loadings are scaled so that its zero fraction over in-tissue
2 um bins (efficiency 1) meets a target: the seeds' sparsity, calibrated on a reference tissue.
"""

import functools
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from . import morphology
from .diffusion import diffuse, diffusion_kernel
from .params import DEFAULT_PARAMS

PROGRAMMES = ("epithelial", "secretory", "stromal", "plasma", "lymphoid", "muscle", "housekeeping", "mitochondrial")
GENE_TABLE = Path(__file__).resolve().parents[3] / "resources" / "gene_categories.tsv"

# The seeds' 50 genes (top 50 by raw-count variance on GSE280318): the most expressed, hence the least sparse.
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
        loadings = np.concatenate([loadings, _padding_loadings(table, ref, n_pad, params)], axis=1)
        names += [f"SIMG{i:05d}" for i in range(1, n_pad + 1)]
        cats += ["Simulated"] * n_pad
    return names, cats, loadings.astype(np.float32)


def _padding_loadings(table, ref, n_pad, params):
    """Loadings [K, n_pad] of generated genes: programmes drawn from the table's, log-normal levels
    that add up to `padding_umis_per_bin` mean UMIs per reference bin."""
    rng = np.random.default_rng([params["gene_seed"], 4])
    progs = rng.choice(table["programme"].to_numpy(), n_pad)
    wp = _directions(list(progs), params["leak"], rng.random((len(PROGRAMMES), n_pad)))
    level = rng.lognormal(0.0, 1.0, n_pad)
    level *= params["padding_umis_per_bin"] / level.sum()
    return wp * (level / (ref.mean(axis=0) @ wp))[None, :]
