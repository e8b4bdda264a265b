"""Learnable parameters, soft-thresholded sources, the composite loss, and fitting.

Parameters (all learnable, optimised end to end through the unrolled Sinkhorn iterations):

- `s` (one): cost per um^2 of displacement, initialised at 1 / (2 L^2) for diffusion length L,
  so that with eps = 1 the transport kernel is the Gaussian of the estimated diffusion;
- `lam` (one): cost of moving mass onto a bin outside the tissue;
- `eps_g` (per gene): entropic regularisation (kernel width sqrt(eps_g / 2 s) and the pull of
  the sources, rho / (rho + eps_g));
- `q_g` (per gene): quantile of the source threshold, initialised at the cutoff that maximises
  Moran's I of the thresholded counts.

Fixed: beta (50), rho, the smooth-quantile bandwidth tau, and the background prior floor_g
(`source_floor` x the gene's mean count per tissue bin, added to the sources on every bin).

The quantile is differentiable (seed fault 2): a plain quantile of sparse counts sits on tied
integers and has zero gradient. Here Q_g(q) inverts the gene's smoothed CDF,
F(t) = mean_bins sigmoid((t - x) / tau), computed exactly from the histogram of the gene's
counts over the whole sample (one sample-level threshold, the same in every window), so
dQ/dq = 1 / F'(Q) > 0 (implicit function theorem).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from .sinkhorn import sinkhorn_grid
from .spatial import image_alignment, morans_i

TINY = 1e-12
BISECTION_STEPS = 60


# ---------------------------------------------------------------- per-gene count histograms
@dataclass
class GeneStats:
    """Histogram of each gene's counts over the observed bins: values and weights [G, L] (padded, weight 0)."""

    values: np.ndarray
    weights: np.ndarray

    @property
    def total(self):
        return (self.values * self.weights).sum(axis=1)

    @property
    def max(self):
        return np.where(self.weights > 0, self.values, -np.inf).max(axis=1)

    @property
    def min(self):
        return np.where(self.weights > 0, self.values, np.inf).min(axis=1)

    def subset(self, idx):
        return GeneStats(self.values[idx], self.weights[idx])


def gene_stats(histograms, n_bins):
    """GeneStats from each gene's (values, counts) histogram of non-zero counts over `n_bins` observed bins."""
    hists = []
    for vals, n in histograms:
        vals, n = np.asarray(vals, np.float64), np.asarray(n, np.float64)
        hists.append((np.concatenate([[0.0], vals]), np.concatenate([[n_bins - n.sum()], n])))
    width = max(len(v) for v, _ in hists)
    values = np.zeros((len(hists), width))
    weights = np.zeros((len(hists), width))
    for g, (v, n) in enumerate(hists):
        values[g, : len(v)], weights[g, : len(v)] = v, n
        values[g, len(v) :] = v[-1]
    return GeneStats(values, weights)


def smooth_cdf(t, values, weights, tau):
    """F(t) per gene: weighted mean of sigmoid((t - value) / tau) over the histogram."""
    z = torch.sigmoid((t[:, None] - values) / tau)
    return (weights * z).sum(1) / weights.sum(1)


