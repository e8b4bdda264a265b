"""Training losses on masked 2 um gene maps.

Every loss takes ``out`` [B, G, H, W] (the decoder output), ``target`` [B, G, H, W] (counts, float)
and ``mask`` [B, H, W] (tissue, bool or 0/1) and is averaged over tissue bins only. A batch with
no tissue bins gives a zero that still has a ``grad_fn`` (never NaN). Each loss declares the
decoder ``output`` it expects (see `sparsitytrap.decoders`):

=============  ===========  ==========================================================
name           output       per tissue bin and gene
=============  ===========  ==========================================================
poisson        log_rate     exp(s) - y s                       (s clamped at 20)
mse            softplus     (r - y)^2
mse_log1p      softplus     (log1p r - log1p y)^2
nb             log_rate     -log NB(y; mean exp(s), per-gene learnable dispersion)
strank_pair    score        -y log p over a (bin, random partner) pair, + w (-p log p)
strank_list    score        -y log p, p the softmax over all tissue bins of a list
multiscale     (its base)   base loss minus its floor, on sum-pooled maps at 2-16 um
=============  ===========  ==========================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsitytrap.bins import pool_mask, sum_pool
from sparsitytrap.decoders import MAX_LOG_RATE
from sparsitytrap.errors import InputError

LIBRARY_EPS = 1e-6  # STRank's library-size offset log(mean_g y + eps)


def _prepare(out, target, mask):
    if out.shape != target.shape or out.ndim != 4:
        raise ValueError(f"out {tuple(out.shape)} and target {tuple(target.shape)} must both be [B, G, H, W]")
    if mask.shape != (out.shape[0], *out.shape[2:]):
        raise ValueError(f"mask {tuple(mask.shape)} must be [B, H, W] = {(out.shape[0], *out.shape[2:])}")
    mask = mask if mask.dtype == torch.bool else mask > 0
    return out.float(), target.float(), mask


def _zero(out):
    """A zero attached to the graph of `out` (backward gives zero gradients, even if out is inf)."""
    return torch.where(torch.zeros_like(out, dtype=torch.bool), out, 0.0).sum()


def masked_mean(values, mask):
    """Mean of ``values`` [B, G, H, W] over tissue bins (``mask`` [B, H, W]) and genes; 0 if none."""
    tissue = mask[:, None].expand_as(values)
    total = torch.where(tissue, values, 0.0).sum()
    return total / tissue.sum().clamp(min=1)


class PoissonLoss(nn.Module):
    """Masked Poisson NLL without the log y! term: ``exp(s) - y s``, s clamped at 20."""

    output = "log_rate"

    def forward(self, out, target, mask, slide=None):
        s, y, mask = _prepare(out, target, mask)
        s = s.clamp(max=MAX_LOG_RATE)
        return masked_mean(torch.exp(s) - y * s, mask)

    def floor(self, target, mask):
        """The loss of the perfect prediction (rate = y): ``y - y log y``; it can be negative."""
        _, y, mask = _prepare(target, target, mask)
        return masked_mean(y - torch.xlogy(y, y), mask)


class MSELoss(nn.Module):
    """Masked squared error on raw counts; ``out`` is a Softplus rate."""

    output = "softplus"

    def forward(self, out, target, mask, slide=None):
        r, y, mask = _prepare(out, target, mask)
        return masked_mean((r - y) ** 2, mask)


class MSELog1pLoss(nn.Module):
    """Masked squared error between log1p of the Softplus rate and log1p of the counts."""

    output = "softplus"

    def forward(self, out, target, mask, slide=None):
        r, y, mask = _prepare(out, target, mask)
        # Softplus outputs are >= 0; the clamp only guards log1p against a stray negative.
        return masked_mean((torch.log1p(r.clamp(min=0)) - torch.log1p(y)) ** 2, mask)


class NegativeBinomialLoss(nn.Module):
    """Masked negative binomial NLL with a learnable per-gene log-dispersion.

    Mean ``mu = exp(s)``, variance ``mu + alpha mu^2`` with ``alpha_g = exp(log_dispersion_g)``;
    the full likelihood including the lgamma terms.

    Parameters
    ----------
    n_genes
        Number of genes G (one dispersion each).
    log_dispersion
        Initial log alpha (0: alpha = 1).
    """

    output = "log_rate"

    def __init__(self, n_genes, log_dispersion=0.0):
        super().__init__()
        self.log_dispersion = nn.Parameter(torch.full((int(n_genes),), float(log_dispersion)))

    def forward(self, out, target, mask, slide=None):
        s, y, mask = _prepare(out, target, mask)
        if s.shape[1] != self.log_dispersion.numel():
            raise ValueError(f"NB loss has {self.log_dispersion.numel()} dispersions but out has {s.shape[1]} genes")
        return masked_mean(self._nll(s, y), mask).float()

    def floor(self, target, mask):
        """The loss of the perfect mean (mu = y) at the current dispersions, without gradient."""
        _, y, mask = _prepare(target, target, mask)
        with torch.no_grad():
            return masked_mean(self._nll(torch.log(y.clamp(min=1e-30)), y), mask).float()

    def _nll(self, s, y):
        # float64: lgamma of large counts are large numbers whose differences matter.
        s = s.double().clamp(max=MAX_LOG_RATE)
        y = y.double()
        log_r = -self.log_dispersion.double().clamp(-10, 10).view(1, -1, 1, 1)  # r = 1 / alpha
        r = torch.exp(log_r)
        log_r_plus_mu = torch.logaddexp(log_r, s)
        log_p = (
            torch.lgamma(y + r)
            - torch.lgamma(r)
            - torch.lgamma(y + 1)
            + r * (log_r - log_r_plus_mu)
            + y * (s - log_r_plus_mu)
        )
        return -log_p


def _lists(batch, slide, scope):
    """Batch items grouped into ranking lists: one per tile, or one per slide."""
    if scope == "tile":
        return [[b] for b in range(batch)]
    if slide is None:
        raise ValueError("list_scope 'slide' needs a slide id per batch item")
    ids = slide.tolist() if torch.is_tensor(slide) else list(slide)
    if len(ids) != batch:
        raise ValueError(f"{len(ids)} slide ids for a batch of {batch}")
    groups = {}
    for b, sid in enumerate(ids):
        groups.setdefault(sid, []).append(b)
    return list(groups.values())


def draw_partners(n, generator):
    """For each of n list members, the index of a uniformly drawn other member (n >= 2)."""
    shift = torch.randint(1, n, (n,), generator=generator)
    return (torch.arange(n) + shift) % n


class STRankLoss(nn.Module):
    """STRank (pairwise or listwise): count likelihood conditioned on the list total.

    Logits get the library-size offset ``log(mean over genes of y + 1e-6)``. Listwise: per gene,
    p = softmax over all tissue bins of a list, loss = mean over bins and genes of -y log p
    (multinomial). Pairwise: each tissue bin is paired with a random other bin of its list, p =
    softmax over the pair; loss = mean over pairs, pair members and genes of -y log p (binomial).
    ``entropy_weight`` w adds w times the mean over the same elements of -p log p: the authors'
    ``pi_prior`` (naivete5656/STRank, ``STRankLoss``), added with weight 1 to their pairwise loss.

    Parameters
    ----------
    mode
        ``"list"`` or ``"pair"``.
    list_scope
        ``"slide"`` (all tissue bins of the batch's tiles from one slide, as the authors' lists
        are a slide's spots; needs ``slide`` ids in the call) or ``"tile"`` (one tile's bins: the
        loss then cannot see a per-tile offset of the scores).
    seed
        Seed of the generator that draws pair partners.
    library_offset
        Add the library-size offset (True in STRank).
    entropy_weight
        Weight of the mean entropy term (1 in the authors' pairwise loss, 0 in their listwise one).
    """

    output = "score"

    def __init__(self, mode="list", list_scope="slide", seed=0, library_offset=True, entropy_weight=0.0):
        super().__init__()
        if mode not in ("list", "pair") or list_scope not in ("tile", "slide"):
            raise ValueError(f"STRank mode {mode!r} / list_scope {list_scope!r}: use list|pair and tile|slide")
        self.mode, self.list_scope, self.library_offset = mode, list_scope, library_offset
        self.entropy_weight = float(entropy_weight)
        self.generator = torch.Generator().manual_seed(int(seed))

    @property
    def batches_by_slide(self):
        """True if a batch's tiles should come from one slide (they form one list only then)."""
        return self.list_scope == "slide"

    def forward(self, out, target, mask, slide=None):
        s, y, mask = _prepare(out, target, mask)
        if self.library_offset:
            s = s + torch.log(y.mean(dim=1, keepdim=True) + LIBRARY_EPS)
        n_genes = s.shape[1]
        total, count = _zero(out), 0
        for items in _lists(s.shape[0], slide, self.list_scope):
            tissue = mask[items].flatten()
            n = int(tissue.sum())
            if n == 0 or (self.mode == "pair" and n < 2):
                continue  # an empty list (or a lone bin) carries no ranking information
            # [G, n]: this list's tissue bins; out-of-tissue bins never enter the softmax.
            logits = s[items].transpose(0, 1).reshape(n_genes, -1)[:, tissue]
            counts = y[items].transpose(0, 1).reshape(n_genes, -1)[:, tissue]
            if self.mode == "pair":
                partner = draw_partners(n, self.generator).to(s.device)
                logits = torch.stack([logits, logits[:, partner]], dim=-1)
                counts = torch.stack([counts, counts[:, partner]], dim=-1)
            log_p = torch.log_softmax(logits, dim=-1)
            total = total - (counts * log_p).sum()
            if self.entropy_weight:
                total = total - self.entropy_weight * (torch.exp(log_p) * log_p).sum()
            count += counts.numel()
        return total / max(count, 1)


def _tissue_rate(out, mask, output):
    rate = out if output == "softplus" else torch.exp(out.clamp(max=MAX_LOG_RATE))
    return torch.where(mask[:, None], rate, 0.0)


def _pool_rate(rate, k, output):
    pooled = sum_pool(rate, k)
    # The tiny floor keeps log finite where every fine rate underflowed (log-rates below -87).
    return pooled if output == "softplus" else torch.log(pooled + 1e-30)


class GradNorm:
    """GradNorm task weights (Chen et al. 2018).

    Gradient norms are taken w.r.t. the last shared layer; the weights are moved so that each
    task's weighted gradient norm approaches ``mean norm * (relative inverse training rate)^alpha``,
    then renormalised to sum to the number of tasks.

    Parameters
    ----------
    n_tasks
        Number of tasks (scales).
    alpha
        Restoring-force strength (1.5 in the seeds).
    lr
        Learning rate of the weights (Adam, 0.025 in the seeds).
    """

    def __init__(self, n_tasks, alpha=1.5, lr=0.025):
        self.n_tasks, self.alpha, self.lr = int(n_tasks), float(alpha), float(lr)
        self.weights = torch.ones(self.n_tasks, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.weights], lr=self.lr)
        self.initial = None  # task losses at the first step, L_i(0)

    def step(self, losses, shared_params):
        """Update the weights from this step's task losses; return the balanced total.

        Parameters
        ----------
        losses
            Tensor [T] (or sequence of scalars) of task losses, still attached to the graph.
        shared_params
            The last shared layer's parameters (e.g. ``decoder.shared_parameters()``).

        Returns
        -------
        torch.Tensor
            ``sum_i w_i L_i`` with the weights before this update (detached), for backward.
        """
        losses = losses if torch.is_tensor(losses) else torch.stack(list(losses))
        # A copy: the in-place weight update below must not change what backward of `total` sees.
        total = (self.weights.detach().clone().to(losses.device) * losses).sum()
        norms = torch.stack([self._grad_norm(loss, shared_params) for loss in losses]).detach().cpu()
        current = losses.detach().cpu().double()
        if self.initial is None:
            if not torch.all(current > 0):
                return total  # L(0) must be positive to define training rates
            self.initial = current.clone()
        ratio = current / self.initial
        if not (torch.isfinite(ratio).all() and ratio.mean() > 0 and norms.sum() > 0):
            return total
        inverse_rate = (ratio / ratio.mean()).float()
        weighted_norms = self.weights * norms
        target = (weighted_norms.mean() * inverse_rate**self.alpha).detach()
        self.optimizer.zero_grad()
        (weighted_norms - target).abs().sum().backward()
        self.optimizer.step()
        with torch.no_grad():
            self.weights.clamp_(min=1e-4)
            self.weights.mul_(self.n_tasks / self.weights.sum())
        return total

    @staticmethod
    def _grad_norm(loss, params):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        squares = [g.float().pow(2).sum() for g in grads if g is not None]
        return torch.stack(squares).sum().sqrt() if squares else loss.new_zeros(())

    def state_dict(self):
        """Weights, initial losses and optimizer state (tensors and numbers only)."""
        initial = torch.empty(0) if self.initial is None else self.initial.clone()
        return {"weights": self.weights.detach().clone(), "initial": initial, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        """Restore from `state_dict`."""
        with torch.no_grad():
            self.weights.copy_(state["weights"])
        self.initial = state["initial"].clone() if state["initial"].numel() else None
        self.optimizer.load_state_dict(state["optimizer"])


class MultiScaleLoss(nn.Module):
    """A base loss at several bin sizes (sum-pooled maps), combined by fixed weights or GradNorm.

    Parameters
    ----------
    base
        The loss at each scale (its ``output`` is this loss's ``output``).
    scales
        Pooling factors; (1, 2, 4, 8) = 2, 4, 8, 16 um.
    balance
        ``"fixed"`` (``weights``) or ``"gradnorm"``.
    weights
        Fixed weights, one per scale (default all 1); the GradNorm start is all 1.
    alpha, lr
        GradNorm settings.

    Notes
    -----
    ``loss(out, target, mask)`` returns the total with the current weights and keeps the
    per-scale losses in ``last_losses``. To train with GradNorm::

        losses = loss.per_scale(out, target, mask)
        total = loss.combine(losses, decoder.shared_parameters())  # updates the weights
        total.backward()
    """

    def __init__(self, base, scales=(1, 2, 4, 8), balance="gradnorm", weights=None, alpha=1.5, lr=0.025):
        super().__init__()
        self.base, self.scales, self.balance = base, tuple(int(k) for k in scales), balance
        self.output = base.output
        fixed = torch.ones(len(self.scales)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        self.register_buffer("fixed_weights", fixed)
        self.gradnorm = GradNorm(len(self.scales), alpha, lr) if balance == "gradnorm" else None
        self.batches_by_slide = bool(getattr(base, "batches_by_slide", False))
        self.last_losses = None

    @property
    def needs_shared_params(self):
        """True if `combine` should get the shared parameters to update GradNorm weights."""
        return self.gradnorm is not None

    @property
    def weights(self):
        """Current scale weights (detached)."""
        return self.fixed_weights if self.gradnorm is None else self.gradnorm.weights.detach().clone()

    def per_scale(self, out, target, mask, slide=None):
        """Tensor [S]: at each scale, the base loss minus its floor (the loss of a perfect prediction).

        Subtracting the floor changes no gradient, but makes every task loss >= 0 (the Poisson NLL
        without log y! is negative for counts > 1), so GradNorm's loss ratios L(t)/L(0) make sense.
        """
        out, target, mask = _prepare(out, target, mask)
        for k in self.scales:
            if out.shape[-1] % k or out.shape[-2] % k:
                raise ValueError(f"scale {k} does not divide the map size {tuple(out.shape[-2:])}")
        target = torch.where(mask[:, None], target, 0.0)
        rate = _tissue_rate(out, mask, self.output)  # one exp for all scales
        losses = []
        for k in self.scales:
            y, m = sum_pool(target, k), pool_mask(mask, k)
            coarse = out if k == 1 else _pool_rate(rate, k, self.output)
            loss = self.base(coarse, y, m, slide)
            if hasattr(self.base, "floor"):
                loss = loss - self.base.floor(y, m).detach()
            losses.append(loss)
        return torch.stack(losses)

    def combine(self, losses, shared_params=None):
        """Weighted total of per-scale losses; with GradNorm and `shared_params`, also update."""
        self.last_losses = losses.detach()
        if self.gradnorm is not None and shared_params is not None and torch.is_grad_enabled():
            return self.gradnorm.step(losses, list(shared_params))
        return (self.weights.to(losses.device) * losses).sum()

    def forward(self, out, target, mask, slide=None):
        return self.combine(self.per_scale(out, target, mask, slide))

    def get_extra_state(self):
        return {} if self.gradnorm is None else self.gradnorm.state_dict()

    def set_extra_state(self, state):
        if self.gradnorm is not None and state:
            self.gradnorm.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# the registry: every loss once, with its output space and its settings (key -> default)


@dataclass(frozen=True)
class LossSpec:
    """A loss as the workflow knows it.

    ``output`` is the decoder output space it scores (None: that of its ``base``, for multiscale);
    ``settings`` its config keys with their defaults; ``build(settings, n_genes, where)`` makes it.
    """

    build: Callable
    output: str | None
    settings: dict = field(default_factory=dict)


def _nb(s, n_genes, where):
    if n_genes is None:
        raise InputError(where, "the nb loss needs the number of genes")
    return NegativeBinomialLoss(n_genes, float(s["log_dispersion"]))


def _strank(mode):
    def build(s, n_genes, where):
        scope = _choice(s, "list_scope", ("slide", "tile"), where)
        weight = s["entropy_weight"]
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight < math.inf:
            raise InputError(f"{where}.entropy_weight", f"{weight!r} must be a number >= 0 (1: the authors' pi_prior)")
        return STRankLoss(mode, scope, int(s["seed"]), bool(s["library_offset"]), float(weight))

    return build


def _multiscale(s, n_genes, where):
    base_name = s["base"]
    base = build_loss({"name": base_name, **{k: s[k] for k in LOSSES[base_name].settings if k in s}}, n_genes, where)
    scales = s["scales"]
    if not scales or not all(isinstance(k, int) and k >= 1 for k in scales):
        raise InputError(f"{where}.scales", f"{scales!r} must be a list of positive integers")
    balance = _choice(s, "balance", ("gradnorm", "fixed"), where)
    weights = s["weights"]
    if weights is not None and len(weights) != len(scales):
        raise InputError(f"{where}.weights", f"{len(weights)} weights for {len(scales)} scales")
    return MultiScaleLoss(base, scales, balance, weights, float(s["alpha"]), float(s["lr"]))


# The STRank authors' settings: lists are slides; their pairwise loss adds the entropy term (pi_prior) with
# weight 1, their listwise loss has none.
_STRANK_SETTINGS = {"list_scope": "slide", "seed": 0, "library_offset": True}
LOSSES = {
    "poisson": LossSpec(lambda s, g, w: PoissonLoss(), PoissonLoss.output),
    "mse": LossSpec(lambda s, g, w: MSELoss(), MSELoss.output),
    "mse_log1p": LossSpec(lambda s, g, w: MSELog1pLoss(), MSELog1pLoss.output),
    "nb": LossSpec(_nb, NegativeBinomialLoss.output, {"log_dispersion": 0.0}),
    "strank_pair": LossSpec(_strank("pair"), STRankLoss.output, {**_STRANK_SETTINGS, "entropy_weight": 1.0}),
    "strank_list": LossSpec(_strank("list"), STRankLoss.output, {**_STRANK_SETTINGS, "entropy_weight": 0.0}),
    "multiscale": LossSpec(
        _multiscale,
        None,
        {"base": "poisson", "scales": [1, 2, 4, 8], "balance": "gradnorm", "weights": None, "alpha": 1.5, "lr": 0.025},
    ),
}


def _choice(cfg, key, options, where):
    if cfg.get(key) not in options:
        raise InputError(f"{where}.{key}", f"{cfg.get(key)!r} is not one of {list(options)}")
    return cfg[key]


def loss_settings(cfg, where="loss"):
    """A loss config with every setting filled from the registry's defaults; unknown keys refused.

    A multiscale loss also takes its base loss's settings.
    """
    cfg = dict(cfg or {})
    name = _choice(cfg, "name", LOSSES, where)
    allowed = dict(LOSSES[name].settings)
    if name == "multiscale":
        base = _choice({"base": cfg.get("base", "poisson")}, "base", [n for n in LOSSES if n != "multiscale"], where)
        allowed.update(LOSSES[base].settings)
    unknown = sorted(set(cfg) - set(allowed) - {"name"})
    if unknown:
        raise InputError(f"{where}.{unknown[0]}", f"unknown setting for loss {name!r}; allowed: {sorted(allowed)}")
    return {**LOSSES[name].settings, **cfg}


def loss_output(cfg, where="loss"):
    """The decoder output space a loss config needs (``log_rate``, ``softplus`` or ``score``)."""
    s = loss_settings(cfg, where)
    spec = LOSSES[s["name"]]
    return spec.output if spec.output is not None else loss_output({"name": s["base"]}, where)


def build_loss(cfg, n_genes=None, where="loss"):
    """Build a loss from its config ``{"name": <a key of LOSSES>, <its settings>...}``.

    Parameters
    ----------
    cfg
        The loss config; see :data:`LOSSES` for each loss's settings and defaults.
    n_genes
        Number of genes (needed by nb, for its per-gene dispersions).
    where
        Config key named in error messages.

    Returns
    -------
    torch.nn.Module
        Called as ``loss(out, target, mask, slide=None) -> scalar``; ``loss.output`` names the
        decoder output it expects. Put ``loss.parameters()`` in the optimizer (nb has some).
    """
    s = loss_settings(cfg, where)
    return LOSSES[s["name"]].build(s, n_genes, where)
