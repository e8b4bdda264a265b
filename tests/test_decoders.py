"""Decoders: shapes for 14x14 and 16x16 token grids, output heads, overfitting one tile, sizes."""

import math

import pytest
import torch
import torch.nn.functional as F

from sparsitytrap.decoders import build_decoder, count_parameters, knn_grid, to_rate
from sparsitytrap.errors import InputError

TINY = {
    "hist2st": {
        "hidden": 16,
        "n_transformer_layers": 1,
        "n_heads": 2,
        "ff_dim": 32,
        "n_graph_layers": 1,
        "k": 8,
        "dropout": 0.0,
    },
    "img2st": {"width": 16},
}


@pytest.mark.parametrize("name", ["hist2st", "img2st"])
@pytest.mark.parametrize("h", [14, 16])
def test_output_shape(name, h):
    torch.manual_seed(0)
    dec = build_decoder(name, 24, 5, **TINY[name])
    out = dec(torch.randn(2, 24, h, h))
    assert out.shape == (2, 5, 128, 128)
    small = build_decoder(name, 24, 5, out_size=64, **TINY[name])
    assert small(torch.randn(1, 24, h, h)).shape == (1, 5, 64, 64)


@pytest.mark.parametrize("name", ["hist2st", "img2st"])
def test_output_heads(name):
    torch.manual_seed(0)
    tokens = torch.randn(1, 8, 16, 16)
    log_rate = build_decoder(name, 8, 3, output="log_rate", **TINY[name])
    assert torch.all(log_rate.head.conv.bias == -3.0)
    softplus = build_decoder(name, 8, 3, output="softplus", **TINY[name]).eval()
    assert softplus(tokens).min() >= 0
    s = torch.tensor([-1.0, 0.0, 25.0])
    torch.testing.assert_close(to_rate(s, "log_rate"), torch.exp(torch.tensor([-1.0, 0.0, 20.0])))
    torch.testing.assert_close(to_rate(s, "softplus"), s)
    with pytest.raises(InputError, match="output"):
        build_decoder(name, 8, 3, output="counts", **TINY[name])


def test_build_decoder_rejects_bad_names_and_widths():
    with pytest.raises(InputError, match="unknown decoder"):
        build_decoder("unet3", 8, 3)
    with pytest.raises(InputError, match="decoders.img2st"):
        build_decoder("img2st", 8, 3, hidden=4)


def test_knn_graph_of_grid():
    nb = knn_grid(16, 16, 8)
    assert nb.shape == (256, 8)
    # An interior cell's 8 nearest cells are its 3x3 neighbourhood.
    centre = 5 * 16 + 7
    expected = {(5 + di) * 16 + 7 + dj for di in (-1, 0, 1) for dj in (-1, 0, 1)} - {centre}
    assert set(nb[centre].tolist()) == expected
    assert not (nb == torch.arange(256)[:, None]).any()


def _structured_tile(d=16, n_genes=3, seed=0):
    """A fixed random token grid and Poisson counts from rates that depend on the tokens."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(1, d, 16, 16, generator=g)
    readout = torch.randn(n_genes, d, generator=g) / math.sqrt(d)
    log_rate = torch.einsum("gd,bdhw->bghw", readout, tokens)
    log_rate = F.interpolate(log_rate, size=(128, 128), mode="bilinear", align_corners=False)
    counts = torch.poisson(torch.exp(log_rate), generator=g)
    return tokens, log_rate, counts


def _poisson(s, y):
    return (torch.exp(s) - y * s).mean()


@pytest.fixture
def one_thread():
    # Small convolutions run faster on one thread than on two contended cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("name", "steps"), [("hist2st", 100), ("img2st", 200)])
def test_overfits_one_tile(name, steps, one_thread):
    torch.manual_seed(0)
    tokens, true_log_rate, counts = _structured_tile()
    widths = {**TINY[name], "hidden": 32} if name == "hist2st" else TINY[name]
    dec = build_decoder(name, 16, 3, **widths)
    opt = torch.optim.Adam(dec.parameters(), lr=5e-3)
    oracle = _poisson(true_log_rate, counts).item()
    start = _poisson(dec(tokens), counts).item() - oracle
    for _ in range(steps):
        opt.zero_grad()
        loss = _poisson(dec(tokens), counts)
        loss.backward()
        opt.step()
    end = _poisson(dec(tokens), counts).item() - oracle
    # Excess over the true rates: starts large, falls by more than 10x (it may go below 0).
    assert start > 1.0
    assert end < start / 10, (start, end)


def test_parameter_counts_at_seed_sizes():
    with torch.device("meta"):  # shapes only: no memory, no time
        hist2st = build_decoder("hist2st", 1280, 50)
        img2st = build_decoder("img2st", 1280, 50)
    n_hist2st, n_img2st = count_parameters(hist2st), count_parameters(img2st)
    print(f"Hist2ST {n_hist2st / 1e6:.1f}M, Img2ST {n_img2st / 1e6:.1f}M parameters")
    assert 30e6 < n_hist2st < 50e6  # seeds: ~45M
    assert 17e6 < n_img2st < 22e6  # seeds: ~19M
