"""Decoders from a token grid ``[B, D, h, w]`` to gene maps ``[B, G, 128, 128]``.

Two families, as in the seeds: a Hist2ST-style decoder (CNN + Transformer + graph paths, fused,
then upsampled) and an Img2ST-style MiniUNet. Both end in a 1x1 head whose output space is named
by ``output``:

- ``"log_rate"``: raw log-rate (Poisson, NB, multi-scale losses); head bias starts at -3.0
  (rate 0.05); clamping happens in the loss and in `to_rate`;
- ``"softplus"``: non-negative rate (MSE losses), Softplus applied in the forward;
- ``"score"``: unnormalised ranking score (STRank losses).
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from sparsitytrap.errors import InputError

OUTPUTS = ("log_rate", "softplus", "score")
MAX_LOG_RATE = 20.0  # exp(20) ~ 5e8 counts: far above any bin, far below float32 overflow


def to_rate(out, output):
    """Convert a decoder output to a non-negative rate (expected count per bin).

    Parameters
    ----------
    out
        Decoder output ``[B, G, H, W]``.
    output
        The decoder's output space: ``"log_rate"``, ``"softplus"`` or ``"score"``.

    Returns
    -------
    torch.Tensor
        ``exp(clamp(out, max=20))`` for log-rates and scores, ``out`` for softplus outputs.
    """
    if output == "softplus":
        return out
    if output in ("log_rate", "score"):
        return torch.exp(out.clamp(max=MAX_LOG_RATE))
    raise InputError("output", f"unknown decoder output {output!r}; known: {OUTPUTS}")


class TokenStandardizer(nn.Module):
    """Per-channel standardisation of the token grid with the training tiles' mean and std.

    Buffers (saved with the weights): training sets them once from the training tokens
    (:func:`sparsitytrap.training.job.training_statistics`), prediction reuses them; the start is the
    identity. It removes the offset all tokens of a channel share and brings every channel to unit spread.
    """

    def __init__(self, dim):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, tokens):
        return (tokens - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


class _Head(nn.Module):
    """1x1 convolution to genes, with the output space's activation and bias start."""

    def __init__(self, in_ch, n_genes, output, bias):
        super().__init__()
        if output not in OUTPUTS:
            raise InputError("output", f"unknown decoder output {output!r}; known: {OUTPUTS}")
        self.output = output
        self.conv = nn.Conv2d(in_ch, n_genes, 1)
        if bias is None and output == "log_rate":
            bias = -3.0  # rate 0.05 per 2 um bin: near the seeds' mean, so early exp() is tame
        if bias is not None:
            nn.init.constant_(self.conv.bias, float(bias))

    def forward(self, x):
        x = self.conv(x)
        return F.softplus(x) if self.output == "softplus" else x


def _upsample_stage(in_ch, out_ch, block):
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), block(in_ch, out_ch))


def _gelu_conv(in_ch, out_ch):
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.GELU())


def _conv_block(in_ch, out_ch):
    """2 x (3x3 conv + BatchNorm + ReLU), the MiniUNet block."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


def _check_out_size(out_size):
    if out_size % 8:
        raise InputError("decoder.out_size", f"{out_size} is not divisible by 8 (three x2 upsamplings)")
    return out_size // 8


def _resize(x, size):
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def sincos_2d(h, w, dim, device=None):
    """Fixed 2-D sine-cosine positions ``[h*w, dim]`` (half the channels per axis).

    Fixed rather than learned so that one decoder accepts any grid size (14 or 16 tokens).
    """
    if dim % 4:
        raise InputError("decoder.hidden", f"{dim} must be divisible by 4 for 2-D positions")
    quarter = dim // 4
    freq = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=device) / quarter)
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    parts = []
    for pos in (rows.flatten(), cols.flatten()):
        angle = pos[:, None].float() * freq[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1)


def knn_grid(h, w, k):
    """Indices ``[h*w, k]`` of the k nearest other cells of an h x w grid (ties by index)."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], 1).float()
    dist = torch.cdist(pos, pos)
    dist.fill_diagonal_(float("inf"))
    k = min(k, h * w - 1)
    # A stable sort makes the tie-breaking (and so the graph) deterministic.
    return torch.sort(dist, dim=1, stable=True).indices[:, :k]


