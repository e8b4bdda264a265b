"""Compiled passes of the evaluation (numba): pooling, tissue values, per-tile moments and ranks.

Every metric of a batch is read off a few per-(tile, gene) statistics of each side (predictions
or counts) at each pooling, which these kernels compute in one or two passes over the tissue
bins, where the vectorised numpy version made dozens of passes over float64 copies.

Sums are compensated (Neumaier), so they are as exact as float64 allows whatever the order of
the bins: the numbers agree with the former numpy and torch reductions to about 1e-15. Ranks are
exact half-integers, found by a radix sort of each value's order-preserving 64-bit pattern over
the bits that vary (one counting pass when few do: counts, or a gene's float16 rates).
Compiled on first use and cached beside this file.
"""

import numba
import numpy as np

_JIT = {"cache": True, "nogil": True}
#: For sums of well-conditioned terms only: lets LLVM sum in vector lanes (a machine-fixed order).
_FAST = {**_JIT, "fastmath": {"reassoc"}}
#: Radix digits of at most this many bits (2048 buckets: the histogram stays in L1).
DIGIT_BITS = 11


@numba.njit(inline="always")
def _add(s, c, v):
    """Neumaier's compensated sum: ``(s, c)`` plus ``v``; the total is ``s + c``."""
    t = s + v
    if abs(s) >= abs(v):
        c += (s - t) + v
    else:
        c += (v - t) + s
    return t, c


# ---------------------------------------------------------------------------------------------
# pooling and tissue values


