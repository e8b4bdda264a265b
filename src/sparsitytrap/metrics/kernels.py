"""Compiled passes of the evaluation (numba): pooling, tissue values, per-tile moments and ranks.

Every metric of a batch is read off a few per-(tile, gene) statistics of each side (predictions
or counts) at each bin size. :func:`pair` computes a prediction's in one pass per (tile, gene)
while its values are in cache, against the counts' side (:func:`gather`, :func:`moments`,
:func:`tile_ranks`), which a model and its null share; the numpy version it replaced made
dozens of passes over float64 copies of every batch.

Sums of well-conditioned terms (deviations from a tile's mean, tissue values) are taken in vector
lanes: reordered, they agree with the former numpy and torch reductions to about 1e-15 (the order
is fixed by the machine). Ranks are exact half-integers: a counting pass over each value's
order-preserving bit pattern when few bits vary (counts, one gene's float16 rates), else an LSD
radix sort over the bits that do. Compiled on first use (``python -m sparsitytrap.metrics``
does it at install) and cached beside this file.
"""

import numba
import numpy as np

_JIT = {"cache": True, "nogil": True}
#: For sums of well-conditioned terms only: lets LLVM sum in vector lanes (a machine-fixed order).
_FAST = {**_JIT, "fastmath": {"reassoc"}}
#: Radix digits of at most this many bits (2048 buckets: the histogram stays in L1).
DIGIT_BITS = 11


# ---------------------------------------------------------------------------------------------
# pooling and tissue values


@numba.njit(inline="always")
def _tissue(row, keep, j):
    return row[j] if keep[j] else 0.0