class GraphSAGELayer(nn.Module):
    """Mean aggregation over neighbours, concatenated with the node, linear, GELU, residual."""

    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, neighbours):
        # x [B, N, C]; neighbours [N, k] -> neighbour mean [B, N, C]
        x_norm = self.norm(x)
        agg = x_norm[:, neighbours].mean(dim=2)
        return x + F.gelu(self.linear(torch.cat([x_norm, agg], dim=-1)))


class Hist2STDecoder(nn.Module):
    """Hist2ST-style decoder: CNN, Transformer and kNN-graph paths over the token grid.

    Parameters
    ----------
    in_dim
        Token width D (1280 for Virchow2).
    n_genes
        Number of genes G.
    hidden
        Width of the Transformer and graph paths, of the fusion and of the first upsampling.
    cnn_dims
        Output widths of the 3x3 convolutions of the CNN path; default
        ``(2 * hidden, hidden, hidden // 2)`` (1024, 512, 256 at the seeds' sizes).
    n_transformer_layers, n_heads, ff_dim, dropout
        Transformer path.
    n_graph_layers, k
        Graph path: GraphSAGE-like layers on the k-nearest-neighbour graph of grid cells.
    output
        ``"log_rate"``, ``"softplus"`` or ``"score"``.
    head_bias
        Initial head bias; None: -3.0 for log-rates, PyTorch's default otherwise.
    out_size
        Output side in bins (divisible by 8).
    """

    def __init__(
        self,
        in_dim,
        n_genes,
        hidden=512,
        cnn_dims=None,
        n_transformer_layers=4,
        n_heads=8,
        ff_dim=2048,
        dropout=0.1,
        n_graph_layers=3,
        k=8,
        output="log_rate",
        head_bias=None,
        out_size=128,
    ):
        super().__init__()
        if hidden % n_heads:
            raise InputError("decoder.n_heads", f"hidden {hidden} is not divisible by n_heads {n_heads}")
        self.hidden, self.k, self.output = hidden, k, output
        self.start = _check_out_size(out_size)
        self.token_norm = TokenStandardizer(in_dim)
        cnn_dims = tuple(cnn_dims or (2 * hidden, hidden, hidden // 2))
        widths = (in_dim, *cnn_dims)
        self.cnn = nn.Sequential(*[_gelu_conv(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.token_proj = nn.Linear(in_dim, hidden)
        layer = nn.TransformerEncoderLayer(
            hidden, n_heads, ff_dim, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, n_transformer_layers, enable_nested_tensor=False)
        self.graph_proj = nn.Linear(in_dim, hidden)
        self.graph = nn.ModuleList([GraphSAGELayer(hidden) for _ in range(n_graph_layers)])
        self.fuse = nn.Sequential(nn.Conv2d(cnn_dims[-1] + 2 * hidden, hidden, 1), nn.GELU())
        up = (hidden, hidden // 2, hidden // 4, hidden // 8)
        self.upsample = nn.Sequential(*[_upsample_stage(a, b, _gelu_conv) for a, b in zip(up[:-1], up[1:])])
        self.head = _Head(up[-1], n_genes, output, head_bias)
        self._neighbours = {}

    def neighbours(self, h, w, device):
        """kNN index of an h x w token grid, built once per grid size and device."""
        key = (h, w, str(device))
        if key not in self._neighbours:
            self._neighbours[key] = knn_grid(h, w, self.k).to(device)
        return self._neighbours[key]

    def forward(self, tokens):
        """Map a token grid ``[B, D, h, w]`` to ``[B, G, out_size, out_size]``."""
        b, _, h, w = tokens.shape
        tokens = self.token_norm(tokens)
        seq = tokens.flatten(2).transpose(1, 2)  # [B, h*w, D]
        cnn = self.cnn(tokens)
        trans = self.transformer(self.token_proj(seq) + sincos_2d(h, w, self.hidden, tokens.device).to(seq.dtype))
        graph = self.graph_proj(seq)
        nb = self.neighbours(h, w, tokens.device)
        for layer in self.graph:
            graph = layer(graph, nb)
        grid = torch.cat([t.transpose(1, 2).reshape(b, self.hidden, h, w) for t in (trans, graph)], dim=1)
        fused = self.fuse(torch.cat([cnn, grid], dim=1))
        return self.head(self.upsample(_resize(fused, self.start)))

    def shared_parameters(self):
        """The last layer shared by all genes and scales (GradNorm takes gradients here)."""
        return [self.head.conv.weight]


class Img2STDecoder(nn.Module):
    """Img2ST-style MiniUNet: 1x1 projection, a two-level U-Net, three x2 upsampling blocks.

    Parameters
    ----------
    in_dim
        Token width D.
    n_genes
        Number of genes G.
    width
        U-Net width (512 at the seeds' size); the upsampling blocks use width/2, /4, /8.
    output, head_bias, out_size
        As for `Hist2STDecoder`.
    """

    def __init__(self, in_dim, n_genes, width=512, output="log_rate", head_bias=None, out_size=128):
        super().__init__()
        self.output = output
        self.start = _check_out_size(out_size)
        self.token_norm = TokenStandardizer(in_dim)
        self.proj = nn.Conv2d(in_dim, width, 1)
        self.enc1 = _conv_block(width, width)
        self.enc2 = _conv_block(width, width)
        self.dec = _conv_block(2 * width, width)
        up = (width, width // 2, width // 4, width // 8)
        self.upsample = nn.Sequential(*[_upsample_stage(a, b, _conv_block) for a, b in zip(up[:-1], up[1:])])
        self.head = _Head(up[-1], n_genes, output, head_bias)

    def forward(self, tokens):
        """Map a token grid ``[B, D, h, w]`` to ``[B, G, out_size, out_size]``."""
        x = _resize(self.proj(self.token_norm(tokens)), self.start)  # 14x14 grids are brought to out_size/8
        skip = self.enc1(x)
        deep = self.enc2(F.max_pool2d(skip, 2))
        deep = F.interpolate(deep, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        x = self.dec(torch.cat([deep, skip], dim=1))
        return self.head(self.upsample(x))

    def shared_parameters(self):
        """The last layer shared by all genes and scales (GradNorm takes gradients here)."""
        return [self.head.conv.weight]


#: Every decoder once: config name -> class. A decoder's settings are its constructor's keyword
#: arguments (``decoders.<name>`` and a model's ``decoder_kwargs``), checked by `check_decoder`.
DECODERS = {"hist2st": Hist2STDecoder, "img2st": Img2STDecoder}
#: Constructor arguments the workflow sets itself (from the encoder, the genes and the loss).
_SET_BY_WORKFLOW = ("in_dim", "n_genes", "output")


def decoder_settings(name):
    """The settings a decoder accepts, with their defaults: its constructor's keyword arguments."""
    params = inspect.signature(DECODERS[name]).parameters
    return {k: p.default for k, p in params.items() if k not in _SET_BY_WORKFLOW}


def check_decoder(name, kwargs, where="decoder"):
    """Refuse an unknown decoder or setting, naming the config key (no model is built)."""
    if name not in DECODERS:
        raise InputError(where, f"unknown decoder {name!r}; known: {sorted(DECODERS)}")
    allowed = decoder_settings(name)
    for key in kwargs:
        if key not in allowed:
            raise InputError(f"{where}.{key}", f"unknown setting for decoder {name!r}; allowed: {sorted(allowed)}")


def build_decoder(name, in_dim, n_genes, output="log_rate", **widths):
    """Build a decoder by name.

    Parameters
    ----------
    name
        A key of :data:`DECODERS`.
    in_dim
        Token width of the encoder.
    n_genes
        Number of genes.
    output
        ``"log_rate"``, ``"softplus"`` or ``"score"`` (the loss's ``output``).
    **widths
        Settings of the decoder (``hidden``, ``width``, ``out_size``, ...: :func:`decoder_settings`).

    Returns
    -------
    torch.nn.Module
    """
    check_decoder(name, widths, f"decoders.{name}")
    return DECODERS[name](int(in_dim), int(n_genes), output=output, **widths)


def count_parameters(module, trainable_only=False):
    """Number of parameters of `module` (only those with gradients if `trainable_only`)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
