"""Pearson and Spearman: the one pooled Pearson (from sufficient statistics), per-tile values, ranks."""

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ._tensors import F64, _tissue_values
from .sums import pearson_from_sums  # noqa: F401 - part of this module's API

#: Integer-valued keys with a wider range than this are ranked by sorting, not by counting.
MAX_COUNTED_RANGE = 1 << 20


def _valid_range(x, valid):
    """Min and max of numpy ``x`` over the valid entries (all entries when ``valid`` is None)."""
    v = x if valid is None else x[valid]
    return v.min(), v.max()


@functools.cache
def _half_order(dtype):
    """Order key of each of the 65,536 bit patterns of a 16-bit float (``-0`` ties with ``+0``), numpy."""
    bits = torch.arange(65536, dtype=torch.int32)
    values = bits.to(torch.int16).view(dtype).to(F64)
    # sign-magnitude to order: negatives reversed below the positives; NaN patterns sort last
    key = torch.where(bits < 32768, bits + 32768, 65535 - bits)
    return key.masked_fill(values == 0, 32768).masked_fill(values.isnan(), 65535).numpy().astype(np.intp)


def _numpy(x):
    """A tensor as numpy (CPU; 16-bit floats as their bit patterns, numpy lacks bfloat16); numpy passes."""
    if not isinstance(x, torch.Tensor):
        return np.asarray(x)
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.contiguous().view(torch.int16)
    return x.detach().cpu().numpy()


def rank_keys(x, valid=None):
    """Order-preserving integer keys ``(keys, n_keys)`` of tensor ``x`` when cheap, else ``None``.

    float16 and bfloat16 key by their bit patterns (at most 65,536 values); counts (integer
    dtypes, or integer-valued floats) with a range up to :data:`MAX_COUNTED_RANGE` as ``x - min``.
    Equal values get equal keys, so counting ties exactly where a sort does.
    ``valid`` (bool, same shape): only the valid entries are keyed; the others get some key in range.
    Keys are numpy ``intp`` arrays (numpy's bincount and gathers are a few times faster than torch's).
    """
    v = None if valid is None else _numpy(valid)
    if v is not None and not v.any():
        return None
    if x.dtype in (torch.float16, torch.bfloat16):
        return _half_order(x.dtype)[_numpy(x).view(np.uint16)], 65536
    a = _numpy(x)
    if a.dtype == bool:
        return a.astype(np.intp), 2
    lo, hi = _valid_range(a, v)
    if a.dtype.kind == "f":
        if not np.isfinite(hi - lo) or float(hi - lo) > MAX_COUNTED_RANGE:
            return None
        whole = a == np.floor(a)
        if not (whole if v is None else whole | ~v).all():
            return None
    elif int(hi) - int(lo) > MAX_COUNTED_RANGE:
        return None
    n_keys = int(hi - lo) + 1
    keys = (a - lo).astype(np.intp)
    return (keys if v is None else np.clip(keys, 0, n_keys - 1, out=keys)), n_keys


def counted_ranks(keys, n_keys, valid=None):
    """Average ranks along the last axis of integer ``keys [..., N]`` in ``[0, n_keys)``, by counting.

    A value's average rank is the number of smaller values plus ``(ties + 1) / 2``: one histogram
    per row (a bincount over row-offset keys) and its cumulative sum replace a sort. Keys present
    in no row are dropped first, so the histograms stay small for float16's 65,536 keys.
    ``valid`` (bool, same shape): rank among the valid entries only; invalid entries get rank 0.
    numpy in and out; float64 ranks.
    """
    lead, n = keys.shape[:-1], keys.shape[-1]
    k = keys.reshape(-1)
    rows = k.size // max(n, 1)
    v = None if valid is None else _numpy(valid).reshape(-1)
    if v is not None:  # invalid entries go to an extra key after every valid one
        k = np.where(v, k, n_keys)
        n_keys += 1
    if rows * n_keys > 2 * k.size + n_keys:
        present = np.bincount(k, minlength=n_keys) > 0
        k = (np.cumsum(present) - 1)[k]
        n_keys = int(present.sum())
    row = np.arange(rows)[:, None]
    flat = (k.reshape(rows, n) + row * n_keys).reshape(-1)
    hist = np.bincount(flat, minlength=rows * n_keys).astype(np.float64)
    # every row holds n entries, so the running count over the flat table starts row r at r * n
    # (one flat cumsum instead of one per row); float64 is exact here
    avg = np.cumsum(hist)
    avg -= 0.5 * hist
    avg = avg.reshape(rows, n_keys)
    avg -= row * n - 0.5
    out = avg.reshape(-1)[flat]
    if v is not None:
        out[~v] = 0.0
    return out.reshape(*lead, n)