@numba.njit(**_JIT)
def pool(x, mask, f):
    """Tissue-masked sums over ``f x f`` blocks of ``x [T, G, H, W]`` (any real dtype), float64.

    Returns the pooled values ``[T, G, H/f, W/f]`` and the pooled mask (a block is tissue if any
    of its bins is). Window sums of counts and float16 rates are exact in float64.
    """
    n_t, n_g, h, w = x.shape
    out = np.zeros((n_t, n_g, h // f, w // f))
    pm = np.zeros((n_t, h // f, w // f), dtype=np.bool_)
    for t in range(n_t):
        m = mask[t]
        for i in range(h):
            for j in range(w):
                pm[t, i // f, j // f] |= m[i, j]
        for g in range(n_g):
            src, dst = x[t, g], out[t, g]
            for i in range(h):
                row = dst[i // f]
                for j in range(w):
                    if m[i, j]:
                        row[j // f] += src[i, j]
    return out, pm


@numba.njit(**_JIT)
def gather(x, mask):
    """Tissue values ``[G, N]`` float64 of ``x [T, G, H, W]`` (tiles in order, bins row-major) and
    the tiles' offsets ``[T + 1]`` into them."""
    n_t, n_g, h, w = x.shape
    offsets = np.zeros(n_t + 1, np.int64)
    for t in range(n_t):
        offsets[t + 1] = offsets[t] + mask[t].sum()
    out = np.empty((n_g, offsets[n_t]))
    for t in range(n_t):
        idx = np.flatnonzero(mask[t])
        o = offsets[t]
        for g in range(n_g):
            flat = x[t, g].ravel()
            for m in range(len(idx)):
                out[g, o + m] = flat[idx[m]]
    return out, offsets


# ---------------------------------------------------------------------------------------------
# moments


@numba.njit(**_JIT)
def moments(values, offsets):
    """Per (tile, gene) of tissue values ``[G, N]``: mean, min and max, ``[T, G, 3]`` float64 (NaN: no tissue)."""
    n_g = values.shape[0]
    n_t = len(offsets) - 1
    out = np.full((n_t, n_g, 3), np.nan)
    for g in range(n_g):
        for t in range(n_t):
            v = values[g, offsets[t] : offsets[t + 1]]
            if len(v):
                out[t, g, 0], out[t, g, 1], out[t, g, 2] = _sum(v) / len(v), v.min(), v.max()
    return out


@numba.njit(**_FAST)
def _sum(v):
    s = 0.0
    for x in v:
        s += x
    return s


@numba.njit(**_FAST)
def _centred_sums(a, ma, b, mb, ra, rb, out):
    """``out[:]`` = sums of (a - ma)^2, (b - mb)^2, (a - ma)(b - mb) and, with ranks, ra^2, rb^2, ra rb."""
    saa = sbb = sab = 0.0
    for i in range(len(a)):
        da, db = a[i] - ma, b[i] - mb
        saa += da * da
        sbb += db * db
        sab += da * db
    out[0], out[1], out[2] = saa, sbb, sab
    if len(ra):
        saa = sbb = sab = 0.0  # quarter-integers: exact in any order
        for i in range(len(ra)):
            saa += ra[i] * ra[i]
            sbb += rb[i] * rb[i]
            sab += ra[i] * rb[i]
        out[3], out[4], out[5] = saa, sbb, sab


@numba.njit(**_JIT)
def centred(xa, ma, xb, mb, ra, rb, offsets):
    """Per (tile, gene) centred sums of two sides: ``[T, G, 6]``, see :func:`_centred_sums`.

    ``xa, xb [G, N]``: tissue values; ``ma, mb [T, G]``: their tile means; ``ra, rb``: centred
    ranks ``[G, N]`` (:func:`tile_ranks`), or ``[G, 0]`` without Spearman (those sums are then 0).
    Sums of squared deviations are well conditioned: summed in vector lanes (float64 rounding,
    about 1e-16 relative; the order is fixed by the machine).
    """
    n_g = xa.shape[0]
    n_t = len(offsets) - 1
    out = np.zeros((n_t, n_g, 6))
    ranked = ra.shape[1] > 0
    for g in range(n_g):
        for t in range(n_t):
            a, b = offsets[t], offsets[t + 1]
            if b == a:
                continue
            hi = b if ranked else a
            _centred_sums(xa[g, a:b], ma[t, g], xb[g, a:b], mb[t, g], ra[g, a:hi], rb[g, a:hi], out[t, g])
    return out


# ---------------------------------------------------------------------------------------------
# ranks


@numba.njit(inline="always")
def _order_key(v):
    """Unsigned order key of a float64 bit pattern (sign-magnitude to order)."""
    top = np.uint64(1) << np.uint64(63)
    return ~v if v & top else v | top


@numba.njit(**_JIT)
def _rank_into(v, out, work):
    """Average ranks (1-based, ties share their mean rank) of the 1-D values ``v`` into ``out``.

    ``work``: scratch of :func:`_work` for at least ``len(v)`` values. Exact: ranks are
    half-integers. A value's rank is the number of smaller values plus ``(ties + 1) / 2``.
    """
    n = len(v)
    if n == 0:
        return
    f, key, key2, idx, idx2, hist, avg = work
    for i in range(n):
        f[i] = np.float64(v[i]) + 0.0  # -0 becomes +0: they tie
    bits = f[:n].view(np.uint64)
    k0 = _order_key(bits[0])
    diff = np.uint64(0)
    for i in range(n):
        key[i] = _order_key(bits[i])
        diff |= key[i] ^ k0
    if diff == 0:
        out[:n] = (n + 1) / 2
        return
    lo = 0
    while not (diff >> np.uint64(lo)) & np.uint64(1):
        lo += 1
    hi = 63
    while not (diff >> np.uint64(hi)) & np.uint64(1):
        hi -= 1
    width = hi - lo + 1
    if width <= 40 and (1 << width) <= 2 * max(n, 1 << DIGIT_BITS):  # few distinct patterns: count them
        _counted_ranks(key, n, lo, width, out, hist, avg)
        return
    passes = (width + DIGIT_BITS - 1) // DIGIT_BITS
    step = (width + passes - 1) // passes
    for i in range(n):
        idx[i] = i
    for p in range(passes):  # LSD radix sort of (key, index), `step` bits a pass
        shift = np.uint64(lo + p * step)
        m = np.uint64((1 << step) - 1)
        h = hist[: (1 << step) + 1]
        h[:] = 0
        for i in range(n):
            h[((key[i] >> shift) & m) + 1] += 1
        for d in range(1, len(h)):
            h[d] += h[d - 1]
        for i in range(n):
            d = (key[i] >> shift) & m
            pos = h[d]
            h[d] = pos + 1
            key2[pos], idx2[pos] = key[i], idx[i]
        key, key2, idx, idx2 = key2, key, idx2, idx
    i = 0
    while i < n:  # tie groups of the sorted keys get the mean of their 1-based positions
        j = i + 1
        while j < n and key[j] == key[i]:
            j += 1
        r = (i + j + 1) / 2
        for m2 in range(i, j):
            out[idx[m2]] = r
        i = j


@numba.njit(inline="always")
def _counted_ranks(key, n, lo, width, out, hist, avg):
    """Ranks by one histogram of the ``width`` varying key bits from bit ``lo`` (see :func:`_rank_into`)."""
    shift = np.uint64(lo)
    m = np.uint64((1 << width) - 1)
    h = hist[: (1 << width) + 1]
    h[:] = 0
    for i in range(n):
        h[((key[i] >> shift) & m) + 1] += 1
    below = 0
    for d in range(len(h) - 1):
        ties = h[d + 1]
        avg[d] = below + (ties + 1) / 2
        below += ties
    for i in range(n):
        out[i] = avg[(key[i] >> shift) & m]


@numba.njit(**_JIT)
def _work(n):
    """Scratch of :func:`_rank_into` for up to ``n`` values."""
    buckets = 2 * max(n, 1 << DIGIT_BITS)  # the most a counting pass uses
    return (np.empty(n), np.empty(n, np.uint64), np.empty(n, np.uint64), np.empty(n, np.int64),
            np.empty(n, np.int64), np.zeros(buckets + 1, np.int64), np.empty(buckets))  # fmt: skip


@numba.njit(**_JIT)
def rank_rows(x, valid):
    """Average ranks along the rows of ``x [R, N]`` among each row's ``valid [R, N]`` entries.

    Invalid entries get rank 0. float64 ``[R, N]``.
    """
    n_r, n = x.shape
    out = np.zeros((n_r, n))
    work = _work(n)
    v, r = np.empty(n), np.empty(n)
    for row in range(n_r):
        k = 0
        for i in range(n):
            if valid[row, i]:
                v[k] = x[row, i]
                k += 1
        _rank_into(v[:k], r, work)
        k = 0
        for i in range(n):
            if valid[row, i]:
                out[row, i] = r[k]
                k += 1
    return out


@numba.njit(**_JIT)
def rank_1d(x):
    """Average ranks of the 1-D values ``x`` (float64)."""
    out = np.empty(len(x))
    _rank_into(x, out, _work(len(x)))
    return out


@numba.njit(**_JIT)
def tile_ranks(values, offsets):
    """Centred average ranks ``rank - (n + 1) / 2`` (exact) within each (tile, gene) of tissue values ``[G, N]``."""
    n_g = values.shape[0]
    n_t = len(offsets) - 1
    out = np.empty_like(values)
    longest = 0
    for t in range(n_t):
        longest = max(longest, offsets[t + 1] - offsets[t])
    work = _work(longest)
    for g in range(n_g):
        for t in range(n_t):
            a, b = offsets[t], offsets[t + 1]
            r = out[g, a:b]
            _rank_into(values[g, a:b], r, work)
            r -= (b - a + 1) / 2
    return out


# ---------------------------------------------------------------------------------------------
# count scores


@numba.njit(**_JIT)
def count_sums(mu, y, eps):
    """Per gene of tissue rates and counts ``mu, y [G, N]``: sums of mu, y and ``y log(y / mu)``
    (over ``y > 0``, mu clamped at ``eps``), and the number of zero counts; ``[4, G]``."""
    n_g, n = mu.shape
    out = np.zeros((4, n_g))
    for g in range(n_g):
        sm = cm = sy = cy = sl = cl = 0.0
        zeros = 0
        for i in range(n):
            m, c = mu[g, i], y[g, i]
            sm, cm = _add(sm, cm, m)
            if c > 0:
                sy, cy = _add(sy, cy, c)
                sl, cl = _add(sl, cl, c * (np.log(c) - np.log(max(m, eps))))
            else:
                zeros += 1
        out[0, g], out[1, g], out[2, g], out[3, g] = sm + cm, sy + cy, sl + cl, zeros
    return out


@numba.njit(**_JIT)
def raw_sums(xa, xb, offsets):
    """Per (tile, gene) sums of a, b, aa, bb, ab over tissue values ``[G, N]``: ``[T, G, 5]``.

    Compensated: exact for counts and float16 rates (their products are exact in float64), so
    any order of summation gives the same numbers.
    """
    n_g = xa.shape[0]
    n_t = len(offsets) - 1
    out = np.zeros((n_t, n_g, 5))
    for g in range(n_g):
        for t in range(n_t):
            s = np.zeros(5)
            c = np.zeros(5)
            for i in range(offsets[t], offsets[t + 1]):
                a, b = xa[g, i], xb[g, i]
                s[0], c[0] = _add(s[0], c[0], a)
                s[1], c[1] = _add(s[1], c[1], b)
                s[2], c[2] = _add(s[2], c[2], a * a)
                s[3], c[3] = _add(s[3], c[3], b * b)
                s[4], c[4] = _add(s[4], c[4], a * b)
            out[t, g] = s + c
    return out
