"""Streamed accumulators: every per-gene metric of one evaluation, fed batch by batch."""

import functools
import sys
import warnings

import numpy as np
import pandas as pd

from ..errors import InputError
from . import compiled as K
from ._tensors import is_tensor, kernel_array
from .correlation import (
    _batch_pair,
    pearson_from_sums,
    pearson_per_tile,
    score,
    spearman_per_tile,
    tile_pearson,
    tile_side,
    tile_spearman,
)
from .ssim import SSIM_MIN_TISSUE, ssim_per_tile


def _merge(n, mx, my, mxx, myy, mxy):
    """Merge groups (rows ``[R, G]``: bins, means, centred sums of squares and cross products) into one.

    The parallel form of Welford's update (Chan et al. 1979): each group's centred sums plus its
    bins times the squared distance of its means from the pooled mean. No large sums cancel, so
    a pooled Pearson of values far from 0 stays exact to float64 (``[G]`` arrays out).
    """
    total = n.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        wx, wy = n * np.nan_to_num(mx), n * np.nan_to_num(my)
        px, py = wx.sum(0) / total, wy.sum(0) / total
        dx, dy = np.where(n > 0, mx - px, 0.0), np.where(n > 0, my - py, 0.0)
    keep = n > 0
    sxx = np.where(keep, mxx + n * dx * dx, 0.0).sum(0)
    syy = np.where(keep, myy + n * dy * dy, 0.0).sum(0)
    sxy = np.where(keep, mxy + n * dx * dy, 0.0).sum(0)
    return total, px, py, sxx, syy, sxy


class PearsonAccumulator:
    """Per-gene Pearson over all tissue bins of a stream of batches (pooled over tiles).

    Keeps per gene the bins, means, centred sums of squares and cross products (float64), merged
    batch by batch from per-tile moments (:func:`_merge`), so that large offsets never cancel.
    A side that is exactly constant (running min == max) gives NaN.

    Parameters
    ----------
    n_genes
        Number of genes (channel axis of the batches).
    """

    def __init__(self, n_genes):
        self.n_genes = n_genes
        self._state = None  # [6, G]: n, mean x, mean y, cxx, cyy, cxy
        self._range = None  # [4, G]: min x, max x, min y, max y

    def update(self, pred, target, mask):
        """Add one batch ``pred, target [T, G, H, W]``, ``mask [T, H, W]`` (tensors or arrays, any device)."""
        self.add_pair(_batch_pair(pred, target, mask))

    def add(self, x, y):
        """Add tissue values ``x, y [G, n]`` of one batch (as one group)."""
        self.add_pair(_batch_pair(*_as_tile(x, y)))

    def add_pair(self, pair):
        """Add the tiles of a :class:`.correlation.Pair`."""
        a, b, sums = pair, pair.target, pair.sums
        n = np.broadcast_to(b.counts[:, None].astype(np.float64), sums.shape[:2])
        rows = [n, a.moments[..., 0], b.moments[..., 0], sums[..., 0], sums[..., 1], sums[..., 2]]
        if self._state is not None:
            rows = [np.vstack([s[None], r]) for s, r in zip(self._state, rows)]
        merged = np.stack(_merge(*rows))
        if merged[0, 0] == 0:
            return
        self._state = merged
        lo_x, hi_x, lo_y, hi_y = (m[..., i] for m in (a.moments, b.moments) for i in (1, 2))
        r = self._range if self._range is not None else np.full((4, self.n_genes), np.nan)
        with warnings.catch_warnings():  # all-NaN columns: tiles without tissue
            warnings.simplefilter("ignore", RuntimeWarning)
            self._range = np.stack([
                np.nanmin(np.vstack([r[0], lo_x]), 0),
                np.nanmax(np.vstack([r[1], hi_x]), 0),
                np.nanmin(np.vstack([r[2], lo_y]), 0),
                np.nanmax(np.vstack([r[3], hi_y]), 0),
            ])  # fmt: skip

    def compute(self):
        """Per-gene Pearson r, ``[G]`` numpy float64 (NaN: < 2 bins or a constant side)."""
        if self._state is None:
            return np.full(self.n_genes, np.nan)
        n, _, _, cxx, cyy, cxy = self._state
        zero = np.zeros_like(n)  # sums of deviations from the pooled means
        lo_x, hi_x, lo_y, hi_y = self._range
        return pearson_from_sums(np.stack([n, zero, zero, cxx, cyy, cxy], -1), (lo_x == hi_x) | (lo_y == hi_y))

    @property
    def n_bins(self):
        """Number of tissue bins seen."""
        return 0 if self._state is None else int(self._state[0, 0])


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
        self._values.append(kernel_array(values))

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