#: Float rows at least this long are ordered by a radix sort (:func:`_argsort`), shorter by argsort.
RADIX_MIN = 1024


def _argsort(x):
    """An ordering permutation along the last axis of numpy ``x`` (tie order left open).

    float32 and float64 rows of at least :data:`RADIX_MIN` values go by an LSD radix sort of their
    order-preserving unsigned bit patterns, 16 bits a pass (numpy's stable sort of uint16 is a
    counting sort): linear in n, about twice argsort's speed on a pooled gene's tens of thousands of values.
    """
    if x.dtype not in (np.float32, np.float64) or x.shape[-1] < RADIX_MIN:
        return np.argsort(x, axis=-1)
    u = np.ascontiguousarray(x).view(np.uint32 if x.dtype == np.float32 else np.uint64)
    top = u.dtype.type(1) << u.dtype.type(8 * u.itemsize - 1)
    key = np.where(u & top, ~u, u | top)  # sign-magnitude to order: negatives reversed below positives
    order = None
    for shift in range(0, 8 * u.itemsize, 16):
        digit = (key >> u.dtype.type(shift)).astype(np.uint16)
        if order is not None:
            digit = np.take_along_axis(digit, order, -1)
        step = np.argsort(digit, axis=-1, kind="stable")
        order = step if order is None else np.take_along_axis(order, step, -1)
    return order


