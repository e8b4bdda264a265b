"""Unbalanced entropic transport on the regular bin grid, with the kernel as separable convolutions.

Cost from observed bin i to source bin j (positions r in um, tissue flag t in {0, 1}):

    C_ij = s |r_i - r_j|^2 + lam (1 - t_j)

so the Gibbs kernel K = exp(-C / eps) is a Gaussian of width sqrt(eps / (2 s)) times a diagonal
w_j = exp(-lam (1 - t_j) / eps): K v = g * (w v) and K^T u = w (g * u), each one separable
convolution (g is symmetric), truncated at `radius` bins. Memory and time are linear in the
number of bins; no N x N matrix exists except in `dense_cost`, which is there for the reference
check against POT and for the benchmark's dense baseline.

The problem solved (POT's ``sinkhorn_unbalanced(a, b, M, eps, reg_m=(inf, rho), reg_type="entropy")``):

    min_P <P, C> + eps sum P (log P - 1) + rho KL(P^T 1 | b)   s.t.  P 1 = a,

i.e. every observed count a is moved (counts are conserved) and the target marginal is pulled
towards the soft-thresholded sources b. Scaling form P = diag(u) K diag(v):

    u = a / (K v),    v = (b / (K^T u))^(rho / (rho + eps)).

The corrected field is the target marginal p = v (K^T u). The iteration ends with a u update, so
P 1 = a holds exactly (up to float rounding) after any number of iterations. With rho -> inf p
tends to b; with rho -> 0, to the adjoint blur K^T (a / K 1); in between it is an EM
(Richardson-Lucy-like) reassignment of each count to nearby sources. Where b = 0 (a bin without
counts) p = 0: the output is as sparse as the input.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

TINY = 1e-30  # floor of denominators: a bin with no transportable mass within reach


@dataclass
class Scalings:
    """Solution on a window: scalings u, v and target marginal p, each [G, H, W]."""

    u: torch.Tensor
    v: torch.Tensor
    p: torch.Tensor


def _as(x, dtype):
    """A tensor of `dtype` (a Python float must not pass through float32 on its way to float64)."""
    return x.to(dtype) if torch.is_tensor(x) else torch.tensor(x, dtype=dtype)


def grid4(x):
    """[G, H, W] -> [1, G, H, W] channels-last, the layout every convolution here runs in.

    Grouped conv2d on CPU is ~8x faster channels-last; elementwise ops keep the layout, so the
    solver converts once and stays 4-D.
    """
    return x[None].contiguous(memory_format=torch.channels_last)


def _pass(x4, taps, dim):
    """One 1-D correlation of x4 [1, G, H, W] along rows (dim 3) or columns (dim 2), zero outside."""
    R = (taps.shape[1] - 1) // 2
    w = taps[:, None, None, :] if dim == 3 else taps[:, None, :, None]
    return F.conv2d(x4, w.to(x4.dtype), padding=(0, R) if dim == 3 else (R, 0), groups=x4.shape[1])


class _Blur(torch.autograd.Function):
    """Separable correlation with fixed per-gene taps [G, 2R + 1]; adjoint = correlation with flipped taps."""

    @staticmethod
    def forward(ctx, x4, taps):
        ctx.save_for_backward(taps)
        return _pass(_pass(x4, taps, 3), taps, 2)

    @staticmethod
    def backward(ctx, gy):
        (taps,) = ctx.saved_tensors
        flip = taps.flip(1)
        return _pass(_pass(gy.contiguous(memory_format=torch.channels_last), flip, 2), flip, 3), None


class _GaussianBlur(torch.autograd.Function):
    """Separable Gaussian exp(-alpha_g d^2) (d in um) and its analytic gradient in alpha [G].

    d taps / d alpha = -d^2 taps, so the alpha gradient costs two extra passes instead of
    autograd's conv2d weight gradient (5x slower on CPU).
    """

    @staticmethod
    def forward(ctx, x4, alpha, radius, bin_um):
        d2 = (torch.arange(-radius, radius + 1, dtype=x4.dtype) * bin_um) ** 2
        taps = torch.exp(-alpha.to(x4.dtype)[:, None] * d2)
        z = _pass(x4, taps, 3)
        ctx.save_for_backward(x4, z, taps, d2)
        return _pass(z, taps, 2)

    @staticmethod
    def backward(ctx, gy):
        x4, z, taps, d2 = ctx.saved_tensors
        gy = gy.contiguous(memory_format=torch.channels_last)
        gz = _pass(gy, taps, 2)  # symmetric taps: the adjoint is the same correlation
        gx = _pass(gz, taps, 3) if ctx.needs_input_grad[0] else None
        galpha = None
        if ctx.needs_input_grad[1]:
            dtaps = -d2 * taps
            galpha = (gy * _pass(z, dtaps, 2)).sum((0, 2, 3)) + (gz * _pass(x4, dtaps, 3)).sum((0, 2, 3))
        return gx, galpha, None, None


def blur(x4, taps):
    """Separable correlation of x4 [1, G, H, W] (channels-last) with per-gene taps [G, 2R + 1]."""
    return _Blur.apply(x4, taps)


def gaussian_blur(x4, alpha, radius, bin_um):
    """sum_j exp(-alpha_g |r_i - r_j|^2) x_j over |row/col offset| <= radius, differentiable in alpha."""
    return _GaussianBlur.apply(x4, alpha, radius, bin_um)


def kernel_taps(s, eps, radius, bin_um, dtype=torch.float32):
    """1-D Gaussian taps exp(-s (k bin_um)^2 / eps_g), k = -radius..radius: [G, 2 radius + 1]."""
    k = torch.arange(-radius, radius + 1, dtype=dtype) * bin_um
    return torch.exp(-_as(s, dtype) * k**2 / _as(eps, dtype).reshape(-1, 1))


def tissue_weight(tissue, lam, eps, dtype=torch.float32):
    """Diagonal of the kernel: w_j = exp(-lam (1 - t_j) / eps_g), [1, G, H, W] channels-last."""
    t = _as(torch.as_tensor(tissue), dtype)
    w = torch.exp(-_as(lam, dtype) * (1.0 - t)[None] / _as(eps, dtype).reshape(-1, 1, 1))
    return grid4(w)


def sinkhorn_grid(a, b, tissue, *, s, lam, eps, rho, radius, n_iter, bin_um=2.0):
    """Solve the unbalanced problem on one window of the bin grid.

    Parameters
    ----------
    a
        Observed counts [G, H, W] (source marginal, kept exactly).
    b
        Soft-thresholded sources [G, H, W] (target reference, relaxed by KL with strength rho).
    tissue
        [H, W], 1 in tissue.
    s, lam
        Cost per um^2 of displacement, and cost of a source bin outside the tissue (scalars).
    eps
        Entropic regularisation per gene [G].
    rho
        KL strength of the target marginal (scalar).
    radius
        Kernel support in bins.
    n_iter
        Scaling iterations (each: one v and one u update) after the first u update.

    Returns
    -------
    Scalings
        u, v, p as [G, H, W]; differentiable in every tensor argument.
    """
    dtype = a.dtype
    eps = _as(eps, dtype).reshape(-1)
    alpha = _as(s, dtype) / eps
    w = tissue_weight(tissue, lam, eps, dtype)
    fi = (_as(rho, dtype) / (_as(rho, dtype) + eps)).reshape(1, -1, 1, 1)
    a4, b4 = grid4(a), grid4(b)
    has = b4 > 0
    log_b = torch.log(torch.where(has, b4, torch.ones_like(b4)))  # no log(0): no inf * 0 in backward
    zero = torch.zeros_like(b4)
    v = has.to(dtype)
    u = a4 / gaussian_blur(w * v, alpha, radius, bin_um).clamp_min(TINY)
    for _ in range(n_iter):
        ktu = w * gaussian_blur(u, alpha, radius, bin_um)
        v = torch.where(has, torch.exp(fi * (log_b - torch.log(ktu.clamp_min(TINY)))), zero)
        u = a4 / gaussian_blur(w * v, alpha, radius, bin_um).clamp_min(TINY)
    p = v * (w * gaussian_blur(u, alpha, radius, bin_um))
    return Scalings(u[0], v[0], p[0])


# ---------------------------------------------------------------- dense forms (reference and benchmark only)
def dense_cost(shape, tissue, s, lam, bin_um=2.0):
    """The N x N cost C_ij = s |r_i - r_j|^2 + lam (1 - t_j) of a small grid, float64 (row-major bins)."""
    rows, cols = np.divmod(np.arange(shape[0] * shape[1]), shape[1])
    d2 = ((rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2) * bin_um**2
    return s * d2 + lam * (1.0 - np.asarray(tissue, np.float64).ravel())[None, :]


def dense_plan(scalings, tissue, s, lam, eps, gene=0, bin_um=2.0):
    """The N x N plan diag(u) exp(-C / eps) diag(v) of one gene, from the grid solver's scalings."""
    u = scalings.u[gene].detach().double().numpy().ravel()
    v = scalings.v[gene].detach().double().numpy().ravel()
    K = np.exp(-dense_cost(scalings.u.shape[1:], tissue, s, lam, bin_um) / float(np.ravel(eps)[gene]))
    return u[:, None] * K * v[None, :]
