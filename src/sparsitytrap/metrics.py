"""Per-gene evaluation metrics, vectorised over batches of tiles and genes and streamed.

Evaluation never holds all predictions of a patient: it feeds batches
``pred [T, G, H, W]`` (predicted rates, float), ``target [T, G, H, W]`` (counts) and
``mask [T, H, W]`` (bool, tissue bins) to accumulators, which keep per-gene sums (float64)
or, for the exact pooled Spearman, the tissue values of each gene (float32).

Definitions (those of the seed benchmark, with the faults of its code fixed):

- PCC "pooled": per gene, Pearson over all tissue bins of all tiles pooled.
  PCC "pertile": per (tile, gene) Pearson over the tile's tissue bins (NaN when either side is
  constant there), then the mean over tiles per gene ignoring NaN.
- Coarser scales: counts and predictions are multiplied by the mask, sum-pooled over k x k
  bins (count-conserving, so a pooled bin sums only its tissue bins) and the mask is max-pooled.
- SCC: Spearman, i.e. Pearson of average ranks (ties share the mean rank; zero counts are
  heavily tied), pooled and per tile.
- SSIM at 2 um per (tile, gene), the seeds' definition: tiles with tissue fraction > 0.05;
  prediction and target multiplied by the mask; both min-max scaled with one shared min/max;
  pairs whose range is < 1e-6 skipped; 7 x 7 uniform window, data range 1, K1 0.01, K2 0.03,
  sample covariance, mean over the valid region: identical to
  ``skimage.metrics.structural_similarity(a, b, win_size=7, data_range=1.0)``.
- ratio: masked mean predicted rate / masked mean target count.
- deviance: mean Poisson deviance per tissue bin, ``2 (y log(y / mu) - (y - mu))``,
  with ``y log y = 0`` at ``y = 0`` and ``mu`` clamped at 1e-8.
- sparsity: fraction of tissue bins with a zero count.

Controls: :func:`shuffle_pairs` (label-shuffle null) and :func:`split_half_thinning`
(noise ceiling on real counts, corrected by :func:`correct_split_half`).
"""

import functools
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .bins import pool_masked
from .errors import InputError

SSIM_WIN = 7
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_MIN_TISSUE = 0.05
SSIM_MIN_RANGE = 1e-6
DEVIANCE_EPS = 1e-8
F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# pooling and small helpers


@dataclass(frozen=True)
class MetricSpec:
    """What the workflow needs to know of a per-gene score.

    ``relative_ok``: defined for a ranking model's relative scores (correlations are; SSIM on
    min-max scaled maps, the rate ratio and the deviance need rates on the count scale).
    ``similarity``: higher is better and 0 is chance, so a fraction of the ceiling means something.
    """

    relative_ok: bool
    similarity: bool


_CORRELATION = MetricSpec(relative_ok=True, similarity=True)
#: Every score of an evaluation (columns of ``per_gene.csv``, each with its null and ceiling).
METRICS = {
    **{
        f"{m}_{um}_{p}": _CORRELATION
        for m, um in [("pcc", "2um"), ("pcc", "4um"), ("pcc", "8um"), ("scc", "2um")]
        for p in ("pooled", "pertile")
    },  # fmt: skip
    "ssim_2um_pertile": MetricSpec(relative_ok=False, similarity=True),
    "ratio_pooled": MetricSpec(relative_ok=False, similarity=False),
    "deviance_pooled": MetricSpec(relative_ok=False, similarity=False),
}


def _tissue_values(x, mask):
    """Gather ``x [T, G, H, W]`` at tissue bins: a compact ``[G, n_tissue]`` tensor."""
    return x.transpose(0, 1)[:, mask]


def _as_tensor(x, dtype=None):
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t if dtype is None else t.to(dtype)


def average_ranks(x):
    """1-based ranks along the last axis; ties get the mean of their ranks (``rankdata``'s 'average').

    Vectorised over all leading axes (sort, then tie groups from cumulative max/min of their
    first and last positions).
    """
    s, order = torch.sort(x, dim=-1, stable=True)
    n = x.shape[-1]
    pos = torch.arange(n, device=x.device).expand_as(s)
    first = torch.ones_like(s, dtype=torch.bool)
    first[..., 1:] = s[..., 1:] != s[..., :-1]
    last = torch.ones_like(first)
    last[..., :-1] = first[..., 1:]
    start = torch.where(first, pos, 0).cummax(dim=-1).values
    end = torch.where(last, pos, n).flip(-1).cummin(dim=-1).values.flip(-1)
    avg = (start + end).to(F64) / 2 + 1
    return torch.empty_like(avg).scatter_(-1, order, avg)