def _sorted_ranks(x):
    """Average ranks of numpy ``x`` along the last axis by a sort (numpy's: about twice torch's speed)."""
    n = x.shape[-1]
    out = np.zeros(x.shape, dtype=np.float64)
    if x.size == 0:
        return out
    order = _argsort(x)
    s = np.take_along_axis(x, order, -1).reshape(-1, n)
    new = np.ones(s.shape, dtype=bool)  # a tie group starts here (and at every row's start)
    np.not_equal(s[:, 1:], s[:, :-1], out=new[:, 1:])
    if new.all():  # no ties (common for pooled float predictions): the ranks are the positions
        ranks = np.broadcast_to(np.arange(1.0, n + 1), (x.size // n, n)).reshape(-1)
    else:  # each tie group gets the mean of its 1-based positions, exact in float64 (half-integers)
        new = new.reshape(-1)
        starts = np.flatnonzero(new)
        ends = np.append(starts[1:], new.size)
        avg = (starts + ends + 1) / 2 - (starts // n) * n
        ranks = np.repeat(avg, ends - starts)
    # scatter by flat positions: about twice put_along_axis's speed
    flat = (order.reshape(-1, n) + np.arange(0, x.size, n)[:, None]).reshape(-1)
    out.reshape(-1)[flat] = ranks
    return out


def average_ranks(x, valid=None):
    """1-based ranks along the last axis; ties get the mean of their ranks (``rankdata``'s 'average').

    Vectorised over all leading axes. Counts and float16 values are ranked by counting
    (:func:`counted_ranks`, linear time); other floats by a sort, tie groups where the sorted
    values change. ``valid`` (bool, same shape): rank among the
    valid entries only (invalid entries get rank 0). float64 ranks, a tensor on ``x``'s device.
    """
    keyed = rank_keys(x, valid)
    if keyed is not None:
        r = counted_ranks(*keyed, valid)
    elif valid is None:
        r = _sorted_ranks(_numpy(x))
    else:  # invalid entries rank after every valid one (+inf), then are zeroed
        v = _numpy(valid)
        r = _sorted_ranks(np.where(v, _numpy(x).astype(np.promote_types(_numpy(x).dtype, np.float32)), np.inf))
        r[~v] = 0.0
    return torch.from_numpy(r).to(x.device)


def _pearson_from_centered(xc, yc, dims):
    return (xc * yc).sum(dims) / torch.sqrt((xc * xc).sum(dims) * (yc * yc).sum(dims))


@dataclass
class TileSide:
    """One side (predictions or counts) of a per-tile correlation, shareable by several predictions.

    ``parts``: per tile ``[G, n_t]`` float64, the tile's tissue values (or their ranks) centred per
    gene; ``ss``: ``[T, G]`` their sums of squares; ``const``: ``[T, G]`` bool, the side is constant
    on the tile's tissue or has < 2 bins; ``lo, hi``: ``[T, G]`` ranges of the values (NaN: no tissue;
    None for ranks).
    """

    parts: list
    ss: np.ndarray
    const: np.ndarray
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None


def _segments(values, counts):
    """Per-tile slices ``[G, n_t]`` of tissue values ``[G, n]`` (tiles in order, ``counts [T]`` bins each)."""
    ends = np.cumsum(counts)
    return [values[:, e - n : e] for n, e in zip(np.asarray(counts).tolist(), ends.tolist())]


def centred_tiles(values, counts):
    """:class:`TileSide` of a per-tile Pearson from tissue values ``[G, n]`` (:func:`._tensors._tissue_values`).

    Constant means max == min exactly (a variance tolerance would mis-handle tiny signals).
    """
    parts, lo, hi = [], [], []
    for seg in _segments(_numpy(values), counts):
        x = seg.astype(np.float64)
        empty = np.full(len(x), np.nan)
        lo.append(x.min(1) if x.shape[1] else empty)
        hi.append(x.max(1) if x.shape[1] else empty)
        parts.append(x - x.mean(1, keepdims=True) if x.shape[1] else x)
    lo, hi = np.stack(lo), np.stack(hi)
    const = ~(lo < hi) | (np.asarray(counts) < 2)[:, None]
    return TileSide(parts, np.stack([(x * x).sum(1) for x in parts]), const, lo, hi)


def centred_tile_ranks(values, counts):
    """:class:`TileSide` of a per-tile Spearman: ranks among each tile's tissue values ``[G, n]``, centred.

    The ranks' mean is exactly (n + 1) / 2 and the ranks are half-integers, so centring is exact
    and a constant side sums to exactly 0 squared.
    """
    parts = [average_ranks(seg).numpy() - (seg.shape[1] + 1) / 2 for seg in _segments(values, counts)]
    ss = np.stack([(r * r).sum(1) for r in parts])
    return TileSide(parts, ss, (ss == 0) | (np.asarray(counts) < 2)[:, None])


def tile_correlation(a, b):
    """Per-tile correlation ``[T, G]`` (float64 numpy) of two :class:`TileSide` s, NaN where undefined."""
    num = np.stack([(x * y).sum(1) for x, y in zip(a.parts, b.parts)])
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.clip(num / np.sqrt(a.ss * b.ss), -1, 1)
    return np.where(a.const | b.const, np.nan, r)


def _tile_values(pred, target, mask):
    counts = mask.sum(dim=(1, 2)).cpu().numpy()
    return _tissue_values(pred, mask), _tissue_values(target, mask), counts


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
    x, y, counts = _tile_values(pred, target, mask)
    return torch.from_numpy(tile_correlation(centred_tiles(x, counts), centred_tiles(y, counts)))


def spearman_per_tile(pred, target, mask):
    """Spearman per (tile, gene) over the tile's tissue bins (average ranks for ties); ``[T, G]``.

    NaN where a tile has < 2 tissue bins or either side is constant there.
    """
    x, y, counts = _tile_values(pred, target, mask)
    return torch.from_numpy(tile_correlation(centred_tile_ranks(x, counts), centred_tile_ranks(y, counts)))
