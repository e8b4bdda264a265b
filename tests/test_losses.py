"""Losses against direct formulas, edge cases (no tissue, huge counts), STRank and GradNorm."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import nbinom

from sparsitytrap.bins import pool_mask, sum_pool
from sparsitytrap.errors import InputError
from sparsitytrap.losses import (
    GradNorm,
    MultiScaleLoss,
    PoissonLoss,
    STRankLoss,
    build_loss,
    draw_partners,
)
from sparsitytrap.training.data import TileDataset, batches

ALL = ["poisson", "mse", "mse_log1p", "nb", "strank_pair", "strank_list", "multiscale"]
ONE_SLIDE = torch.zeros(2, dtype=torch.long)  # slide ids of a _batch(): STRank's default lists are slides


def _batch(b=2, g=3, h=8, seed=0, tissue=0.6, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    out = torch.randn(b, g, h, h, generator=gen)
    target = torch.poisson(torch.full((b, g, h, h), scale), generator=gen)
    mask = torch.rand(b, h, h, generator=gen) < tissue
    return out, target, mask


def _loss(name, n_genes=3):
    return build_loss({"name": name}, n_genes=n_genes)


def _prediction(out, loss):
    # MSE losses expect a Softplus output; feed them one.
    return torch.nn.functional.softplus(out) if loss.output == "softplus" else out


def _tissue_elements(out, target, mask):
    """(s, y) numpy arrays of every (tissue bin, gene) pair, by explicit loops."""
    s, y = [], []
    b_, g_, h_, w_ = out.shape
    for b in range(b_):
        for i in range(h_):
            for j in range(w_):
                if mask[b, i, j]:
                    for g in range(g_):
                        s.append(float(out[b, g, i, j]))
                        y.append(float(target[b, g, i, j]))
    return np.array(s), np.array(y)


def test_pointwise_losses_match_formulas():
    out, target, mask = _batch()
    s, y = _tissue_elements(out, target, mask)
    rate = np.log1p(np.exp(s))  # softplus
    expected = {
        "poisson": np.mean(np.exp(s) - y * s),
        "mse": np.mean((rate - y) ** 2),
        "mse_log1p": np.mean((np.log1p(rate) - np.log1p(y)) ** 2),
    }
    for name, value in expected.items():
        loss = _loss(name)
        assert loss(_prediction(out, loss), target, mask).item() == pytest.approx(value, rel=1e-5)


def test_poisson_clamps_log_rate_at_20():
    out = torch.full((1, 1, 2, 2), 30.0, requires_grad=True)
    target = torch.full((1, 1, 2, 2), 2.0)
    loss = PoissonLoss()(out, target, torch.ones(1, 2, 2, dtype=torch.bool))
    assert loss.item() == pytest.approx(math.exp(20) - 40, rel=1e-5)


def test_negative_binomial_matches_scipy():
    out, target, mask = _batch(g=3)
    loss = _loss("nb")
    with torch.no_grad():
        loss.log_dispersion.copy_(torch.tensor([-1.0, 0.0, 0.7]))
    nll = []
    for b in range(2):
        for g in range(3):
            alpha = math.exp(loss.log_dispersion[g].item())
            r = 1 / alpha
            for i, j in zip(*np.nonzero(mask[b].numpy())):
                mu = math.exp(float(out[b, g, i, j]))
                nll.append(-nbinom.logpmf(int(target[b, g, i, j]), r, r / (r + mu)))
    assert loss(out, target, mask).item() == pytest.approx(np.mean(nll), rel=1e-5)
    assert loss.log_dispersion.requires_grad and loss.output == "log_rate"


def _listwise_by_loops(out, target, mask, lists):
    """-y log softmax per gene over each list's tissue bins, with the library-size offset."""
    s = out.numpy() + np.log(target.numpy().mean(axis=1, keepdims=True) + 1e-6)
    y = target.numpy()
    total, count = 0.0, 0
    for items in lists:
        for g in range(out.shape[1]):
            logits = np.concatenate([s[b, g][mask[b].numpy()] for b in items])
            counts = np.concatenate([y[b, g][mask[b].numpy()] for b in items])
            if logits.size == 0:
                continue
            log_softmax = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
            total += -(counts * log_softmax).sum()
            count += logits.size
    return total / count


def test_listwise_strank_matches_loops():
    out, target, mask = _batch(b=3)
    tile = build_loss({"name": "strank_list", "list_scope": "tile"})
    expected = _listwise_by_loops(out, target, mask, [[0], [1], [2]])
    assert tile(out, target, mask).item() == pytest.approx(expected, rel=1e-5)
    slide = build_loss({"name": "strank_list", "list_scope": "slide"})
    expected = _listwise_by_loops(out, target, mask, [[0, 2], [1]])
    assert slide(out, target, mask, slide=["A", "B", "A"]).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="slide id"):
        slide(out, target, mask)


