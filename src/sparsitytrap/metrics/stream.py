"""Streamed accumulators: every per-gene metric of one evaluation, fed batch by batch."""

import functools
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..bins import pool_mask, sum_pool
from ..errors import InputError
from ._tensors import F64, _as_tensor, _tissue_values
from .correlation import (
    TileSide,
    _pearson_from_centered,
    average_ranks,
    centred_tile_ranks,
    centred_tiles,
    pearson_from_sums,
    pearson_per_tile,
    spearman_per_tile,
    tile_correlation,
)
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
        # gathered, then converted: the same values, half the bytes moved (training validates with this)
        self.add(_tissue_values(pred, mask).to(F64), _tissue_values(target, mask).to(F64))

    def add(self, x, y):
        """Add tissue values ``x, y [G, n]`` (float64) of one batch."""
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
        self.add(self.metric(pred, target, mask))

    def add(self, values):
        """Keep the ``[T, G]`` values (tensor or numpy) of one batch, scored elsewhere."""
        self._values.append(values.cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values))

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
    2 GB; 1.5 GB with float16 predictions; an accumulator given ``counts_of`` keeps no counts of
    its own). Fine for evaluation-sized gene panels, not for a whole transcriptome. Ties (zero
    counts) get average ranks (:func:`average_ranks`: counted for counts and float16).
    """

    def __init__(self, n_genes, counts_of=None):
        self.n_genes = n_genes
        self._x = []
        # accumulators fed the same targets (a model and its label-shuffle null) keep the counts
        # once, in the first one, and rank them once per gene for all of them
        self._group = [] if counts_of is None else counts_of._group
        self._group.append(self)
        self._y = self._group[0]._y if counts_of is not None else []
        self._rho = None

    def update(self, pred, target, mask):
        """Keep the tissue values of one batch."""
        self.add(_tissue_values(pred, mask), _tissue_values(target, mask))

    def add(self, x, y):
        """Keep tissue values ``x, y [G, n]`` of one batch (``y`` only by the first of a group)."""
        self._x.append(_stored(x))
        if self is self._group[0]:
            self._y.append(_stored(y))
        for acc in self._group:
            acc._rho = None

    def compute(self):
        """Per-gene Spearman rho, ``[G]`` numpy float64 (NaN: < 2 bins or a constant side)."""
        if self._rho is None:
            rhos = _pooled_spearman(self._y, [acc._x for acc in self._group], self.n_genes)
            for acc, rho in zip(self._group, rhos):
                acc._rho = rho
        return self._rho.copy()


def _pooled_spearman(ys, xss, n_genes):
    """Per-gene Spearman of each list of ``x`` chunks in ``xss`` against the ``y`` chunks ``ys``."""
    rhos = [np.full(n_genes, np.nan) for _ in xss]
    if not ys or sum(c.shape[1] for c in ys) < 2:
        return rhos
    for g in range(n_genes):  # one gene at a time bounds the memory of the ranks
        y = torch.cat([c[g] for c in ys])
        if y.min() == y.max():
            continue
        ry = average_ranks(y)
        ry = ry - ry.mean()
        for rho, xs in zip(rhos, xss):
            x = torch.cat([c[g] for c in xs])
            if x.min() != x.max():
                rx = average_ranks(x)
                rho[g] = float(_pearson_from_centered(rx - rx.mean(), ry, 0).clamp(-1, 1))
    return rhos


class CountAccumulator:
    """Per-gene ratio, mean Poisson deviance and sparsity over the tissue bins of a stream."""

    def __init__(self, n_genes):
        self.n_genes = n_genes
        self._sums = np.zeros((4, n_genes))  # sum pred, sum target, deviance, zeros
        self._n = 0

    def update(self, pred, target, mask):
        """Add one batch."""
        self.add(_tissue_values(pred, mask).to(F64), _tissue_values(target, mask).to(F64))

    def add(self, mu, y):
        """Add tissue values ``mu, y [G, n]`` (float64 tensors) of one batch."""
        mu, y = mu.cpu().numpy(), y.cpu().numpy()
        # 2 (y log(y / mu) - (y - mu)) summed: y log(y / mu) only where y > 0 (most counts are 0)
        nz = y > 0
        yn, mun = y[nz], np.maximum(mu[nz], DEVIANCE_EPS)
        log_ratio = np.bincount(np.nonzero(nz)[0], weights=yn * (np.log(yn) - np.log(mun)), minlength=self.n_genes)
        s_mu, s_y = mu.sum(1), y.sum(1)
        self._sums += np.stack([s_mu, s_y, 2 * (log_ratio - s_y + s_mu), y.shape[1] - nz.sum(1)])
        self._n += mu.shape[1]

    def compute(self):
        """Dict of ``[G]`` arrays: ratio, deviance, sparsity, mean_pred, mean_target."""
        s = self._sums
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


@dataclass
class _Side:
    """One side (predictions or counts) of a batch at one pooling: what every metric takes from it."""

    x: torch.Tensor  # float64 [T, G, h, w]; masked and sum-pooled when pooled
    mask: torch.Tensor  # [T, h, w] bool, max-pooled when pooled
    counts: np.ndarray  # [T] tissue bins per tile
    values: torch.Tensor  # tissue values [G, n], float64, tiles in order
    stored: torch.Tensor  # tissue values for ranks (float16 predictions stay float16: ranked by their bits)
    centred: TileSide  # centred_tiles
    ranks: TileSide | None  # centred_tile_ranks; None without Spearman
    pooled: bool  # k > 1


def _pooled(levels, x64, mask, k):
    """Masked sum-pooled ``x64`` and pooled mask at ``k``, kept in ``levels`` ({k: (values, mask)}).

    Pooled from the coarsest kept level dividing ``k`` (8 from 4 from 2): a quarter of the work per
    step, and the same numbers (window sums of float16 rates and counts are exact in float64).
    """
    if not levels:
        levels[1] = (x64 * mask[:, None].to(F64), mask)
    if k not in levels:
        k0 = max(j for j in levels if k % j == 0)
        p0, m0 = levels[k0]
        levels[k] = (sum_pool(p0, k // k0), pool_mask(m0, k // k0))
    return levels[k]


def _side(x, x64, mask, k, spearman, levels):
    """The :class:`_Side` of ``x`` (``x64``: it as float64) at pooling ``k`` (``levels``: :func:`_pooled`)."""
    if k == 1:  # no masking needed: every metric looks at tissue bins only
        p, m, raw = x64, mask, x
    else:
        p, m = _pooled(levels, x64, mask, k)
        raw = p
    counts = m.sum((1, 2)).cpu().numpy()
    stored = _tissue_values(raw, m)
    values = stored.to(F64)  # one gather: float16, float32 and counts convert to float64 exactly
    ranks = centred_tile_ranks(stored, counts) if spearman else None
    return _Side(p, m, counts, values, stored, centred_tiles(values, counts), ranks, k > 1)


def _shared_side(shared, target, mask, k, spearman):
    """The target's :class:`_Side`, computed once per batch and kept in ``shared``."""
    key = ("target", k, spearman)
    if key not in shared:
        if "target64" not in shared:
            shared["target64"], shared["target_levels"] = target.to(F64), {}
        shared[key] = _side(target, shared["target64"], mask, k, spearman, shared["target_levels"])
    return shared[key]


