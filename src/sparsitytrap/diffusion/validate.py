"""Validation against the simulator's undiffused truth, beside classical deconvolution.

For every gene and method, on the same bins: Pearson and Spearman with the undiffused rate at
2 um (in-tissue bins) and 8 um (4 x 4 sum-pooled, blocks at least half in tissue), the fraction
of the field's mass outside the tissue, the mass removed by the method, Moran's I (in tissue),
total counts, and the change against raw counts (a method that makes a gene worse is flagged).

Methods: `raw` counts; `raw_blurred` (raw convolved with the estimated Gaussian: a pure
denoiser, to tell de-diffusion from smoothing); `rl_estimated` / `rl_true` (Richardson-Lucy
with the data-estimated Gaussian / the simulator's kernel, an oracle); `ot` (the corrected
store). One gene's grids at a time: memory is a few grids, whatever the number of genes.
"""

import numpy as np
import pandas as pd
import torch
from scipy import signal, stats

from ..errors import InputError
from ..io import atomic_path
from .deconvolve import gaussian_kernel, richardson_lucy
from .estimate import kernel_edge_length
from .inputs import check_genes, sample_input
from .settings import check_settings
from .spatial import morans_i
from .store import open_corrected, read_gene_grids

METHODS = ("raw", "raw_blurred", "rl_estimated", "rl_true", "ot")
POOL = 4  # 8 um = 4 x 4 bins of 2 um
GENE_BATCH = 8
METRICS = ("pearson_2um", "spearman_2um", "pearson_8um", "spearman_8um")