def test_pairwise_strank_matches_loops_for_two_bin_lists():
    # With exactly two tissue bins per tile, each bin's partner is the other one.
    out, target, _ = _batch(b=2, h=4)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 0, 1] = mask[0, 2, 3] = mask[1, 1, 1] = mask[1, 3, 0] = True
    s = out + torch.log(target.mean(1, keepdim=True) + 1e-6)
    rank, entropy = [], []
    for b in range(2):
        bins = list(zip(*np.nonzero(mask[b].numpy())))
        for anchor, partner in [(bins[0], bins[1]), (bins[1], bins[0])]:
            for g in range(3):
                pair = [float(s[b, g, *anchor]), float(s[b, g, *partner])]
                log_p = np.array(pair) - np.logaddexp(*pair)
                counts = [float(target[b, g, *anchor]), float(target[b, g, *partner])]
                rank += [-counts[0] * log_p[0], -counts[1] * log_p[1]]
                entropy += list(-np.exp(log_p) * log_p)
    plain = build_loss({"name": "strank_pair", "list_scope": "tile", "entropy_weight": 0.0})
    assert plain(out, target, mask).item() == pytest.approx(np.mean(rank), rel=1e-5)
    # the default: the authors' loss, rank term + 1 x mean entropy; one slide per tile here
    authors = build_loss({"name": "strank_pair"})
    value = authors(out, target, mask, slide=[0, 1]).item()
    assert value == pytest.approx(np.mean(rank) + np.mean(entropy), rel=1e-5)
    half = build_loss({"name": "strank_pair", "entropy_weight": 0.5})(out, target, mask, slide=[0, 1]).item()
    assert half == pytest.approx(np.mean(rank) + 0.5 * np.mean(entropy), rel=1e-5)


def test_pair_default_is_the_authors_loss_function():
    # The authors' STRankLoss.forward on a stack [pairs, 2, genes] (naivete5656/STRank, loss_functions.py):
    # lpi = log_softmax(pred + log(mean_g count + 1e-6)) over the pair; loss = mean(-lpi count) + pi_prior,
    # pi_prior = -mean(exp(lpi) lpi). Ours pairs each bin with a drawn other bin (draw_partners, seed 0).
    out, target, mask = _batch(b=1, g=4, h=6)
    ours = build_loss({"name": "strank_pair"})(out, target, mask, slide=[0]).item()
    tissue = mask[0].flatten()
    pred = out[0].reshape(4, -1)[:, tissue].T  # [n, G], bins in row-major order as the loss takes them
    count = target[0].reshape(4, -1)[:, tissue].T
    partner = draw_partners(len(pred), torch.Generator().manual_seed(0))
    stack_pred, stack_count = torch.stack([pred, pred[partner]], 1), torch.stack([count, count[partner]], 1)
    lpi = torch.log_softmax(stack_pred + (stack_count.mean(-1, keepdim=True) + 1e-6).log(), dim=-2)
    theirs = torch.mean(-lpi * stack_count) + -(torch.exp(lpi) * lpi).mean()
    assert ours == pytest.approx(theirs.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["strank_list", "strank_pair"])
def test_per_tile_offsets_are_seen_by_slide_lists_only(name):
    # A per-tile (and per-gene) offset of the scores: invisible to a softmax within one tile, not to
    # one over a slide's tiles. So only slide lists can learn tiles' levels relative to each other.
    out, target, mask = _batch(b=4, g=3, h=8, tissue=0.8)
    offsets = 3 * torch.randn(4, 3, 1, 1, generator=torch.Generator().manual_seed(9))
    slides = torch.tensor([0, 0, 1, 1])

    def value(scope, x):  # a fresh loss each call: the same pair partners
        return build_loss({"name": name, "list_scope": scope})(x, target, mask, slide=slides).item()

    assert value("tile", out + offsets) == pytest.approx(value("tile", out), rel=1e-5)
    assert abs(value("slide", out + offsets) - value("slide", out)) > 0.05 * abs(value("slide", out))
    # and the slide-scope gradient pulls the offsets back: it is not zero along them
    x = (out + offsets).requires_grad_(True)
    build_loss({"name": name})(x, target, mask, slide=slides).backward()
    assert x.grad.sum(dim=(2, 3)).abs().max() > 1e-3