def smooth_quantile(q, values, weights, tau):
    """Q(q) = F^-1(q) per gene, by bisection; its gradient in q is 1 / F'(Q) (implicit function)."""
    values = torch.as_tensor(values, dtype=torch.float64)
    weights = torch.as_tensor(weights, dtype=torch.float64)
    qd = q.detach().double()
    with torch.no_grad():
        lo = values.min(1).values - 40 * tau
        hi = values.max(1).values + 40 * tau
        for _ in range(BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            below = smooth_cdf(mid, values, weights, tau) < qd
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        t = 0.5 * (lo + hi)
        z = torch.sigmoid((t[:, None] - values) / tau)
        density = ((weights * z * (1 - z)).sum(1) / weights.sum(1) / tau).clamp_min(TINY)
        f = smooth_cdf(t, values, weights, tau)
    return (t + (q.double() - f) / density).to(q.dtype)


def soft_sources(x, threshold, value_range, beta):
    """b = sigmoid(beta (x - Q) / range(x)) * x: the seed's soft-thresholded sources, [G, H, W]."""
    return torch.sigmoid(beta * (x - threshold.reshape(-1, 1, 1)) / value_range.reshape(-1, 1, 1)) * x


# ---------------------------------------------------------------- the model
def _logit(p):
    p = min(max(float(p), 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def _inverse_softplus(y):
    y = max(float(y), 1e-4)
    return y + math.log(-math.expm1(-y))


class DiffusionModel(torch.nn.Module):
    """Soft-thresholded sources + unbalanced grid transport, with learnable cost and thresholds."""

    def __init__(self, stats, q_init, length_um, settings, n_tissue_bins, bin_um=2.0):
        super().__init__()
        G = stats.values.shape[0]
        self.register_buffer("values", torch.as_tensor(stats.values, dtype=torch.float64))
        self.register_buffer("weights", torch.as_tensor(stats.weights, dtype=torch.float64))
        self.register_buffer("value_range", torch.as_tensor(stats.max - stats.min, dtype=torch.float32))
        mean = stats.total / max(int(n_tissue_bins), 1)
        self.register_buffer("floor", torch.as_tensor(settings["source_floor"] * mean, dtype=torch.float32))
        self.s0 = 1.0 / (2.0 * length_um**2)
        self.length_um, self.bin_um = float(length_um), float(bin_um)
        self.radius = max(1, math.ceil(settings["truncate"] * length_um / bin_um))
        self.beta, self.rho, self.tau = settings["beta"], settings["rho"], settings["quantile_bandwidth"]
        self.n_iter = settings["sinkhorn_iterations"]
        self.theta_s = torch.nn.Parameter(torch.zeros(()))
        self.theta_lam = torch.nn.Parameter(torch.tensor(_inverse_softplus(settings["tissue_cost"])))
        self.theta_eps = torch.nn.Parameter(torch.full((G,), math.log(settings["eps"])))
        self.theta_q = torch.nn.Parameter(torch.tensor([_logit(q) for q in q_init], dtype=torch.float32))

    @property
    def s(self):
        return self.s0 * torch.exp(self.theta_s)

    @property
    def lam(self):
        return torch.nn.functional.softplus(self.theta_lam)

    @property
    def eps(self):
        return torch.exp(self.theta_eps)

    @property
    def q(self):
        return torch.sigmoid(self.theta_q)

    def thresholds(self):
        return smooth_quantile(self.q, self.values, self.weights, self.tau)

    def sources(self, x, support):
        """Soft-thresholded counts plus the background prior on every bin that exists (`support`)."""
        background = self.floor.reshape(-1, 1, 1) * support.to(x.dtype)[None]
        return soft_sources(x, self.thresholds(), self.value_range, self.beta) + background

    def forward(self, x, tissue, support):
        """Corrected field (the plan's target marginal) of a window x [G, H, W]."""
        res = sinkhorn_grid(
            x,
            self.sources(x, support),
            tissue,
            s=self.s,
            lam=self.lam,
            eps=self.eps,
            rho=self.rho,
            radius=self.radius,
            n_iter=self.n_iter,
            bin_um=self.bin_um,
        )
        return res.p

    def fitted(self):
        """Fitted values: global {s, lam, rho} and per gene {q, threshold, eps, sigma_um, source_pull}."""
        with torch.no_grad():
            s, eps = float(self.s), self.eps.double().numpy()
            per_gene = {
                "q": self.q.double().numpy(),
                "threshold": self.thresholds().double().numpy(),
                "eps": eps,
                "sigma_um": np.sqrt(eps / (2 * s)),
                "source_pull": self.rho / (self.rho + eps),
            }
            return {"s": s, "lam": float(self.lam), "rho": float(self.rho)}, per_gene


# ---------------------------------------------------------------- loss and fitting
@dataclass
class Window:
    """One fitting window: counts x [G, h, w] with a halo of `halo` bins; tissue, support, image [h, w].

    `support` marks the bins that exist (inside the grid).
    """

    x: torch.Tensor
    tissue: torch.Tensor
    support: torch.Tensor
    image: torch.Tensor | None
    halo: int

    def core(self, field):
        h = self.halo
        return field[..., h : field.shape[-2] - h, h : field.shape[-1] - h]


def composite_loss(p, tissue, image, weights):
    """lambda_1 L_image + lambda_2 L_out-of-tissue + lambda_3 (-Moran's I), each averaged over genes.

    The out-of-tissue term is the fraction of each gene's mass on bins outside the tissue (a
    fraction, not a count, so that genes of any depth weigh alike).
    """
    t = tissue.to(p.dtype)
    mass = p.sum((1, 2)).clamp_min(TINY)
    parts = {
        "outside": ((p * (1 - t)[None]).sum((1, 2)) / mass).mean(),
        "moran": -morans_i(p, t).mean(),
        "image": image_alignment(p, image).mean() if image is not None else torch.zeros((), dtype=p.dtype),
    }
    return sum(weights[k] * parts[k] for k in parts), parts


def initial_quantiles(windows, stats, beta, tau, max_cutoffs=16):
    """Per gene, q at the cutoff (half-integers) whose hard-ish threshold maximises Moran's I.

    Cutoffs -0.5 (keep all), 0.5, 1.5, ... below the gene's maximum count are scored on the
    fitting windows; a cutoff that keeps under 10 % of the gene's window mass is not considered.
    """
    vmax, vmin = stats.max, stats.min
    value_range = torch.as_tensor(vmax - vmin, dtype=torch.float32)
    cutoffs = np.arange(-0.5, min(float(vmax.max()), max_cutoffs), 1.0)
    score = np.full((len(vmax), len(cutoffs)), -np.inf)
    with torch.no_grad():
        for k, c in enumerate(cutoffs):
            thr = torch.full((len(vmax),), float(c))
            keep, total, moran = 0.0, 0.0, 0.0
            for w in windows:
                x, t = w.core(w.x), w.core(w.tissue)
                b = soft_sources(x, thr, value_range, beta)
                keep, total = keep + b.sum((1, 2)), total + x.sum((1, 2))
                moran = moran + morans_i(b, t) / len(windows)
            ok = (keep >= 0.1 * total).numpy() & (c < vmax)
            score[ok, k] = moran.numpy()[ok]
    best = cutoffs[np.argmax(score, axis=1)]
    q = smooth_cdf(torch.as_tensor(best), torch.as_tensor(stats.values), torch.as_tensor(stats.weights), tau)
    return q.numpy(), best


def fit(model, windows, settings):
    """Adam on the composite loss over the fitting windows (core bins only); returns the loss history."""
    weights = settings["loss_weights"]
    opt = torch.optim.Adam(model.parameters(), lr=settings["learning_rate"])
    history = []
    for step in range(settings["fit_steps"] + 1):  # the last pass only records the fitted loss
        learn = step < settings["fit_steps"]
        opt.zero_grad()
        record = {"step": step, "total": 0.0, "image": 0.0, "outside": 0.0, "moran": 0.0}
        with torch.set_grad_enabled(learn):
            for w in windows:
                loss, parts = window_loss(model, w, weights)
                if learn:
                    (loss / len(windows)).backward()
                record["total"] += float(loss.detach()) / len(windows)
                for k, v in parts.items():
                    record[k] += float(v.detach()) / len(windows)
        history.append(record)
        if learn:
            opt.step()
    return history


def window_loss(model, w, weights):
    """Composite loss of one fitting window, on its core bins."""
    p = w.core(model(w.x, w.tissue, w.support))
    return composite_loss(p, w.core(w.tissue), None if w.image is None else w.core(w.image), weights)
