"""Pearson and Spearman: the one pooled Pearson (from sufficient statistics), per-tile values, ranks."""

import functools

import torch

from ._tensors import F64
from .sums import pearson_from_sums  # noqa: F401 - part of this module's API

#: Integer-valued keys with a wider range than this are ranked by sorting, not by counting.
MAX_COUNTED_RANGE = 1 << 20


def _valid_range(x, valid):
    """Min and max of ``x`` over the valid entries (all entries when ``valid`` is None)."""
    if valid is None:
        return x.min(), x.max()
    if x.is_floating_point():
        return torch.where(valid, x, float("inf")).min(), torch.where(valid, x, float("-inf")).max()
    return x.masked_fill(~valid, x.max()).min(), x.masked_fill(~valid, x.min()).max()


@functools.cache
def _half_order(dtype):
    """Order key of each of the 65,536 bit patterns of a 16-bit float (``-0`` ties with ``+0``)."""
    bits = torch.arange(65536, dtype=torch.int32)
    values = bits.to(torch.int16).view(dtype).to(F64)
    # sign-magnitude to order: negatives reversed below the positives; NaN patterns sort last
    key = torch.where(bits < 32768, bits + 32768, 65535 - bits)
    return key.masked_fill(values == 0, 32768).masked_fill(values.isnan(), 65535).to(torch.int64)


def rank_keys(x, valid=None):
    """Order-preserving integer keys ``(keys, n_keys)`` of ``x`` when cheap, else ``None``.

    float16 and bfloat16 key by their bit patterns (at most 65,536 values); counts (integer
    dtypes, or integer-valued floats) with a range up to :data:`MAX_COUNTED_RANGE` as ``x - min``.
    Equal values get equal keys, so counting ties exactly where a sort does.
    ``valid`` (bool, same shape): only the valid entries are keyed; the others get some key in range.
    """
    if valid is not None and not bool(valid.any()):
        return None
    if x.dtype in (torch.float16, torch.bfloat16):
        bits = x.contiguous().view(torch.uint16).to(torch.int64)
        return _half_order(x.dtype).index_select(0, bits.reshape(-1)).reshape(x.shape), 65536
    if x.dtype == torch.bool:
        return x.to(torch.int64), 2
    lo, hi = _valid_range(x, valid)
    if x.is_floating_point():
        if not bool(torch.isfinite(hi - lo)) or float(hi - lo) > MAX_COUNTED_RANGE:
            return None
        whole = x == x.floor()
        if not bool((whole if valid is None else whole | ~valid).all()):
            return None
    elif int(hi) - int(lo) > MAX_COUNTED_RANGE:
        return None
    n_keys = int(hi - lo) + 1
    keys = (x - lo).to(torch.int64)
    return (keys if valid is None else keys.clamp_(0, n_keys - 1)), n_keys


def counted_ranks(keys, n_keys, valid=None):
    """Average ranks along the last axis of integer ``keys [..., N]`` in ``[0, n_keys)``, by counting.

    A value's average rank is the number of smaller values plus ``(ties + 1) / 2``: one histogram
    per row (a bincount over row-offset keys) and its cumulative sum replace a sort. Keys present
    in no row are dropped first, so the histograms stay small for float16's 65,536 keys.
    ``valid`` (bool, same shape): rank among the valid entries only; invalid entries get rank 0.
    """
    lead, n = keys.shape[:-1], keys.shape[-1]
    k = keys.reshape(-1)
    rows = k.numel() // max(n, 1)
    if valid is not None:  # invalid entries go to an extra key after every valid one
        k = k.masked_fill(~valid.reshape(-1), n_keys)
        n_keys += 1
    if rows * n_keys > 2 * k.numel() + n_keys:
        present = torch.bincount(k, minlength=n_keys) > 0
        k = (present.cumsum(0) - 1).index_select(0, k)
        n_keys = int(present.sum())
    row = torch.arange(rows, device=k.device)[:, None]
    flat = (k.view(rows, n) + row * n_keys).view(-1)
    hist = torch.bincount(flat, minlength=rows * n_keys).to(F64)
    # every row holds n entries, so the running count over the flat table starts row r at r * n
    # (one flat cumsum is several times faster than a cumsum along rows); float64 is exact here
    avg = hist.cumsum(0).sub_(hist, alpha=0.5).view(rows, n_keys).sub_(row * n - 0.5)
    out = avg.view(-1).index_select(0, flat)
    if valid is not None:
        out = out.masked_fill_(~valid.reshape(-1), 0.0)
    return out.view(*lead, n)


def _sorted_ranks(x):
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


def average_ranks(x, valid=None):
    """1-based ranks along the last axis; ties get the mean of their ranks (``rankdata``'s 'average').

    Vectorised over all leading axes. Counts and float16 values are ranked by counting
    (:func:`counted_ranks`, linear time); other floats by a sort, tie groups from cumulative
    max/min of their first and last positions. ``valid`` (bool, same shape): rank among the
    valid entries only (invalid entries get rank 0). float64 ranks.
    """
    keyed = rank_keys(x, valid)
    if keyed is not None:
        return counted_ranks(*keyed, valid)
    if valid is None:
        return _sorted_ranks(x)
    # invalid entries rank after every valid one (+inf), then are zeroed
    y = torch.where(valid, x.to(torch.promote_types(x.dtype, torch.float32)), float("inf"))
    return _sorted_ranks(y).masked_fill(~valid, 0.0)


def _pearson_from_centered(xc, yc, dims):
    return (xc * yc).sum(dims) / torch.sqrt((xc * xc).sum(dims) * (yc * yc).sum(dims))


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
    """Spearman per (tile, gene) over the tile's tissue bins (average ranks for ties); ``[T, G]``.

    NaN where a tile has < 2 tissue bins or either side is constant there.
    """
    t, g, h, w = pred.shape
    tissue = mask.reshape(t, 1, h * w).expand(t, g, h * w)
    n = mask.reshape(t, h * w).sum(1).to(F64)[:, None, None]

    def centred_ranks(x):
        # ranks among tissue bins; their mean is exactly (n + 1) / 2 and the ranks are half-integers,
        # so centring is exact, off-tissue bins are 0, and a constant side sums to exactly 0 squared
        return torch.where(tissue, average_ranks(x.reshape(t, g, h * w), tissue) - (n + 1) / 2, 0.0)

    rx, ry = centred_ranks(pred), centred_ranks(target)
    r = _pearson_from_centered(rx, ry, 2).clamp(-1, 1)
    bad = ((rx * rx).sum(2) == 0) | ((ry * ry).sum(2) == 0) | (n[..., 0] < 2)
    return torch.where(bad, torch.nan, r)