def _as_tile(x, y):
    """Tissue values ``x, y [G, n]`` as one tile ``[1, G, 1, n]`` of tissue bins only, with its mask."""
    x, y = kernel_array(x), kernel_array(y)
    return x.reshape(1, *x.shape[:1], 1, -1), y.reshape(1, *y.shape[:1], 1, -1), np.ones((1, 1, x.shape[1]), bool)


def _float16_bits(x):
    """The bit patterns (uint16 numpy) of float16 ``x`` (tensor or array), else None."""
    if is_tensor(x):
        torch = sys.modules["torch"]
        return x.detach().cpu().view(torch.int16).numpy().view(np.uint16) if x.dtype == torch.float16 else None
    x = np.asarray(x)
    return np.ascontiguousarray(x).view(np.uint16) if x.dtype == np.float16 else None


def _stored(pair, mask, bits):
    """The tissue predictions ``[G, N]`` a :class:`.correlation.Pair` keeps for the pooled Spearman:
    float16 ones as float16 (half the memory, exact), gathered from their patterns ``bits``
    (:func:`_float16_bits`; None for any other dtype), the rest as the pair's float32 ``stored``."""
    return pair.stored if bits is None else K.gather_bits(bits, mask)[0].view(np.float16)


class SpearmanAccumulator:
    """Exact per-gene Spearman over all tissue bins of a stream (pooled over tiles).

    Ranks need every bin of the patient at once, so the tissue values of every gene are kept
    on the CPU, float16 predictions as float16, everything else as float32: at most
    2 x tissue bins x genes x 4 bytes (one patient of about 5 million tissue bins and 50 genes:
    2 GB; 1.5 GB with float16 predictions; an accumulator given ``counts_of`` keeps no counts of
    its own). Fine for evaluation-sized gene panels, not for a whole transcriptome. Ties (zero
    counts) get average ranks (:func:`.kernels.rank_1d`).
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
        bits = _float16_bits(pred)
        pair = _batch_pair(pred, target, mask, stored=bits is None)
        self.add(_stored(pair, kernel_array(mask).astype(bool), bits), pair.target.values.astype(np.float32))

    def add(self, x, y):
        """Keep tissue values ``x, y [G, n]`` of one batch (``y`` only by the first of a group)."""
        self._x.append(np.asarray(x))
        if self is self._group[0]:
            self._y.append(np.asarray(y))
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
    n = sum(c.shape[1] for c in ys)
    if n < 2:
        return rhos
    # one gene at a time bounds the memory of the ranks; buffers reused from gene to gene
    values, ry, rx, work = np.empty(n, np.float32), np.empty(n), np.empty(n), K.scratch(n)
    for g in range(n_genes):
        ss_y = K.centred_ranks_1d(np.concatenate([c[g] for c in ys], out=values), ry, work)
        if ss_y == 0:  # constant counts
            continue
        for rho, xs in zip(rhos, xss):
            ss_x = K.centred_ranks_1d(np.concatenate([c[g] for c in xs], out=values), rx, work)
            if ss_x > 0:
                rho[g] = np.clip(np.dot(rx, ry) / np.sqrt(ss_x * ss_y), -1, 1)
    return rhos


class CountAccumulator:
    """Per-gene ratio, mean Poisson deviance and sparsity over the tissue bins of a stream."""

    def __init__(self, n_genes):
        self.n_genes = n_genes
        self._sums = np.zeros((4, n_genes))  # sum pred, sum target, deviance, zeros
        self._n = 0

    def update(self, pred, target, mask):
        """Add one batch."""
        self.add_pair(_batch_pair(pred, target, mask, counts=True))

    def add(self, mu, y):
        """Add tissue values ``mu, y [G, n]`` of one batch."""
        self.add_pair(_batch_pair(*_as_tile(mu, y), counts=True))

    def add_pair(self, pair):
        """Add a :class:`.correlation.Pair` scored with ``counts`` at the native bins."""
        # 2 (y log(y / mu) - (y - mu)) summed: y log(y / mu) only where y > 0 (most counts are 0)
        s_mu, s_y, log_ratio, zeros = pair.count_sums
        self._sums += np.stack([s_mu, s_y, 2 * (log_ratio - s_y + s_mu), zeros])
        self._n += int(pair.target.offsets[-1])

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
    """Validate one batch and return it as numpy arrays for the kernels (:func:`._tensors.kernel_array`, mask bool).

    Raises
    ------
    InputError
        Naming ``source`` and the fault: shapes, gene count, pooling divisibility,
        non-finite predictions at tissue bins, negative counts.
    """
    pred, target, mask = kernel_array(pred), kernel_array(target), kernel_array(mask)
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
    mask = mask.astype(bool, copy=False)
    bad_pred, bad_count = K.tissue_faults(pred, target, mask)
    if bad_pred:
        raise InputError(source, "predictions are NaN or infinite at tissue bins")
    if bad_count:
        raise InputError(source, "target counts are negative at tissue bins")
    return pred, target, mask


def _pooled(levels, k):
    """Tile values and mask at pooling ``k`` (a power of two), kept in ``levels`` ({k: (values, mask)}, 1: the batch).

    Each level halves the one below (:func:`.kernels.halve`): a quarter of the work per step, and
    the same numbers as pooling at once (window sums of float16 rates and counts are exact in float64).
    """
    if k not in levels:
        levels[k] = K.halve(*_pooled(levels, k // 2))
    return levels[k]


def _target_side(shared, target, mask, k, spearman):
    """The counts' :class:`TileSide` at pooling ``k``, computed once per batch and kept in ``shared``."""
    key = ("target", k, spearman)
    if key not in shared:
        levels = shared.setdefault("target_levels", {1: (target, mask)})
        shared[key] = tile_side(*_pooled(levels, k), ranks=spearman)
    return shared[key]


