"""Streamed accumulators: every per-gene metric of one evaluation, fed batch by batch."""

import functools

import numpy as np
import pandas as pd
import torch

from ..bins import pool_masked
from ..errors import InputError
from ._tensors import F64, _as_tensor, _tissue_values
from .correlation import _pearson_from_centered, average_ranks, pearson_from_sums, pearson_per_tile, spearman_per_tile
from .ssim import SSIM_MIN_TISSUE, ssim_per_tile

DEVIANCE_EPS = 1e-8


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


def _stored(values):
    # float16 predictions stay float16 (half the memory, ranked by counting); the rest as float32
    keep = values.dtype in (torch.float16, torch.bfloat16)
    return values.to("cpu", values.dtype if keep else torch.float32)


class SpearmanAccumulator:
    """Exact per-gene Spearman over all tissue bins of a stream (pooled over tiles).

    Ranks need every bin of the patient at once, so the tissue values of every gene are kept
    on the CPU, float16 predictions as float16, everything else as float32: at most
    2 x tissue bins x genes x 4 bytes (one patient of about 5 million tissue bins and 50 genes:
    2 GB; 1.5 GB with float16 predictions). Fine for evaluation-sized gene panels, not for a
    whole transcriptome. Ties (zero counts) get average ranks, by counting for counts and float16.
    """

    def __init__(self, n_genes):
        self.n_genes = n_genes
        self._x, self._y = [], []

    def update(self, pred, target, mask):
        """Keep the tissue values of one batch."""
        self._x.append(_stored(_tissue_values(pred, mask)))
        self._y.append(_stored(_tissue_values(target, mask)))

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
    off = ~mask[:, None]  # checked in place: gathering the tissue values would cost more
    if not (torch.isfinite(pred) | off).all():
        raise InputError(source, "predictions are NaN or infinite at tissue bins")
    if ((target < 0) & ~off).any():
        raise InputError(source, "target counts are negative at tissue bins")
    return pred, target, mask


class GeneMetrics:
    """Every per-gene metric of one evaluation, fed batch by batch.

    Parameters
    ----------
    n_genes
        Number of genes (channel axis).
    scales
        Pooling factors for PCC and SCC: 1, 2, 4, 8 are 2, 4, 8, 16 um bins.
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
        scales=(1, 2, 4, 8),
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
        self._scc = {}
        for k in self.scales if spearman else ():
            um = f"{bin_um * k:g}um"
            self._scc[k] = (
                f"scc_{um}",
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
        p64, t64 = pred.to(F64), target.to(F64)  # converted once for every scale
        for k, (_, pooled, pertile) in self._pcc.items():
            # at k = 1 masking is not needed: both accumulators look at tissue bins only
            p, t, m = (p64, t64, mask) if k == 1 else pool_masked(p64, t64, mask, k)
            pooled.update(p, t, m)
            pertile.update(p, t, m)
            if k in self._scc:  # ranks at 2 um from the float16 predictions themselves (counted, not sorted)
                sp, st = (pred, target) if k == 1 else (p, t)
                self._scc[k][1].update(sp, st, m)
                self._scc[k][2].update(sp, st, m)
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
        for name, pooled, pertile in self._scc.values():
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
        out |= {f"{name}_pertile": acc.values for name, _, acc in self._scc.values()}
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