def tile_sums(a, b):
    """Per (tile, gene) pooled-Pearson sums and tissue ranges of two :class:`_Side` s.

    Summing the sums over any multiset of tiles (and taking the min and max of the ranges) gives
    that multiset's pooled Pearson by :func:`pearson_from_sums`, so a bootstrap over tiles needs
    no second pass over the data.

    Returns
    -------
    ``[T, G, 10]`` float64 numpy array: n and the sums of x, y, xx, yy, xy, then min x, max x,
    min y, max y (NaN range: no tissue).
    """
    # pooled sides are masked already (a pooled bin off tissue sums zeros only)
    x, y = (a.x, b.x) if a.pooled else (a.x * a.mask[:, None], b.x * b.mask[:, None])
    n = torch.from_numpy(a.counts.astype(np.float64))[:, None].expand(x.shape[:2])
    parts = [n, x.sum((2, 3)), y.sum((2, 3)), (x * x).sum((2, 3)), (y * y).sum((2, 3)), (x * y).sum((2, 3))]
    parts += [torch.from_numpy(r) for side in (a, b) for r in (side.centred.lo, side.centred.hi)]
    return torch.stack(parts, dim=-1).cpu().numpy()


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
    keep_sums
        Keep the per (tile, gene) pooled-Pearson sums of every scale (:meth:`tile_sums`).
    counts_of
        A :class:`GeneMetrics` (same scales) fed the same targets batch by batch, before this one
        (a model, for its label-shuffle null): the pooled Spearman keeps and ranks the counts once.

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
        keep_sums=False,
        counts_of=None,
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
                SpearmanAccumulator(n_genes, counts_of=counts_of and counts_of._scc[k][1]),
                TileMetricAccumulator(n_genes, spearman_per_tile),
            )
        self._ssim = None
        if ssim:
            fn = functools.partial(ssim_per_tile, ssim_min_tissue=ssim_min_tissue)
            self._ssim = (f"ssim_{native}", TileMetricAccumulator(n_genes, fn))
        self._counts = CountAccumulator(n_genes)
        self._sums = {k: [] for k in self.scales} if keep_sums else None

    def update(self, pred, target, mask, shared=None):
        """Add one batch: ``pred, target [T, G, H, W]``, ``mask [T, H, W]`` (tensors or arrays).

        ``shared``: a dict the caller keeps for one batch and passes to every :class:`GeneMetrics`
        scoring a prediction against the same target and mask (a model and its label-shuffle null),
        so that the count side (pooling, tissue values, ranks) is computed once.
        """
        pred, target, mask = check_batch(pred, target, mask, self.n_genes, max(self.scales), self.source)
        shared = {} if shared is None else shared
        p64 = pred.to(F64)  # converted once for every scale
        spearman = bool(self._scc)
        native, levels = None, {}
        for k in self.scales:
            a = _side(pred, p64, mask, k, spearman, levels)
            native = a if k == 1 else native
            b = _shared_side(shared, target, mask, k, spearman)
            _, pooled, pertile = self._pcc[k]
            pooled.add(a.values, b.values)
            pertile.add(tile_correlation(a.centred, b.centred))
            if k in self._scc:
                self._scc[k][1].add(a.stored, b.stored)
                self._scc[k][2].add(tile_correlation(a.ranks, b.ranks))
            if self._sums is not None:
                self._sums[k].append(tile_sums(a, b))
        if self._ssim:
            self._ssim[1].update(pred, target, mask)
        native = native or _side(pred, p64, mask, 1, False, levels)
        self._counts.add(native.values, _shared_side(shared, target, mask, 1, spearman).values)

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

    def tile_sums(self):
        """Per (tile, gene) sums of every scale, ``{k: [T, G, 10]}`` (:func:`tile_sums`; needs ``keep_sums``)."""
        return {k: np.concatenate(v) for k, v in self._sums.items()}

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