def test_slide_scope_batches_hold_one_slide():
    # A slide-scope loss asks the trainer for batches of one slide; a batch of two of its tiles is one list.
    assert build_loss({"name": "strank_list"}).batches_by_slide
    assert build_loss({"name": "multiscale", "base": "strank_pair"}).batches_by_slide
    assert not build_loss({"name": "strank_list", "list_scope": "tile"}).batches_by_slide
    dataset = TileDataset([(0, "a.zarr", None, [0, 1, 2]), (1, "b.zarr", None, [0, 1, 2, 3, 4])])
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(1))
    keys = [(int(i), 0) for i in order]
    plain = batches(dataset, keys, 2)
    assert [k for b in plain for k in b] == keys and max(map(len, plain)) == 2
    drawn = batches(dataset, keys, 2, by_slide=True, generator=torch.Generator().manual_seed(2))
    assert sorted(k for b in drawn for k in b) == sorted(keys) and max(map(len, drawn)) == 2
    assert all(len({dataset.slide_of(i) for i, _ in b}) == 1 for b in drawn)
    assert len(drawn) == 5  # 2 + 1 for slide 0's three tiles, 2 + 2 + 1 for slide 1's five
    again = batches(dataset, keys, 2, by_slide=True, generator=torch.Generator().manual_seed(2))
    assert drawn == again  # seeded
    # validation: the keys in dataset order and no generator; the batches keep that order
    in_order = batches(dataset, [(i, 0) for i in range(len(dataset))], 2, by_slide=True)
    assert in_order == [[(0, 0), (1, 0)], [(2, 0)], [(3, 0), (4, 0)], [(5, 0), (6, 0)], [(7, 0)]]


def test_partners_are_other_members_and_reproducible():
    gen = torch.Generator().manual_seed(3)
    partners = draw_partners(50, gen)
    assert not (partners == torch.arange(50)).any() and partners.max() < 50 and partners.min() >= 0
    assert len(set(partners.tolist())) > 20  # not a fixed shift
    assert torch.equal(draw_partners(50, torch.Generator().manual_seed(3)), partners)
    out, target, mask = _batch()
    a = build_loss({"name": "strank_pair", "seed": 5})(out, target, mask, ONE_SLIDE)
    b = build_loss({"name": "strank_pair", "seed": 5})(out, target, mask, ONE_SLIDE)
    assert a.item() == b.item()


def test_pair_strank_is_the_count_weighted_logistic_rank_loss():
    # Binomial NLL of a pair == y_i softplus(s_j - s_i) + y_j softplus(s_i - s_j), exactly; as the
    # score gap grows, it approaches the margin (hinge) form y_i relu(s_j - s_i) + y_j relu(s_i - s_j).
    loss = STRankLoss("pair", "tile", library_offset=False)
    mask = torch.ones(1, 1, 2, dtype=torch.bool)
    y = torch.tensor([[[[5.0, 2.0]]]])
    rel_gaps = []
    for gap in [0.5, 2.0, 8.0, 32.0]:
        s = torch.tensor([[[[gap / 2, -gap / 2]]]])
        value = loss(s, y, mask).item() * 4  # the mean runs over 2 anchors x 2 members
        logistic = 2 * (5 * math.log1p(math.exp(-gap)) + 2 * (gap + math.log1p(math.exp(-gap))))
        hinge = 2 * (5 * 0.0 + 2 * gap)
        assert value == pytest.approx(logistic, rel=1e-5)
        rel_gaps.append(abs(value - hinge) / value)
    assert all(a > b for a, b in zip(rel_gaps, rel_gaps[1:])) and rel_gaps[-1] < 1e-6


def test_listwise_strank_scale_invariance():
    # Scaling a slide's counts by c scales its loss and gradient by c; the optimum is unchanged.
    gen = torch.Generator().manual_seed(1)
    target = torch.poisson(torch.full((2, 3, 6, 6), 4.0), generator=gen) + 1  # y > 0: log(y) exists
    mask = torch.rand(2, 6, 6, generator=gen) < 0.7
    loss = build_loss({"name": "strank_list", "list_scope": "slide"})
    slide = ["A", "A"]

    def value_and_grad(out, y):
        out = out.clone().requires_grad_(True)
        value = loss(out, y, mask, slide)
        value.backward()
        return value.item(), out.grad

    out = torch.randn(2, 3, 6, 6, generator=gen)
    c = 7.0
    v1, g1 = value_and_grad(out, target)
    vc, gc = value_and_grad(out, c * target)
    assert vc == pytest.approx(c * v1, rel=1e-4)
    torch.testing.assert_close(gc, c * g1, rtol=1e-4, atol=1e-6)
    # The analytic optimum: softmax(s + offset) = y / sum(y) per gene over the slide's bins.
    offset = torch.log(target.mean(1, keepdim=True) + 1e-6)
    optimum = torch.log(target) - offset
    for y in (target, c * target):
        _, grad = value_and_grad(optimum, y)
        assert grad.abs().max() < 1e-5
    _, grad = value_and_grad(optimum + 0.3 * torch.randn(2, 3, 6, 6, generator=gen), target)
    assert grad.abs().max() > 1e-3  # the zero gradient above is not trivial