def _pool(a, k=POOL):
    H, W = a.shape[-2:]
    a = a[..., : H - H % k, : W - W % k]
    return a.reshape(*a.shape[:-2], H // k, k, W // k, k).sum(axis=(-1, -3))


def _correlations(field, truth, tissue, tissue8):
    f, t = field * tissue, truth * tissue
    f8, t8 = _pool(f)[tissue8], _pool(t)[tissue8]
    f2, t2 = f[tissue], t[tissue]
    out = {}
    for name, (a, b) in {"2um": (f2, t2), "8um": (f8, t8)}.items():
        const = a.std() == 0 or b.std() == 0
        out[f"pearson_{name}"] = np.nan if const else float(np.corrcoef(a, b)[0, 1])
        out[f"spearman_{name}"] = np.nan if const else float(stats.spearmanr(a, b).statistic)
    return out


class _Context:
    """Everything the per-gene loop needs, read once."""

    def __init__(self, sdata_zarr, corrected_zarr, truth_zarr, genes, dataset_id, settings):
        from ..stores.truth import IN_TISSUE, KERNEL, open_truth

        self.settings = check_settings(settings)
        self.store = open_corrected(corrected_zarr)
        genes = check_genes(genes, f"{corrected_zarr}: genes")
        missing = [g for g in genes if g not in self.store.genes]
        if missing:
            raise InputError(corrected_zarr, f"gene {missing[0]!r} was not corrected in this store")
        self.genes, self.truth_zarr = genes, truth_zarr
        truth = open_truth(truth_zarr)
        self.tissue = truth[IN_TISSUE][:].astype(bool)
        self.kernel = truth[KERNEL][:].astype(np.float64)
        self.shape = self.tissue.shape
        self.tissue8 = _pool(self.tissue.astype(np.float64)) >= POOL * POOL / 2
        self.inp, _, _ = sample_input(sdata_zarr, genes, dataset_id=dataset_id)
        self.length_um = float(self.store.attrs["diffusion_length_um"])
        self.estimated_kernel = gaussian_kernel(self.length_um, self.inp.bin_um)
        self.removed = self.store.attrs["removed_mass"]
        self.observed = self.store.attrs["observed_mass"]

    def _pad(self, grid):
        out = np.zeros(self.shape, np.float32)
        h, w = min(grid.shape[0], self.shape[0]), min(grid.shape[1], self.shape[1])
        out[:h, :w] = grid[:h, :w]
        return out

    def fields(self):
        """Yield (gene, truth, {method: field}) one gene at a time (truth and OT read in batches)."""
        from ..stores.truth import truth_rate

        n_iter = self.settings["rl_iterations"]
        for b0 in range(0, len(self.genes), GENE_BATCH):
            batch = self.genes[b0 : b0 + GENE_BATCH]
            truth = truth_rate(self.truth_zarr, batch, diffused=False, with_efficiency=True)
            ot = read_gene_grids(self.store, batch)
            for k, gene in enumerate(batch):
                g = self.inp.genes.index(gene)
                raw = self._pad(self.inp.window(0, 0, *self.inp.shape, genes=[g])[0])
                yield (
                    gene,
                    truth[k],
                    {
                        "raw": raw,
                        "raw_blurred": signal.fftconvolve(raw, self.estimated_kernel, mode="same").astype(np.float32),
                        "rl_estimated": richardson_lucy(raw, self.estimated_kernel, n_iter),
                        "rl_true": richardson_lucy(raw, self.kernel, n_iter),
                        "ot": self._pad(ot[k]),
                    },
                )


def validate_against_truth(sdata_zarr, corrected_zarr, truth_zarr, genes, *, dataset_id=None, settings=None):
    """Per gene x method: correlation with the undiffused truth, leakage, Moran's I, totals.

    Parameters
    ----------
    sdata_zarr
        The ingested sample (raw counts).
    corrected_zarr
        Its corrected store (`correct_sample`).
    truth_zarr
        The simulated patient's truth.zarr.
    genes
        Genes to score (all corrected in the store).
    dataset_id
        Sample id, inferred when None.
    settings
        The `diffusion:` section (`rl_iterations`); the diffusion length is the store's.

    Returns
    -------
    pandas.DataFrame
        One row per gene x method: METRICS, ``frac_outside_tissue``, ``removed_fraction``,
        ``morans_i``, ``total``, ``delta_<metric>`` (method minus raw) and
        ``worse_than_raw_<2um|8um>`` (Pearson below raw's), plus the estimated diffusion length
        and the true kernel's edge-equivalent length (same estimator, noiseless) in every row.
    """
    ctx = _Context(sdata_zarr, corrected_zarr, truth_zarr, genes, dataset_id, settings)
    true_length = kernel_edge_length(ctx.kernel, ctx.tissue, ctx.tissue, bin_um=ctx.inp.bin_um)
    rows = []
    for gene, truth, fields in ctx.fields():
        for method, field in fields.items():
            total = float(field.sum(dtype=np.float64))
            outside = float(field[~ctx.tissue].sum(dtype=np.float64))
            removed = float(ctx.removed[gene]) if method == "ot" else 0.0
            moran = float(morans_i(torch.from_numpy(field[None].astype(np.float64)), torch.from_numpy(ctx.tissue))[0])
            rows.append(
                {
                    "gene": gene,
                    "method": method,
                    **_correlations(field, truth, ctx.tissue, ctx.tissue8),
                    "frac_outside_tissue": outside / total if total > 0 else 0.0,
                    "removed_fraction": removed / ctx.observed[gene] if ctx.observed[gene] > 0 else 0.0,
                    "morans_i": moran,
                    "total": total,
                }
            )
    df = pd.DataFrame(rows)
    raw = df[df["method"] == "raw"].set_index("gene")
    for m in METRICS:
        df[f"delta_{m}"] = df[m].to_numpy() - raw.loc[df["gene"], m].to_numpy()
    for scale in ("2um", "8um"):
        df[f"worse_than_raw_{scale}"] = df[f"delta_pearson_{scale}"] < 0
    df["diffusion_length_estimated_um"] = ctx.length_um
    df["diffusion_length_true_um"] = true_length
    return df


def summarise_validation(df):
    """Per method: median of each metric and of its change, and how many genes got better / worse."""
    out = []
    for method, part in df.groupby("method", sort=False):
        row = {"method": method, "genes": len(part)}
        for m in METRICS + ("morans_i", "frac_outside_tissue", "removed_fraction"):
            row[m] = float(part[m].median())
        for scale in ("2um", "8um"):
            row[f"better_{scale}"] = int((part[f"delta_pearson_{scale}"] > 0).sum())
            row[f"worse_{scale}"] = int(part[f"worse_than_raw_{scale}"].sum())
        out.append(row)
    return pd.DataFrame(out)


# ---------------------------------------------------------------- figure
def _focus(tissue, size):
    """Top-left corner of the size x size window with the most tissue (coarse search)."""
    H, W = tissue.shape
    size = min(size, H, W)
    cs = np.pad(tissue.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    best, corner = -1, (0, 0)
    for r in range(0, H - size + 1, max(1, size // 4)):
        for c in range(0, W - size + 1, max(1, size // 4)):
            n = cs[r + size, c + size] - cs[r, c + size] - cs[r + size, c] + cs[r, c]
            if n > best:
                best, corner = n, (r, c)
    return corner, size


def figure_methods(
    sdata_zarr,
    corrected_zarr,
    truth_zarr,
    out_prefix,
    *,
    genes,
    formats=("png",),
    dataset_id=None,
    settings=None,
    window_bins=128,
):
    """Observed | RL (estimated kernel) | OT | undiffused truth, one row per gene, on one window.

    The window (`window_bins` square, 2 um bins, not pooled) is the one with the most tissue;
    each row shares one colour scale (99.5th percentile of its panels on tissue); off-tissue
    bins are grey. Written to ``{out_prefix}.{fmt}`` atomically per format.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib as mpl
    from matplotlib.figure import Figure

    ctx = _Context(sdata_zarr, corrected_zarr, truth_zarr, genes, dataset_id, settings)
    (r0, c0), n = _focus(ctx.tissue, window_bins)
    sl = (slice(r0, r0 + n), slice(c0, c0 + n))
    columns = (
        ("raw", "observed"),
        ("rl_estimated", "RL (estimated kernel)"),
        ("ot", "OT"),
        ("truth", "undiffused truth"),
    )
    fig = Figure(figsize=(2.4 * len(columns), 2.3 * len(ctx.genes) + 0.4), layout="constrained")
    axes = fig.subplots(len(ctx.genes), len(columns), squeeze=False)
    cmap = mpl.colormaps["magma"].with_extremes(bad="lightgrey")
    off = ~ctx.tissue[sl]
    for i, (gene, truth, fields) in enumerate(ctx.fields()):
        panels = {**fields, "truth": truth}
        shown = [np.ma.array(panels[key][sl], mask=off) for key, _ in columns]
        on = np.concatenate([p.compressed() for p in shown])
        vmax = float(np.percentile(on, 99.5)) if on.size and np.percentile(on, 99.5) > 0 else 1.0
        for j, ((_, title), panel) in enumerate(zip(columns, shown)):
            ax = axes[i, j]
            ax.imshow(panel, cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title if i == 0 else "", fontsize=9)
        axes[i, 0].set_ylabel(gene, fontsize=9)
    fig.suptitle(f"{ctx.store.attrs['sample']}: bins {r0}-{r0 + n} x {c0}-{c0 + n} (2 um)", fontsize=10)
    for fmt in formats:
        with atomic_path(f"{out_prefix}.{fmt}") as tmp:
            fig.savefig(tmp, format=fmt, dpi=120)
    return fig