def _pearson_from_centered(xc, yc, dims):
    return (xc * yc).sum(dims) / torch.sqrt((xc * xc).sum(dims) * (yc * yc).sum(dims))


def pearson_from_sums(sums, constant):
    """Pearson r from sufficient statistics: the one implementation of a pooled Pearson.

    Parameters
    ----------
    sums
        ``[..., 6]``: n and the sums of x, y, xx, yy, xy (x, y may be shifted by a constant each).
    constant
        ``[...]`` bool: a side is exactly constant (its min equals its max): no correlation.

    Returns
    -------
    ``[...]`` float64 numpy array, NaN where n < 2 or a side is constant.
    """
    n, sx, sy, sxx, syy, sxy = np.moveaxis(np.asarray(sums, dtype=np.float64), -1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cxx, cyy, cxy = sxx - sx * sx / n, syy - sy * sy / n, sxy - sx * sy / n
        r = np.clip(cxy / np.sqrt(cxx * cyy), -1, 1)
    return np.where(np.asarray(constant) | (n < 2), np.nan, r)


# ---------------------------------------------------------------------------------------------
# per (tile, gene) metrics: [T, G] arrays, NaN where undefined


def pearson_per_tile(pred, target, mask):
    """Pearson per (tile, gene) over the tile's tissue bins.

    Parameters
    ----------
    pred, target
        ``[T, G, H, W]``.
    mask
        ``[T, H, W]`` bool.

    Returns
    -------
    ``[T, G]`` float64 tensor; NaN where a tile has < 2 tissue bins or either side is constant.
    """
    x, y = pred.to(F64), target.to(F64)
    m = mask[:, None]
    n = m.sum(dim=(2, 3)).to(F64)
    mf = m.to(F64)
    xc = (x - (x * mf).sum(dim=(2, 3), keepdim=True) / n[..., None, None].clamp(min=1)) * mf
    yc = (y - (y * mf).sum(dim=(2, 3), keepdim=True) / n[..., None, None].clamp(min=1)) * mf
    r = _pearson_from_centered(xc, yc, (2, 3)).clamp(-1, 1)
    # constant means max == min exactly (a variance tolerance would mis-handle tiny signals)
    inf = torch.tensor(float("inf"), dtype=F64, device=x.device)
    const_x = torch.where(m, x, inf).amin(dim=(2, 3)) == torch.where(m, x, -inf).amax(dim=(2, 3))
    const_y = torch.where(m, y, inf).amin(dim=(2, 3)) == torch.where(m, y, -inf).amax(dim=(2, 3))
    bad = const_x | const_y | (n < 2)
    return torch.where(bad, torch.nan, r)


def spearman_per_tile(pred, target, mask):
    """Spearman per (tile, gene) over the tile's tissue bins (average ranks for ties); ``[T, G]``."""
    t, g, h, w = pred.shape
    flat = mask.reshape(t, 1, h * w)

    def ranks(x):
        # float32 holds counts and float16/32 rates exactly (faster sort); float64 stays float64
        x = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(t, g, h * w)
        # off-tissue bins rank after every tissue bin: tissue ranks are those among tissue bins
        return average_ranks(torch.where(flat, x, float("inf")))

    rx, ry = ranks(pred), ranks(target)
    return pearson_per_tile(rx.reshape(t, g, h, w), ry.reshape(t, g, h, w), mask)


def _box_mean(z, win):
    # valid win x win window means (skimage's uniform_filter, cropped) from cumulative sums:
    # two passes instead of win^2 per bin; float64 rounding stays ~1e-14 for data in [0, 1]
    for dim in (-2, -1):
        c = F.pad(z.cumsum(dim), (0, 0, 1, 0) if dim == -2 else (1, 0))
        n = c.shape[dim]
        z = c.narrow(dim, win, n - win) - c.narrow(dim, 0, n - win)
    return z / (win * win)


def ssim_images(a, b, win=SSIM_WIN, data_range=1.0):
    """Mean SSIM of image pairs, exactly as ``skimage.metrics.structural_similarity``.

    Uniform ``win x win`` window, K1 0.01, K2 0.03, sample covariance (``NP / (NP - 1)``), mean
    over the region skimage keeps after cropping ``(win - 1) // 2`` bins from each border.

    Parameters
    ----------
    a, b
        ``[N, H, W]`` float tensors (computed in float64).

    Returns
    -------
    ``[N]`` float64 tensor.
    """
    a, b = a.to(F64)[:, None], b.to(F64)[:, None]
    cov_norm = win * win / (win * win - 1)
    ux, uy = _box_mean(a, win), _box_mean(b, win)
    vx = cov_norm * (_box_mean(a * a, win) - ux * ux)
    vy = cov_norm * (_box_mean(b * b, win) - uy * uy)
    vxy = cov_norm * (_box_mean(a * b, win) - ux * uy)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


def ssim_per_tile(pred, target, mask, ssim_min_tissue=SSIM_MIN_TISSUE, chunk=256):
    """SSIM at native resolution per (tile, gene), the seeds' definition (see module docstring).

    Parameters
    ----------
    pred, target
        ``[T, G, H, W]``.
    mask
        ``[T, H, W]`` bool.
    ssim_min_tissue
        Tiles need a tissue fraction above this.
    chunk
        Image pairs per filter call (bounds memory).

    Returns
    -------
    ``[T, G]`` float64 tensor, NaN for skipped pairs (little tissue, or shared range < 1e-6).
    """
    t, g, h, w = pred.shape
    m = mask[:, None].to(F64)
    x, y = pred.to(F64) * m, target.to(F64) * m
    lo = torch.minimum(x.amin(dim=(2, 3)), y.amin(dim=(2, 3)))
    span = torch.maximum(x.amax(dim=(2, 3)), y.amax(dim=(2, 3))) - lo
    valid = (mask.to(F64).mean(dim=(1, 2)) > ssim_min_tissue)[:, None] & (span >= SSIM_MIN_RANGE)
    scale = torch.where(valid, span, 1.0)[..., None, None]
    xs = ((x - lo[..., None, None]) / scale).reshape(t * g, h, w)
    ys = ((y - lo[..., None, None]) / scale).reshape(t * g, h, w)
    keep = valid.reshape(-1).nonzero().squeeze(1)
    out = torch.full((t * g,), torch.nan, dtype=F64, device=pred.device)
    for i in range(0, len(keep), chunk):
        idx = keep[i : i + chunk]
        out[idx] = ssim_images(xs[idx], ys[idx])
    return out.reshape(t, g)


# ---------------------------------------------------------------------------------------------
# accumulators


class PearsonAccumulator:
    """Per-gene Pearson over all tissue bins of a stream of batches (pooled over tiles).

    Keeps per-gene n and sums of x, y, xx, yy, xy in float64, shifted by a per-gene reference
    (the first batch's tissue means) so that large offsets do not cancel catastrophically.
    A side that is exactly constant (running min == max) gives NaN.

    Parameters
    ----------
    n_genes
        Number of genes (channel axis of the batches).
    """

    def __init__(self, n_genes):
        self.n_genes = n_genes
        self._sums = None  # [6, G]: n, sx, sy, sxx, syy, sxy
        self._ref = None  # [2, G]
        self._range = None  # [4, G]: min x, max x, min y, max y

    def update(self, pred, target, mask):
        """Add one batch ``pred, target [T, G, H, W]``, ``mask [T, H, W]``."""
        x, y = _tissue_values(pred.to(F64), mask), _tissue_values(target.to(F64), mask)
        if x.shape[1] == 0:
            return
        if self._sums is None:
            self._sums = torch.zeros(6, self.n_genes, dtype=F64, device=x.device)
            self._ref = torch.stack([x.mean(dim=1), y.mean(dim=1)])
            inf = torch.full((self.n_genes,), float("inf"), dtype=F64, device=x.device)
            self._range = torch.stack([inf, -inf, inf, -inf])
        xs, ys = x - self._ref[0, :, None], y - self._ref[1, :, None]
        self._sums += torch.stack(
            [
                torch.full((self.n_genes,), float(x.shape[1]), dtype=F64, device=x.device),
                xs.sum(1),
                ys.sum(1),
                (xs * xs).sum(1),
                (ys * ys).sum(1),
                (xs * ys).sum(1),
            ]
        )
        r = self._range
        self._range = torch.stack(
            [
                torch.minimum(r[0], x.amin(1)),
                torch.maximum(r[1], x.amax(1)),
                torch.minimum(r[2], y.amin(1)),
                torch.maximum(r[3], y.amax(1)),
            ]
        )

    def compute(self):
        """Per-gene Pearson r, ``[G]`` numpy float64 (NaN: < 2 bins or a constant side)."""
        if self._sums is None:
            return np.full(self.n_genes, np.nan)
        lo_x, hi_x, lo_y, hi_y = self._range.cpu().numpy()
        return pearson_from_sums(self._sums.cpu().numpy().T, (lo_x == hi_x) | (lo_y == hi_y))

    @property
    def n_bins(self):
        """Number of tissue bins seen."""
        return 0 if self._sums is None else int(self._sums[0, 0])


class TileMetricAccumulator:
    """A per-(tile, gene) metric over a stream, averaged over tiles per gene ignoring NaN.

    Parameters
    ----------
    n_genes
        Number of genes.
    metric
        ``metric(pred, target, mask) -> [T, G]`` tensor, NaN where undefined
        (e.g. :func:`pearson_per_tile`, :func:`spearman_per_tile`, :func:`ssim_per_tile`).
    """

    def __init__(self, n_genes, metric):
        self.n_genes = n_genes
        self.metric = metric
        self._values = []

    def update(self, pred, target, mask):
        """Score one batch and keep its ``[T, G]`` values (small: tiles x genes)."""
        self._values.append(self.metric(pred, target, mask).cpu().numpy())

    @property
    def values(self):
        """All per-(tile, gene) values in stream order, ``[T, G]`` (for bootstraps over tiles)."""
        return np.concatenate(self._values) if self._values else np.empty((0, self.n_genes))

    def compute(self):
        """Per-gene mean over tiles with a defined value, and how many tiles that is.

        Returns
        -------
        mean, count
            ``[G]`` float64 (NaN where count is 0) and ``[G]`` int.
        """
        v = self.values
        ok = np.isfinite(v)
        count = ok.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(ok, v, 0.0).sum(0) / count
        return np.where(count > 0, mean, np.nan), count


class SpearmanAccumulator:
    """Exact per-gene Spearman over all tissue bins of a stream (pooled over tiles).

    Ranks need every bin of the patient at once, so the tissue values of every gene are kept
    as float32 on the CPU: 2 x tissue bins x genes x 4 bytes (one patient of about 5 million
    tissue bins and 50 genes: 2 GB). Fine for evaluation-sized gene panels, not for a
    whole transcriptome. Ties (zero counts) get average ranks.
    """

    def __init__(self, n_genes):
        self.n_genes = n_genes
        self._x, self._y = [], []

    def update(self, pred, target, mask):
        """Keep the tissue values of one batch."""
        self._x.append(_tissue_values(pred, mask).to("cpu", torch.float32))
        self._y.append(_tissue_values(target, mask).to("cpu", torch.float32))

    def compute(self):
        """Per-gene Spearman rho, ``[G]`` numpy float64 (NaN: < 2 bins or a constant side)."""
        rho = np.full(self.n_genes, np.nan)
        if not self._x or sum(c.shape[1] for c in self._x) < 2:
            return rho
        for g in range(self.n_genes):  # one gene at a time bounds the memory of the ranks
            x = torch.cat([c[g] for c in self._x])
            y = torch.cat([c[g] for c in self._y])
            if x.min() == x.max() or y.min() == y.max():
                continue
            rx, ry = average_ranks(x), average_ranks(y)
            rho[g] = float(_pearson_from_centered(rx - rx.mean(), ry - ry.mean(), 0).clamp(-1, 1))
        return rho


class CountAccumulator:
    """Per-gene ratio, mean Poisson deviance and sparsity over the tissue bins of a stream."""

    def __init__(self, n_genes):
        self.n_genes = n_genes
        self._sums = torch.zeros(4, n_genes, dtype=F64)  # sum pred, sum target, deviance, zeros
        self._n = 0

    def update(self, pred, target, mask):
        """Add one batch."""
        mu = _tissue_values(pred.to(F64), mask)
        y = _tissue_values(target.to(F64), mask)
        dev = torch.xlogy(y, y) - torch.xlogy(y, mu.clamp(min=DEVIANCE_EPS)) - (y - mu)
        batch = torch.stack([mu.sum(1), y.sum(1), 2 * dev.sum(1), (y == 0).sum(1).to(F64)])
        self._sums += batch.cpu()
        self._n += mu.shape[1]

    def compute(self):
        """Dict of ``[G]`` arrays: ratio, deviance, sparsity, mean_pred, mean_target."""
        s = self._sums.numpy()
        n = self._n if self._n else np.nan
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(s[1] > 0, s[0] / s[1], np.nan)
        return {
            "ratio": ratio,
            "deviance": s[2] / n,
            "sparsity": s[3] / n,
            "mean_pred": s[0] / n,
            "mean_target": s[1] / n,
        }


# ---------------------------------------------------------------------------------------------
# all metrics of one evaluation


def check_batch(pred, target, mask, n_genes, max_pool=1, source="batch"):
    """Validate one batch and return torch tensors ``(pred, target, mask)`` (mask as bool).

    Raises
    ------
    InputError
        Naming ``source`` and the fault: shapes, gene count, pooling divisibility,
        non-finite predictions at tissue bins, negative counts.
    """
    pred, target, mask = _as_tensor(pred), _as_tensor(target), _as_tensor(mask)
    if pred.ndim != 4:
        raise InputError(source, f"predictions must be [tiles, genes, H, W], got shape {tuple(pred.shape)}")
    if tuple(target.shape) != tuple(pred.shape):
        raise InputError(source, f"target shape {tuple(target.shape)} != prediction shape {tuple(pred.shape)}")
    t, g, h, w = pred.shape
    if tuple(mask.shape) != (t, h, w):
        raise InputError(source, f"mask shape {tuple(mask.shape)} != {(t, h, w)} (tiles, H, W)")
    if g != n_genes:
        raise InputError(source, f"{g} genes in the batch, expected {n_genes}")
    if h % max_pool or w % max_pool:
        raise InputError(source, f"tile {h}x{w} bins is not divisible by the pooling factor {max_pool}")
    mask = mask.to(pred.device) != 0
    target = target.to(pred.device)
    if not torch.isfinite(_tissue_values(pred, mask)).all():
        raise InputError(source, "predictions are NaN or infinite at tissue bins")
    if (_tissue_values(target, mask) < 0).any():
        raise InputError(source, "target counts are negative at tissue bins")
    return pred, target, mask


class GeneMetrics:
    """Every per-gene metric of one evaluation, fed batch by batch.

    Parameters
    ----------
    n_genes
        Number of genes (channel axis).
    scales
        Pooling factors for PCC: 1, 2, 4 are 2, 4, 8 um bins.
    bin_um
        Size of the native bin in um (column names).
    spearman, ssim
        Compute SCC (pooled keeps the tissue values, see :class:`SpearmanAccumulator`) and SSIM.
    ssim_min_tissue
        SSIM tiles need a tissue fraction above this.
    source
        Name used in error messages (e.g. the predictions' path).

    Examples
    --------
    >>> gm = GeneMetrics(n_genes=50)
    >>> for pred, target, mask in batches:  # doctest: +SKIP
    ...     gm.update(pred, target, mask)
    >>> table = gm.table(genes)  # doctest: +SKIP
    """

    def __init__(
        self,
        n_genes,
        scales=(1, 2, 4),
        bin_um=2.0,
        spearman=True,
        ssim=True,
        ssim_min_tissue=SSIM_MIN_TISSUE,
        source="batch",
    ):
        self.n_genes = n_genes
        self.scales = tuple(int(k) for k in scales)
        self.source = source
        self._pcc = {}
        for k in self.scales:
            um = f"{bin_um * k:g}um"
            self._pcc[k] = (f"pcc_{um}", PearsonAccumulator(n_genes), TileMetricAccumulator(n_genes, pearson_per_tile))
        native = f"{bin_um:g}um"
        self._scc = None
        if spearman:
            self._scc = (
                f"scc_{native}",
                SpearmanAccumulator(n_genes),
                TileMetricAccumulator(n_genes, spearman_per_tile),
            )
        self._ssim = None
        if ssim:
            fn = functools.partial(ssim_per_tile, ssim_min_tissue=ssim_min_tissue)
            self._ssim = (f"ssim_{native}", TileMetricAccumulator(n_genes, fn))
        self._counts = CountAccumulator(n_genes)

    def update(self, pred, target, mask):
        """Add one batch: ``pred, target [T, G, H, W]``, ``mask [T, H, W]`` (tensors or arrays)."""
        pred, target, mask = check_batch(pred, target, mask, self.n_genes, max(self.scales), self.source)
        for k, (_, pooled, pertile) in self._pcc.items():
            p, t, m = pool_masked(pred.to(F64), target.to(F64), mask, k)
            pooled.update(p, t, m)
            pertile.update(p, t, m)
        if self._scc:
            self._scc[1].update(pred, target, mask)
            self._scc[2].update(pred, target, mask)
        if self._ssim:
            self._ssim[1].update(pred, target, mask)
        self._counts.update(pred, target, mask)

    def table(self, genes=None):
        """One row per gene: pcc_*_pooled, pcc_*_pertile, scc_*, ssim_*, ssim_pairs, ratio, ...

        Parameters
        ----------
        genes
            Gene names in channel order (default: ``g0, g1, ...``).
        """
        genes = list(genes) if genes is not None else [f"g{i}" for i in range(self.n_genes)]
        if len(genes) != self.n_genes:
            raise InputError("genes", f"{len(genes)} names for {self.n_genes} genes")
        cols = {"gene": genes}
        for name, pooled, pertile in self._pcc.values():
            cols[f"{name}_pooled"] = pooled.compute()
            cols[f"{name}_pertile"] = pertile.compute()[0]
        if self._scc:
            name, pooled, pertile = self._scc
            cols[f"{name}_pooled"] = pooled.compute()
            cols[f"{name}_pertile"] = pertile.compute()[0]
        if self._ssim:
            mean, count = self._ssim[1].compute()
            cols[self._ssim[0]] = mean
            cols["ssim_pairs"] = count
        cols.update(self._counts.compute())
        cols["n_bins"] = self._counts._n
        return pd.DataFrame(cols)

    def per_tile(self):
        """Per-(tile, gene) values ``[T, G]`` of the per-tile metrics, for bootstraps over tiles."""
        out = {f"{name}_pertile": acc.values for name, _, acc in self._pcc.values()}
        if self._scc:
            out[f"{self._scc[0]}_pertile"] = self._scc[2].values
        if self._ssim:
            out[self._ssim[0]] = self._ssim[1].values
        return out


def evaluate_stream(batches, n_genes, genes=None, **kwargs):
    """Per-gene metrics of an iterator of ``(pred, target, mask)`` batches.

    Parameters
    ----------
    batches
        Iterable of ``(pred [T, G, H, W], target [T, G, H, W], mask [T, H, W])``.
    n_genes
        Number of genes.
    genes
        Gene names in channel order.
    **kwargs
        Passed to :class:`GeneMetrics`.

    Returns
    -------
    pandas.DataFrame, one row per gene (see :meth:`GeneMetrics.table`).
    """
    gm = GeneMetrics(n_genes, **kwargs)
    for pred, target, mask in batches:
        gm.update(pred, target, mask)
    return gm.table(genes)


# ---------------------------------------------------------------------------------------------
# controls: label-shuffle null and split-half noise ceiling


def shuffle_pairs(n_tiles, seed):
    """A random derangement of tiles for the label-shuffle null.

    The null scores the prediction of tile ``perm[t]`` against the target and mask of tile
    ``t`` (``perm[t] != t`` for every t), so every target is scored once, on its own tissue.

    Parameters
    ----------
    n_tiles
        Number of tiles (at least 2).
    seed
        Random seed.

    Returns
    -------
    ``[n_tiles]`` int64 numpy array.
    """
    if n_tiles < 2:
        raise InputError("n_tiles", f"a label shuffle needs at least 2 tiles, got {n_tiles}")
    rng = np.random.default_rng(seed)
    idx = np.arange(n_tiles)
    while True:  # rejection sampling: uniform over derangements, about e tries on average
        perm = rng.permutation(n_tiles)
        if not (perm == idx).any():
            return perm


def iter_batches(pred, target, mask, batch_tiles, pred_order=None):
    """Stream ``(pred, target, mask)`` torch batches from array-likes (zarr arrays, numpy).

    Parameters
    ----------
    pred, target, mask
        ``[T, G, H, W]``, ``[T, G, H, W]``, ``[T, H, W]``, read a batch at a time.
    batch_tiles
        Tiles per batch.
    pred_order
        Optional ``[T]`` tile order for the predictions, e.g. :func:`shuffle_pairs`:
        batch rows are ``pred[pred_order[t]]`` with ``target[t]`` and ``mask[t]``.
    """
    n = len(target)
    for t0 in range(0, n, batch_tiles):
        t1 = min(t0 + batch_tiles, n)
        if pred_order is None:
            p = np.asarray(pred[t0:t1])
        else:
            p = np.stack([np.asarray(pred[int(i)]) for i in pred_order[t0:t1]])
        yield (
            torch.from_numpy(p),
            torch.from_numpy(np.asarray(target[t0:t1])),
            torch.from_numpy(np.asarray(mask[t0:t1])),
        )


def split_half_thinning(counts, seed):
    """Split counts into two halves by binomial thinning: ``y1 ~ Binomial(y, 0.5)``, ``y2 = y - y1``.

    For Poisson counts the halves are independent Poisson(rate / 2) given the rate, i.e. two
    half-depth replicates. Scoring ``y1`` against ``y2`` and correcting with
    :func:`correct_split_half` estimates the noise ceiling.

    Parameters
    ----------
    counts
        Non-negative integer counts (numpy array or torch tensor), any shape.
    seed
        Int, or a sequence such as ``(seed, first_tile_index)`` so that streamed batches get
        distinct but reproducible draws.

    Returns
    -------
    y1, y2
        Same type, shape and dtype as ``counts``.
    """
    is_torch = isinstance(counts, torch.Tensor)
    y = counts.cpu().numpy() if is_torch else np.asarray(counts)
    if y.size and (y < 0).any():
        raise InputError("counts", "binomial thinning needs non-negative counts")
    if y.size and not np.array_equal(y, np.round(y)):
        raise InputError("counts", "binomial thinning needs integer counts")
    rng = np.random.default_rng(seed)
    y1 = rng.binomial(y.astype(np.int64), 0.5).astype(y.dtype)
    y2 = y - y1
    if is_torch:
        return torch.from_numpy(y1).to(counts.device), torch.from_numpy(y2).to(counts.device)
    return y1, y2


def spearman_brown(r):
    """Full-depth replicate correlation from a split-half correlation: ``2 r / (1 + r)``."""
    r = np.asarray(r, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 2 * r / (1 + r)


def noise_ceiling(r_half):
    """Noise ceiling of a correlation metric from its split-half value.

    Spearman-Brown gives the correlation between two full-depth replicates,
    ``rho = 2 r / (1 + r)``; for counts y = rate + independent noise this is
    ``var(rate) / var(y)``, and the best correlation any prediction can reach against y (the
    true rate's) is ``sqrt(rho)``. Exact for Pearson on Poisson counts; an approximation for
    Spearman. Split-half values <= 0 give a ceiling of 0.
    """
    rho = spearman_brown(np.clip(np.asarray(r_half, dtype=float), 0.0, None))
    return np.sqrt(rho)


def correct_split_half(table):
    """Turn a metrics table of ``y1`` scored against ``y2`` into noise ceilings.

    The ``pcc_*`` and ``scc_*`` columns are replaced by :func:`noise_ceiling` of their values;
    the other columns (SSIM, ratio, deviance) stay the raw half-vs-half values, for which no
    standard correction exists.
    """
    out = table.copy()
    for col in out.columns:
        if col.startswith(("pcc_", "scc_")):
            out[col] = noise_ceiling(out[col].to_numpy())
    return out