def test_slide_scope_keeps_slides_apart():
    out, target, mask = _batch(b=2)
    loss = build_loss({"name": "strank_list", "list_scope": "slide"})
    scaled = target.clone()
    scaled[1] *= 10  # slide B's counts only

    def grad(y):
        x = out.clone().requires_grad_(True)
        loss(x, y, mask, ["A", "B"]).backward()
        return x.grad

    g1, g10 = grad(target), grad(scaled)
    # The loss is a mean over all tissue bins: slide A's gradient is untouched, slide B's x 10.
    torch.testing.assert_close(g10[0], g1[0])
    torch.testing.assert_close(g10[1], 10 * g1[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_all_zero_targets(name):
    out, target, mask = _batch()
    loss = _loss(name)
    x = _prediction(out, loss).detach().requires_grad_(True)
    value = loss(x, torch.zeros_like(target), mask, ONE_SLIDE)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()
    if name == "strank_list":
        assert value.item() == 0.0  # no counts, no ranking information
    if name == "strank_pair":  # no counts: only the entropy term is left
        assert value.item() > 0
        plain = build_loss({"name": name, "entropy_weight": 0.0})
        assert plain(x, torch.zeros_like(target), mask, ONE_SLIDE).item() == 0.0


@pytest.mark.parametrize("name", ALL)
def test_no_tissue_gives_zero_with_grad(name):
    out, target, _ = _batch()
    loss = _loss(name)
    x = _prediction(out, loss).detach().requires_grad_(True)
    value = loss(x, target, torch.zeros(2, 8, 8, dtype=torch.bool), ONE_SLIDE)
    assert value.item() == 0.0 and value.grad_fn is not None
    value.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("name", ALL)
def test_very_large_counts_are_finite(name):
    out, target, mask = _batch()
    loss = _loss(name)
    x = _prediction(out, loss).detach().requires_grad_(True)
    value = loss(x, torch.full_like(target, 1e6), mask, ONE_SLIDE)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_multiscale_per_scale_losses_match_formula():
    out, target, mask = _batch(h=8)
    loss = build_loss({"name": "multiscale", "scales": [1, 2, 4], "balance": "fixed", "weights": [1.0, 0.5, 0.25]})
    assert isinstance(loss, MultiScaleLoss) and loss.output == "log_rate"
    per_scale = loss.per_scale(out, target, mask)
    for k, value in zip((1, 2, 4), per_scale):
        # Coarse bin = sum over its tissue fine bins, of the rates and of the counts.
        m = mask[:, None].float()
        rate = sum_pool(torch.exp(out) * m, k)
        counts = sum_pool(target * m, k)
        coarse = pool_mask(mask, k)
        s, y = _tissue_elements(torch.log(rate), counts, coarse)
        floor = y - y * np.log(np.where(y > 0, y, 1))  # Poisson loss at rate = y
        assert value.item() == pytest.approx(np.mean(np.exp(s) - y * s - floor), rel=1e-4)
        assert value.item() > 0
    assert loss(out, target, mask).item() == pytest.approx(
        float((torch.tensor([1, 0.5, 0.25]) * per_scale).sum()), rel=1e-6
    )


def test_gradnorm_raises_the_weight_of_the_slower_task():
    # Two tasks on one shared layer: a steep one (learns fast) and a shallow one (learns slowly).
    w = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.02)
    gradnorm = GradNorm(2, alpha=1.5, lr=0.025)
    for _ in range(100):
        losses = torch.stack([10 * (w[0] - 1) ** 2, 0.2 * (w[1] - 1) ** 2])
        total = gradnorm.step(losses, [w])
        opt.zero_grad()
        total.backward()
        opt.step()
        assert gradnorm.weights.sum().item() == pytest.approx(2.0, rel=1e-5)
    slow, fast = gradnorm.weights[1].item(), gradnorm.weights[0].item()
    assert slow > 1.2 > 0.8 > fast, gradnorm.weights
    # Its state round-trips (for checkpoints).
    other = GradNorm(2)
    other.load_state_dict(gradnorm.state_dict())
    assert torch.equal(other.weights.detach(), gradnorm.weights.detach())


def test_multiscale_gradnorm_interface():
    torch.manual_seed(0)
    head = torch.nn.Conv2d(4, 3, 1)
    features = torch.randn(2, 4, 8, 8)
    _, target, mask = _batch(h=8)
    loss = build_loss({"name": "multiscale", "scales": [1, 2, 4, 8]})
    assert loss.needs_shared_params
    losses = loss.per_scale(head(features), target, mask)
    total = loss.combine(losses, [head.weight])
    total.backward()
    assert head.weight.grad is not None
    assert not torch.equal(loss.weights, torch.ones(4))  # the weights moved
    assert loss.weights.sum().item() == pytest.approx(4.0, rel=1e-5)
    state = loss.state_dict()
    fresh = build_loss({"name": "multiscale", "scales": [1, 2, 4, 8]})
    fresh.load_state_dict(state)
    assert torch.equal(fresh.weights, loss.weights)


def test_build_loss_outputs_and_errors():
    outputs = {n: _loss(n).output for n in ALL}
    assert outputs == {
        "poisson": "log_rate", "mse": "softplus", "mse_log1p": "softplus", "nb": "log_rate",
        "strank_pair": "score", "strank_list": "score", "multiscale": "log_rate",
    }  # fmt: skip
    assert build_loss({"name": "multiscale", "base": "mse"}).output == "softplus"
    with pytest.raises(InputError, match="loss.name"):
        build_loss({"name": "huber"})
    with pytest.raises(InputError, match="loss.list_scope: unknown setting"):
        build_loss({"name": "poisson", "list_scope": "tile"})
    with pytest.raises(InputError, match="loss.scals: unknown setting for loss 'multiscale'"):
        build_loss({"name": "multiscale", "scals": [1, 2]})
    with pytest.raises(InputError, match="loss.list_scope"):
        build_loss({"name": "strank_list", "list_scope": "patient"})
    for bad in (-1.0, "1", True, float("nan"), None):
        with pytest.raises(InputError, match="loss.entropy_weight"):
            build_loss({"name": "strank_pair", "entropy_weight": bad})
    with pytest.raises(InputError, match="loss.entropy_weight: unknown setting"):
        build_loss({"name": "poisson", "entropy_weight": 1.0})
    with pytest.raises(InputError, match="loss.weights"):
        build_loss({"name": "multiscale", "balance": "fixed", "weights": [1, 2]})
    with pytest.raises(InputError, match="number of genes"):
        build_loss({"name": "nb"})


def test_registry_declares_each_loss_output_and_settings():
    from sparsitytrap.losses import LOSSES, loss_output, loss_settings

    assert sorted(LOSSES) == sorted(ALL)
    for name, spec in LOSSES.items():
        built = _loss(name)
        assert loss_output({"name": name}) == built.output  # declared before building = built
        assert loss_settings({"name": name}) == {"name": name, **spec.settings}
    assert loss_output({"name": "multiscale", "base": "strank_list"}) == "score"
    # a multiscale loss takes its base's settings, with their defaults
    assert (
        build_loss({"name": "multiscale", "base": "nb", "log_dispersion": -1.0}, n_genes=3).base.log_dispersion[0]
        == -1.0
    )


def test_floors_are_the_loss_of_a_perfect_prediction():
    out, target, mask = _batch()
    poisson = _loss("poisson")
    perfect = torch.log(target.clamp(min=1e-30))
    assert poisson.floor(target, mask).item() == pytest.approx(poisson(perfect, target, mask).item(), rel=1e-5)
    assert poisson.floor(target, mask).item() < 0  # why multiscale subtracts it before GradNorm
    nb = _loss("nb")
    assert nb.floor(target, mask).item() == pytest.approx(nb(perfect, target, mask).item(), rel=1e-5)
    assert nb.floor(target, mask).item() < nb(out, target, mask).item()


@pytest.mark.parametrize("base", ["mse", "nb", "strank_list"])
def test_multiscale_with_other_bases(base):
    out, target, mask = _batch(h=8)
    loss = build_loss({"name": "multiscale", "base": base, "balance": "fixed"}, n_genes=3)
    x = _prediction(out, loss).detach().requires_grad_(True)
    per_scale = loss.per_scale(x, target, mask, ONE_SLIDE)
    assert per_scale.shape == (4,) and torch.isfinite(per_scale).all()
    loss(x, target, mask, ONE_SLIDE).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