def _target_stored(shared, k, side):
    """The counts' tissue values at pooling ``k`` as float32, for the pooled Spearman (once per batch)."""
    if ("stored", k) not in shared:
        shared["stored", k] = side.values.astype(np.float32)
    return shared["stored", k]


def tile_sums(pair):
    """Per (tile, gene) pooled-Pearson sums and tissue ranges of a :class:`.correlation.Pair` scored with ``raw``.

    Summing the sums over any multiset of tiles (and taking the min and max of the ranges) gives
    that multiset's pooled Pearson by :func:`pearson_from_sums`, so a bootstrap over tiles needs
    no second pass over the data.

    Returns
    -------
    ``[T, G, 10]`` float64 numpy array: n and the sums of x, y, xx, yy, xy, then min x, max x,
    min y, max y (NaN range: no tissue).
    """
    n = np.broadcast_to(pair.target.counts[:, None].astype(np.float64), pair.moments.shape[:2])
    ranges = [m[..., i] for m in (pair.moments, pair.target.moments) for i in (1, 2)]
    return np.concatenate([n[..., None], pair.raw, np.stack(ranges, -1)], -1)


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
        if any(k < 1 or k & (k - 1) for k in self.scales):
            raise InputError("scales", f"pooling factors must be powers of two, got {list(self.scales)}")
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
        bits = _float16_bits(pred)
        pred, target, mask = check_batch(pred, target, mask, self.n_genes, max(self.scales), self.source)
        shared = {} if shared is None else shared
        levels = {1: (pred, mask)}
        spearman = bool(self._scc)
        for k in sorted(set(self.scales) | {1}):  # the native bins score the counts too
            side = _target_side(shared, target, mask, k, spearman and k in self._scc)
            half = bits if k == 1 else None  # pooled values are float64 sums
            pair = score(*_pooled(levels, k), side, ranks=k in self._scc, raw=self._sums is not None,
                         counts=k == 1, stored=k in self._scc and half is None)  # fmt: skip
            if k == 1:
                self._counts.add_pair(pair)
            if k not in self._pcc:
                continue
            _, pooled, pertile = self._pcc[k]
            pooled.add_pair(pair)
            pertile.add(tile_pearson(pair))
            if k in self._scc:
                self._scc[k][1].add(_stored(pair, mask, half), _target_stored(shared, k, side))
                self._scc[k][2].add(tile_spearman(pair))
            if self._sums is not None:
                self._sums[k].append(tile_sums(pair))
        if self._ssim:
            self._ssim[1].update(pred, target, mask)

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