@numba.njit(**_JIT)
def halve(x, mask):
    """Tissue-masked sums over 2 x 2 blocks of ``x [T, G, H, W]`` (any real dtype), float64.

    Returns the pooled values ``[T, G, H/2, W/2]`` and the pooled mask (a block is tissue if any of
    its bins is). Window sums of counts and float16 rates are exact in float64. Bins off tissue
    are skipped, not multiplied by 0 (a NaN there would poison the sum).
    """
    n_t, n_g, h, w = x.shape
    out = np.empty((n_t, n_g, h // 2, w // 2))
    pm = np.empty((n_t, h // 2, w // 2), dtype=np.bool_)
    for t in range(n_t):
        m = mask[t]
        for i in range(h // 2):
            for j in range(w // 2):
                pm[t, i, j] = m[2 * i, 2 * j] | m[2 * i, 2 * j + 1] | m[2 * i + 1, 2 * j] | m[2 * i + 1, 2 * j + 1]
        for g in range(n_g):
            src, dst = x[t, g], out[t, g]
            for i in range(h // 2):
                r0, r1, k0, k1, acc = src[2 * i], src[2 * i + 1], m[2 * i], m[2 * i + 1], dst[i]
                for j in range(w // 2):
                    a = _tissue(r0, k0, 2 * j) + _tissue(r0, k0, 2 * j + 1)
                    acc[j] = a + (_tissue(r1, k1, 2 * j) + _tissue(r1, k1, 2 * j + 1))
    return out, pm


@numba.njit(inline="always")
def _gather(x, mask, out_dtype):
    n_t, n_g, h, w = x.shape
    offsets = np.zeros(n_t + 1, np.int64)
    for t in range(n_t):
        offsets[t + 1] = offsets[t] + mask[t].sum()
    out = np.empty((n_g, offsets[n_t]), out_dtype)
    for t in range(n_t):
        idx = np.flatnonzero(mask[t])
        o = offsets[t]
        for g in range(n_g):
            flat = x[t, g].ravel()
            dst = out[g]
            for m in range(len(idx)):
                dst[o + m] = flat[idx[m]]
    return out, offsets


@numba.njit(**_JIT)
def gather(x, mask):
    """Tissue values ``[G, N]`` of ``x [T, G, H, W]`` (tiles in order, bins row-major) as float64,
    and the tiles' offsets ``[T + 1]`` into them."""
    return _gather(x, mask, np.float64)


@numba.njit(**_JIT)
def gather_bits(x, mask):
    """:func:`gather` of the uint16 bit patterns of float16 values, kept as uint16."""
    return _gather(x, mask, np.uint16)


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
                s, out[t, g, 1], out[t, g, 2] = _sum_min_max(v)
                out[t, g, 0] = s / len(v)
    return out


@numba.njit(**_FAST)
def _sum_min_max(v):
    """Sum (in vector lanes), min and max of ``v``."""
    s, lo, hi = 0.0, np.inf, -np.inf
    for x in v:
        s += x
        lo, hi = min(lo, x), max(hi, x)
    return s, lo, hi


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


# ---------------------------------------------------------------------------------------------
# ranks


@numba.njit(inline="always")
def _order_key(v):
    """Unsigned order key of a float64 bit pattern (sign-magnitude to order)."""
    top = np.uint64(1) << np.uint64(63)
    return ~v if v & top else v | top


@numba.njit(inline="always")
def _low_bit(diff):
    """Index of the lowest set bit of a nonzero uint64."""
    lo = 0
    while not (diff >> np.uint64(lo)) & np.uint64(1):
        lo += 1
    return lo


@numba.njit(**_JIT)
def _rank_into(v, out, work, centre):
    """Average ranks (1-based, ties share their mean rank) of the 1-D values ``v``, less ``centre``, into ``out``.

    ``work``: :func:`scratch` for at least ``len(v)`` values. Exact: ranks are half-integers
    (``centre`` too, in use). A value's rank is the number of smaller values plus ``(ties + 1) / 2``.

    The order keys of the nonzero values, less the smallest and shifted past the low bits none of
    them sets, number a few thousand buckets for counts or one gene's float16 rates: they are
    counted in one pass, zeros in a bucket of their own below (or above) them. Wider keys
    (pooled float rates) go by an LSD radix sort.
    """
    n = len(v)
    if n == 0:
        return
    f, key, key2, idx, idx2, hist, avg = work
    for i in range(n):
        f[i] = np.float64(v[i]) + 0.0  # -0 becomes +0: they tie
    bits = f[:n].view(np.uint64)
    zero = np.uint64(1) << np.uint64(63)  # the order key of +0
    top = ~np.uint64(0)
    kmin, kmax, n_zero = top, np.uint64(0), 0
    for i in range(n):  # no branches, so in vector lanes (a value equal to a start value changes nothing)
        k = _order_key(bits[i])
        key[i] = k
        nonzero = k != zero
        n_zero += 0 if nonzero else 1
        kmin, kmax = min(kmin, k if nonzero else top), max(kmax, k if nonzero else np.uint64(0))
    diff = np.uint64(0)  # the bits in which nonzero keys differ
    for i in range(n):
        diff |= (key[i] ^ kmin) if key[i] != zero else np.uint64(0)
    if n_zero == n or (n_zero == 0 and diff == 0):
        out[:n] = (n + 1) / 2 - centre
        return
    lo = _low_bit(diff) if diff else 0
    span = (kmax - kmin) >> np.uint64(lo)  # nonzero buckets 0 .. span
    if (n_zero == 0 or not kmin < zero < kmax) and span < len(avg) and span < 2 * n + (1 << DIGIT_BITS):
        _counted_ranks(key, n, kmin, lo, int(span), zero, n_zero, zero < kmin, out, hist, avg, centre)
        return
    _radix_ranks(key, n, out, work, centre)


@numba.njit(inline="always")
def _counted_ranks(key, n, kmin, lo, span, zero, n_zero, zeros_low, out, hist, avg, centre):
    """Ranks by one histogram of the nonzero values' rebased keys; zeros (counted already) below or above them."""
    shift = np.uint64(lo)
    h = hist[: span + 1]
    h[:] = 0
    for i in range(n):  # zeros skipped: most counts are 0, and one bucket hit in a row stalls on its store
        if key[i] != zero:
            h[(key[i] - kmin) >> shift] += 1
    below = n_zero if zeros_low else 0
    for d in range(span + 1):
        ties = h[d]
        avg[d] = below + (ties + 1) / 2 - centre
        below += ties
    zero_rank = ((n_zero + 1) / 2 if zeros_low else n - (n_zero - 1) / 2) - centre
    for i in range(n):
        k = key[i]
        out[i] = zero_rank if k == zero else avg[(k - kmin) >> shift]


@numba.njit(inline="always")
def _radix_ranks(key, n, out, work, centre):
    """Ranks by an LSD radix sort of (key, index) over the key bits that vary, then tie groups."""
    _, _, key2, idx, idx2, hist, _ = work
    diff = np.uint64(0)
    for i in range(n):
        diff |= key[i] ^ key[0]
    lo = _low_bit(diff)
    hi = 63
    while not (diff >> np.uint64(hi)) & np.uint64(1):
        hi -= 1
    width = hi - lo + 1
    digit = 4  # about log2(n) bits a pass: the buckets no more than the values, at most 2048
    while digit < DIGIT_BITS and (1 << (digit + 1)) <= n:
        digit += 1
    passes = (width + digit - 1) // digit
    step = (width + passes - 1) // passes
    for i in range(n):
        idx[i] = i
    for p in range(passes):  # `step` bits a pass
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
        r = (i + j + 1) / 2 - centre
        for m2 in range(i, j):
            out[idx[m2]] = r
        i = j


@numba.njit(**_JIT)
def scratch(n):
    """Scratch of :func:`_rank_into` for up to ``n`` values (reuse it: fresh pages cost as much as ranking)."""
    buckets = 2 * n + (1 << DIGIT_BITS)  # the most a counting pass uses
    return (np.empty(n), np.empty(n, np.uint64), np.empty(n, np.uint64), np.empty(n, np.int64),
            np.empty(n, np.int64), np.zeros(buckets + 1, np.int32), np.empty(buckets))  # fmt: skip


@numba.njit(**_JIT)
def rank_rows(x, valid):
    """Average ranks along the rows of ``x [R, N]`` among each row's ``valid [R, N]`` entries.

    Invalid entries get rank 0. float64 ``[R, N]``.
    """
    n_r, n = x.shape
    out = np.zeros((n_r, n))
    work = scratch(n)
    v, r = np.empty(n), np.empty(n)
    for row in range(n_r):
        k = 0
        for i in range(n):
            if valid[row, i]:
                v[k] = x[row, i]
                k += 1
        _rank_into(v[:k], r, work, 0.0)
        k = 0
        for i in range(n):
            if valid[row, i]:
                out[row, i] = r[k]
                k += 1
    return out


@numba.njit(**_JIT)
def rank_1d(x):
    """Average ranks of the 1-D values ``x`` (float32 or float64), float64."""
    out = np.empty(len(x))
    _rank_into(x, out, scratch(len(x)), 0.0)
    return out


@numba.njit(**_JIT)
def centred_ranks_1d(x, out, work):
    """Centred average ranks ``rank - (n + 1) / 2`` of the 1-D values ``x`` into ``out``; returns their
    sum of squares (0 when ``x`` is constant; exact below about 300 000 values). ``work``: :func:`scratch`."""
    n = len(x)
    _rank_into(x, out, work, (n + 1) / 2)
    ss = 0.0
    for i in range(n):
        ss += out[i] * out[i]
    return ss


@numba.njit(**_JIT)
def tile_ranks(values, offsets):
    """Centred average ranks ``rank - (n + 1) / 2`` (exact) within each (tile, gene) of tissue values ``[G, N]``."""
    n_g = values.shape[0]
    n_t = len(offsets) - 1
    out = np.empty_like(values)
    longest = 0
    for t in range(n_t):
        longest = max(longest, offsets[t + 1] - offsets[t])
    work = scratch(longest)
    for g in range(n_g):
        row, ranks = values[g], out[g]
        for t in range(n_t):
            a, b = offsets[t], offsets[t + 1]
            _rank_into(row[a:b], ranks[a:b], work, (b - a + 1) / 2)
    return out


# ---------------------------------------------------------------------------------------------
# count scores


@numba.njit(**_JIT)
def tissue_faults(pred, target, mask):
    """Whether a tissue bin of ``pred, target [T, G, H, W]`` has a NaN or infinite prediction, and
    whether one has a negative count."""
    n_t, n_g, h, w = pred.shape
    bad_pred = bad_count = False
    for t in range(n_t):
        m = mask[t]
        for g in range(n_g):
            p, y = pred[t, g], target[t, g]
            for i in range(h):
                for j in range(w):
                    if m[i, j]:
                        bad_pred |= p[i, j] - p[i, j] != 0  # NaN for NaN and infinities
                        bad_count |= y[i, j] < 0
    return bad_pred, bad_count


@numba.njit(**_FAST)
def _raw_sums(a, b, out):
    """``out[:]`` = sums of a, b, aa, bb, ab, in vector lanes (about 1e-16 relative)."""
    s0 = s1 = s2 = s3 = s4 = 0.0
    for i in range(len(a)):
        x, y = a[i], b[i]
        s0 += x
        s1 += y
        s2 += x * x
        s3 += y * y
        s4 += x * y
    out[0], out[1], out[2], out[3], out[4] = s0, s1, s2, s3, s4


@numba.njit(**_FAST)
def _count_sums(mu, y, eps):
    """Sums of ``mu``, ``y`` and ``y log(y / mu)`` (over ``y > 0``, mu clamped at ``eps``), and the zero counts."""
    sm = sy = sl = 0.0
    zeros = 0
    for i in range(len(mu)):
        sm += mu[i]
    for i in range(len(mu)):
        c = y[i]
        if c > 0:
            sy += c
            sl += c * (np.log(c) - np.log(max(mu[i], eps)))
        else:
            zeros += 1
    return sm, sy, sl, zeros


@numba.njit(**_JIT)
def pair(x, mask, ty, ty_mean, ty_ranks, offsets, ranked, raw, counts, stored, eps):
    """What every metric takes from predictions ``x [T, G, h, w]`` at one pooling (``mask [T, h, w]``)
    against the counts' side there (``ty [G, N]`` tissue values, ``ty_mean [T, G]``, ``ty_ranks``
    ``[G, N]`` centred ranks or ``[G, 0]``; ``offsets [T + 1]``), one (tile, gene) at a time in cache.

    Returns ``moments [T, G, 3]`` (:func:`moments`), ``sums [T, G, 6]`` (:func:`_centred_sums`; rank
    sums with ``ranked``), ``raw [T, G, 5]`` (with ``raw``: :func:`_raw_sums`), ``count [4, G]`` (with
    ``counts``: sums of rates, counts, ``y log(y / mu)`` and zero counts, mu clamped at ``eps``) and
    the float32 tissue values ``[G, N]`` (with ``stored``; else ``[G, 0]``).
    """
    n_t, n_g = x.shape[:2]
    mom = np.full((n_t, n_g, 3), np.nan)
    sums = np.zeros((n_t, n_g, 6))
    rs = np.zeros((n_t, n_g, 5))
    cnt = np.zeros((4, n_g))
    keep = np.empty((n_g, offsets[n_t] if stored else 0), np.float32)
    longest = 0
    for t in range(n_t):
        longest = max(longest, offsets[t + 1] - offsets[t])
    seg, rk = np.empty(longest), np.empty(longest)
    work = scratch(longest if ranked else 0)
    for t in range(n_t):
        idx = np.flatnonzero(mask[t])
        n, o = len(idx), offsets[t]
        if n == 0:
            continue
        centre = (n + 1) / 2
        for g in range(n_g):
            flat, v = x[t, g].ravel(), seg[:n]
            for m in range(n):
                v[m] = flat[idx[m]]
            s, lo, hi = _sum_min_max(v)
            mom[t, g, 0], mom[t, g, 1], mom[t, g, 2] = s / n, lo, hi
            y = ty[g, o : o + n]
            r = rk[: n if ranked else 0]
            if ranked:
                _rank_into(v, r, work, centre)
            _centred_sums(v, s / n, y, ty_mean[t, g], r, ty_ranks[g, o : o + len(r)], sums[t, g])
            if raw:
                _raw_sums(v, y, rs[t, g])
            if counts:
                sm, sy, sl, zeros = _count_sums(v, y, eps)
                cnt[0, g] += sm
                cnt[1, g] += sy
                cnt[2, g] += sl
                cnt[3, g] += zeros
            if stored:
                for m in range(n):
                    keep[g, o + m] = v[m]
    return mom, sums, rs, cnt, keep


# ---------------------------------------------------------------------------------------------
# SSIM


#: Floating-point freedoms of the SSIM kernel (no NaN or infinity assumptions): reordered sums,
#: fused multiply-adds and reciprocals change its numbers by about 1e-16 and halve its time.
_SSIM = {**_JIT, "fastmath": {"reassoc", "contract", "arcp", "nsz"}}


@numba.njit(**_SSIM)
def _ssim_mean(a, b, lo, scale, win, c1, c2, v, c, row):
    """Mean SSIM map of one pair ``(a - lo) * scale, (b - lo) * scale`` (``a, b [H, W]`` float64),
    skimage's uniform window, cropped borders.

    Scratch: ``v [5, W]``, ``c [5, W + 1]`` (``c[:, 0]`` is 0), ``row [W]``. Row by row of the map,
    in L1: the five moments' column sums over the window slide down one row (``v``), their window
    sums along it are differences of a running sum (``c``), and the row of SSIM values is made in
    vector lanes, then summed. Within 1e-15 of skimage.
    """
    h, w = a.shape
    n, m = h - win + 1, w - win + 1
    v[:, :] = 0.0
    for d in range(win):
        for j in range(w):
            x, y = (a[d, j] - lo) * scale, (b[d, j] - lo) * scale
            v[0, j] += x
            v[1, j] += y
            v[2, j] += x * x
            v[3, j] += y * y
            v[4, j] += x * y
    area = win * win
    inv, cov_norm = 1.0 / area, area / (area - 1)
    total = 0.0
    for i in range(n):
        if i > 0:
            for j in range(w):
                x, y = (a[i + win - 1, j] - lo) * scale, (b[i + win - 1, j] - lo) * scale
                p, q = (a[i - 1, j] - lo) * scale, (b[i - 1, j] - lo) * scale
                v[0, j] = v[0, j] + (x - p)
                v[1, j] = v[1, j] + (y - q)
                v[2, j] = v[2, j] + (x * x - p * p)
                v[3, j] = v[3, j] + (y * y - q * q)
                v[4, j] = v[4, j] + (x * y - p * q)
        r0 = r1 = r2 = r3 = r4 = 0.0  # five running sums side by side: independent chains
        for j in range(w):
            r0 += v[0, j]
            r1 += v[1, j]
            r2 += v[2, j]
            r3 += v[3, j]
            r4 += v[4, j]
            c[0, j + 1], c[1, j + 1], c[2, j + 1], c[3, j + 1], c[4, j + 1] = r0, r1, r2, r3, r4
        for j in range(m):
            e = j + win
            ux, uy = (c[0, e] - c[0, j]) * inv, (c[1, e] - c[1, j]) * inv
            sxx, syy, sxy = (c[2, e] - c[2, j]) * inv, (c[3, e] - c[3, j]) * inv, (c[4, e] - c[4, j]) * inv
            uxy, uxx, uyy = ux * uy, ux * ux, uy * uy
            vx, vy, vxy = (sxx - uxx) * cov_norm, (syy - uyy) * cov_norm, (sxy - uxy) * cov_norm
            row[j] = ((uxy * 2 + c1) * (vxy * 2 + c2)) / ((uxx + uyy + c1) * (vx + vy + c2))
        for j in range(m):
            total += row[j]
    return total / (n * m)


@numba.njit(**_JIT)
def _ssim_scratch(w):
    return np.empty((5, w)), np.zeros((5, w + 1)), np.empty(w)


@numba.njit(**_JIT)
def ssim_images(a, b, win, c1, c2):
    n_img, h, w = a.shape
    v, c, row = _ssim_scratch(w)
    out = np.empty(n_img)
    for k in range(n_img):
        out[k] = _ssim_mean(a[k], b[k], 0.0, 1.0, win, c1, c2, v, c, row)
    return out


#: Lanes of the running min and max of a pair (independent chains: min and max are exact in any order).
_LANES = 8


@numba.njit(**_JIT)
def ssim_tiles(pred, target, mask, tiles, win, c1, c2, min_range, out):
    """SSIM of every gene of ``tiles`` into ``out [T, G]``: ``pred, target [T, G, H, W]``, ``mask [T, H, W]``."""
    _, g, h, w = pred.shape
    a, b = np.empty((h, w)), np.empty((h, w))
    v, c, row = _ssim_scratch(w)
    lo, hi = np.empty(_LANES), np.empty(_LANES)
    for t in tiles:
        m = mask[t]
        for k in range(g):
            p, q = pred[t, k], target[t, k]
            lo[:], hi[:] = np.inf, -np.inf
            for i in range(h):
                ar, br, pr, qr, mr = a[i], b[i], p[i], q[i], m[i]
                for j in range(w):
                    on = mr[j]  # off tissue 0, whatever is there (a NaN times 0 would be NaN)
                    x = np.float64(pr[j]) if on else 0.0
                    y = np.float64(qr[j]) if on else 0.0
                    ar[j], br[j] = x, y
                    lane = j % _LANES
                    lo[lane], hi[lane] = min(lo[lane], x, y), max(hi[lane], x, y)
            low = lo.min()
            span = hi.max() - low
            if span >= min_range:  # min-max scaled with the pair's shared range, on the fly
                out[t, k] = _ssim_mean(a, b, low, 1.0 / span, win, c1, c2, v, c, row)
