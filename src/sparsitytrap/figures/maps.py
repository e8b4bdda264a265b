"""Spatial panels read from the tile and prediction stores: whole-slide mosaics, rescue and multi-scale panels.

Stores are opened only through :mod:`sparsitytrap.stores`; bins are pooled only through
:mod:`sparsitytrap.bins`. Tiles are read one at a time.
"""

from pathlib import Path

import matplotlib as mpl
import numpy as np
import torch
from matplotlib.figure import Figure

from ..bins import pool_mask, sum_pool
from ..errors import InputError
from ..stores.predictions import open_predictions
from ..stores.tiles import open_tiles
from ._common import COUNT_SCALE, FORMATS, NA, metric_label, read_evaluations, relative_models, save, suptitle

GENES_KEY = "figures.mosaic_genes"
OFF_TISSUE = "lightgrey"
#: Top of a panel's own colour scale: this percentile of its tissue values (a few hot bins do not set it).
SCALE_PERCENTILE = 99


def gene_index(genes, gene, key=GENES_KEY, source="tile store"):
    """Channel of ``gene``; a gene not in the data raises :class:`InputError` naming it and the config key."""
    if gene not in genes:
        raise InputError(key, f"gene {gene!r} is not among the {len(genes)} genes of {source}")
    return list(genes).index(gene)


def _pool(x, mask, k):
    """Sum-pool a ``[H, W]`` map over tissue bins by ``k``; off-tissue (max-pooled mask) becomes NaN."""
    x, m = torch.from_numpy(np.asarray(x, dtype=np.float64)), torch.from_numpy(np.asarray(mask, dtype=bool))
    v = sum_pool(x * m, k).numpy()
    return np.where(pool_mask(m, k).numpy(), v, np.nan)


def _image_tile(image, px):
    from PIL import Image

    return np.asarray(Image.fromarray(np.asarray(image)).resize((px, px), Image.BILINEAR))


def _predictions(predictions, tiles, tiles_zarr):
    """Open each prediction store (name -> PredictionStore), checking tiles, genes and sample against the tiles.

    A model predicts its fold's genes, all among the tile store's (the union over folds).
    """
    out = {}
    n, _, side, _ = tiles.counts.shape
    for name, path in predictions.items():
        store = open_predictions(path)
        attrs = store.attrs
        if store.rates.shape[0] != n or tuple(store.rates.shape[2:]) != (side, side):
            raise InputError(path, f"rates {tuple(store.rates.shape)} do not match the {n} tiles of {tiles_zarr}")
        if not set(_genes(store, tiles)) <= set(tiles.genes):
            raise InputError(path, f"predicts genes that {tiles_zarr} does not hold")
        if attrs.get("sample") and tiles.sample and attrs["sample"] != tiles.sample:
            raise InputError(path, f"predicts sample {attrs['sample']!r}, not {tiles.sample!r}")
        out[name] = store
    return out


def _genes(store, tiles):
    """The genes a predictions store holds, in its channel order (old stores: the tile store's)."""
    return list(store.attrs.get("genes") or tiles.genes)


def _channel(store, tiles, gene, path):
    genes = _genes(store, tiles)
    if gene not in genes:
        raise InputError(path, f"gene {gene!r} was not predicted by this model (not among its fold's genes)")
    return genes.index(gene)


def _tile_rates(store, tiles, t, g):
    """2 µm rates of gene ``g`` on tile ``t``: cut from the seamless stitched map where the store has one.

    Tile by tile, each tile's rates carry the seams of tile-wise prediction; the stitched map
    (overlapping windows blended, :func:`sparsitytrap.predict.stitch`) has none.
    """
    if store.stitched is None:
        return store.rates[t, g]
    side = int(tiles.counts.shape[-1])
    r, c = (int(v) for v in np.asarray(tiles.bin_origin[t]) - store.attrs["stitched"]["origin"])
    return store.stitched[g, r : r + side, c : c + side]


def _scale(panels, shared, q=SCALE_PERCENTILE):
    """(vmin, vmax) per panel: 0 to the ``q``-th percentile of the tissue values, of all panels or of each.

    Where the percentile is 0 (a very sparse gene), the maximum; where everything is 0, 1.
    """

    def top(arrays):
        v = np.concatenate([a[np.isfinite(a)].ravel() for a in arrays])
        hi = float(np.percentile(v, q)) if v.size else 0.0
        hi = hi if hi > 0 else float(v.max(initial=0.0))
        return (0.0, hi if hi > 0 else 1.0)

    return [top(panels)] * len(panels) if shared else [top([p]) for p in panels]


def _show(ax, data, title, vlim=None, extent=None, cmap="magma"):
    cm = mpl.colormaps[cmap].with_extremes(bad=OFF_TISSUE)
    im = ax.imshow(
        data,
        cmap=cm,
        vmin=vlim[0] if vlim else None,
        vmax=vlim[1] if vlim else None,
        extent=extent,
        interpolation="nearest",
    )
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def _unit(name, um, relative):
    if name == "truth":
        return f"counts per {um:g} µm bin"
    return f"exp(score) per {um:g} µm bin (relative)" if name in relative else f"rate per {um:g} µm bin"


def _colorbar(fig, im, ax, label):
    bar = fig.colorbar(im, ax=ax, shrink=0.75, pad=0.02)
    bar.set_label(label, fontsize=7)
    bar.ax.tick_params(labelsize=7)
    return bar


def _draw_maps(fig, axes, maps, titles, shared, um, relative=(), extent=None):
    """Draw ``maps`` (name -> 2-D array) on ``axes``, each with its own colour scale and bar, or one shared.

    Per panel (the default): each map from 0 to its own 99th percentile, so a Poisson model's
    rates of ~0.05 show their structure beside counts and saturated MSE maps. Shared: the maps of
    counts and rates on one scale and one colour bar; a ranking model's relative scores
    (``relative``) always keep their own.
    """
    counted = [n for n in maps if n not in relative]
    vlims = dict(zip(counted, _scale([maps[n] for n in counted], shared)))
    ims = {}
    for ax, (name, data) in zip(axes, maps.items()):
        vlim = vlims[name] if name in vlims else _scale([data], False)[0]
        ims[name] = _show(ax, data, titles[name], vlim, extent)
        if not shared or name in relative:
            _colorbar(fig, ims[name], ax, _unit(name, um, relative))
    if shared and counted:
        shared_axes = [ax for ax, name in zip(axes, maps) if name in vlims]
        _colorbar(fig, ims[counted[-1]], shared_axes, f"counts and rates per {um:g} µm bin (one scale)")


def _scale_note(shared):
    return (
        "one colour scale shared by the panels"
        if shared
        else f"each panel its own scale (0 to its {SCALE_PERCENTILE}th percentile)"
    )


def _grid(n, max_cols=4):
    """(rows, cols) of a near-square grid of ``n`` panels, at most ``max_cols`` wide."""
    cols = min(max_cols, int(np.ceil(np.sqrt(n))))
    return int(np.ceil(n / cols)), cols


def mosaic(tiles_zarr, predictions, gene, out_prefix, shared_scale=False, pool=4, he_px=64, formats=FORMATS):
    """Whole-slide mosaic of one gene: H&E | truth | each model, tiles on their grid positions.

    Tiles are read one at a time. Expression is sum-pooled over ``pool x pool`` bins (counts
    and predicted rates alike; 4: 8 µm bins); off-tissue bins and grid cells without a tile are
    grey. A model's rates come from its seamless stitched map where its store has one (title
    "stitched"), else from its tiles. Each panel has its own colour scale and bar (0 to its 99th
    percentile of tissue values) unless ``shared_scale``; panels wrap onto a near-square grid of
    at most 4 columns.

    Parameters
    ----------
    tiles_zarr
        The test patient's tile store.
    predictions
        Model name -> ``predictions.zarr`` of the fold whose test patient is ``tiles_zarr``.
    gene
        Gene to draw (config ``figures.mosaic_genes``); not in the data: :class:`InputError`.
    out_prefix
        Output path without extension.
    shared_scale
        One colour scale for the truth and every model that predicts counts (config
        ``figures.shared_scale``), else one per panel.
    pool
        Display bin size in 2 µm bins.
    he_px
        Pixels per tile of the H&E panel.
    formats
        File formats.

    Returns
    -------
    matplotlib.figure.Figure
        ``fig.axes[0]`` is the H&E, ``fig.axes[1]`` the truth, then the models in order.
    """
    tiles = open_tiles(tiles_zarr)
    g = gene_index(tiles.genes, gene, source=str(tiles_zarr))
    preds = _predictions(predictions, tiles, tiles_zarr)
    channel = {name: _channel(store, tiles, gene, predictions[name]) for name, store in preds.items()}
    tb = int(tiles.counts.shape[-1])
    if tb % pool:
        raise InputError("pool", f"{pool} does not divide the tile size {tb}")
    grid = np.asarray(tiles.grid[:])
    rows, cols = (int(v) for v in tiles.attrs.get("grid_shape", grid.max(0) + 1))
    d = tb // pool
    he = np.full((rows * he_px, cols * he_px, 3), 211, np.uint8)  # lightgrey where no tile
    maps = {name: np.full((rows * d, cols * d), np.nan) for name in ["truth", *preds]}
    for t, (r, c) in enumerate(grid):
        m = np.asarray(tiles.mask[t])
        he[r * he_px : (r + 1) * he_px, c * he_px : (c + 1) * he_px] = _image_tile(tiles.images[t], he_px)
        maps["truth"][r * d : (r + 1) * d, c * d : (c + 1) * d] = _pool(tiles.counts[t, g], m, pool)
        for name, store in preds.items():
            rate = _tile_rates(store, tiles, t, channel[name])
            maps[name][r * d : (r + 1) * d, c * d : (c + 1) * d] = _pool(rate, m, pool)
    extent = (0, cols, rows, 0)
    relative = {n for n, store in preds.items() if store.relative}
    stitched = {n for n, store in preds.items() if store.stitched is not None}
    n_rows, n_cols = _grid(len(maps) + 1)
    panel = 2.8
    fig = Figure(
        figsize=(n_cols * (panel + 0.9), n_rows * (panel * rows / max(cols, 1) + 0.5) + 0.7), layout="constrained"
    )
    axes = list(fig.subplots(n_rows, n_cols, squeeze=False).ravel())
    for spare in axes[len(maps) + 1 :]:
        fig.delaxes(spare)
    axes[0].imshow(he, extent=extent)
    axes[0].set_title("H&E", fontsize=9)
    axes[0].set_xticks([]), axes[0].set_yticks([])
    titles = {
        n: n + (" (relative scores)" if n in relative else "") + (" (stitched)" if n in stitched else "") for n in preds
    }
    titles = {"truth": "truth (counts)", **titles}
    _draw_maps(fig, axes[1 : len(maps) + 1], maps, titles, shared_scale, 2 * pool, relative, extent)
    suptitle(
        fig,
        f"{gene}, sample {tiles.sample}: {2 * pool:g} µm bins; {_scale_note(shared_scale)}; grey: off tissue",
        fontsize=10,
    )
    save(fig, out_prefix, formats)
    return fig


def _tile_totals(tiles):
    """Masked total count per (tile, gene), read tile by tile: ``[T, G]``."""
    counts, mask = tiles.counts, tiles.mask
    return np.stack([(np.asarray(counts[t]) * np.asarray(mask[t])[None]).sum((1, 2)) for t in range(counts.shape[0])])


def _na_figure(message, out_prefix, formats):
    """A figure that says why there is nothing to draw (n/a), instead of a misleading one."""
    fig = Figure(figsize=(8, 1.5), layout="constrained")
    fig.text(0.5, 0.5, message, ha="center", va="center", fontsize=10, wrap=True)
    save(fig, out_prefix, formats)
    return fig


def rescue_panels(
    tiles_zarr,
    eval_dir_a,
    eval_dir_b,
    pred_a,
    pred_b,
    out_prefix,
    top_k=4,
    metric="pcc_2um_pooled",
    pool=1,
    shared_scale=False,
    formats=FORMATS,
):
    """H&E, truth, model A, model B for the top-k genes by delta (B - A), each on the tile where it is most expressed.

    Each map has its own colour scale and bar (0 to its 99th percentile) unless ``shared_scale``
    (then truth and both models share one per gene, a ranking model keeping its own). A metric a
    ranking model has no value for (its SSIM) ranks nothing: the figure says "n/a".

    Parameters
    ----------
    tiles_zarr
        The fold's test patient tile store.
    eval_dir_a, eval_dir_b
        Evaluation folders of A and B on that fold (the delta is computed from their per-gene tables).
    pred_a, pred_b
        Their ``predictions.zarr``.
    out_prefix
        Output path without extension.
    top_k
        Number of genes (config ``figures.rescue_top_k``).
    metric
        Metric whose delta ranks the genes.
    pool
        Display bin size in 2 µm bins (1: native).
    shared_scale
        One colour scale per gene for truth and both models (config ``figures.shared_scale``).
    formats
        File formats.

    Returns
    -------
    matplotlib.figure.Figure
    """
    a, sa = read_evaluations([eval_dir_a])
    b, sb = read_evaluations([eval_dir_b])
    tiles = open_tiles(tiles_zarr)
    genes = tiles.genes
    for s in (*sa, *sb):
        if s.get("test_sample") != tiles.sample:
            raise InputError(s["dir"], f"evaluates sample {s.get('test_sample')!r}, not {tiles.sample!r}")
    na, nb = sa[0]["model"], sb[0]["model"]
    relative = relative_models(sa + sb)
    delta = b.set_index("gene")[metric] - a.set_index("gene")[metric]
    top = delta.dropna().sort_values(ascending=False, kind="stable").head(int(top_k))
    if top.empty and relative and metric in COUNT_SCALE:
        names = ", ".join(sorted(relative))
        return _na_figure(
            f"{NA}: {metric_label(metric)} needs counts; {names} gives relative scores", out_prefix, formats
        )
    if top.empty:
        raise InputError(eval_dir_b, f"no gene has a finite {metric} in both evaluations")
    preds = _predictions({na: pred_a, nb: pred_b}, tiles, tiles_zarr)
    totals = _tile_totals(tiles)
    fig = Figure(figsize=(4 * (3.3 if shared_scale else 3.7), 3.2 * len(top) + 0.6), layout="constrained")
    axes = fig.subplots(len(top), 4, squeeze=False)
    titles = {"truth": "truth (counts)", na: na, nb: nb}
    titles = {n: t + (" (relative scores)" if n in relative else "") for n, t in titles.items()}
    for row, (gene, dv) in zip(axes, top.items()):
        g = genes.index(gene)
        t = int(np.argmax(totals[:, g]))
        m = np.asarray(tiles.mask[t])
        maps = {"truth": _pool(tiles.counts[t, g], m, pool)} | {
            n: _pool(p.rates[t, _channel(p, tiles, gene, n)], m, pool) for n, p in preds.items()
        }
        row[0].imshow(np.asarray(tiles.images[t]))
        row[0].set_xticks([]), row[0].set_yticks([])
        row[0].set_title(
            f"{gene}: Δ = {dv:+.3f}\nH&E, tile {t} (grid {tuple(int(v) for v in tiles.grid[t])})", fontsize=9
        )
        _draw_maps(fig, row[1:], maps, titles, shared_scale, 2 * pool, relative)
    suptitle(
        fig,
        f"Top {len(top)} genes by Δ {metric_label(metric)} ({nb} − {na}), fold {sa[0]['fold']}; "
        f"each on its tile with the most counts; {2 * pool:g} µm bins; {_scale_note(shared_scale)}",
        fontsize=10,
    )
    save(fig, out_prefix, formats)
    return fig


def multiscale_panels(
    tiles_zarr, pred_zarr, genes, out_prefix, model=None, genes_key=GENES_KEY, shared_scale=False, formats=FORMATS
):
    """Truth and prediction at 8, 4 and 2 µm for each gene, on the tile where the gene has the most counts.

    Parameters
    ----------
    tiles_zarr
        The fold's test patient tile store.
    pred_zarr
        ``predictions.zarr`` of the multi-scale model (config ``figures.multiscale_model``).
    genes
        Genes to draw; one not in the data raises :class:`InputError` naming ``genes_key``.
    out_prefix
        Output path without extension.
    model
        Model name for titles (default: the store's ``model`` attribute, else its folder).
    genes_key
        Config key the genes come from (for error messages).
    shared_scale
        Truth and prediction on one colour scale at each bin size, else each map its own
        (0 to its 99th percentile: the predicted rates of a Poisson model are far below the counts).
    formats
        File formats.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if not genes:
        raise InputError(genes_key, "no genes to draw")
    tiles = open_tiles(tiles_zarr)
    names = tiles.genes
    idx = [gene_index(names, gene, genes_key, str(tiles_zarr)) for gene in genes]
    store = _predictions({"model": pred_zarr}, tiles, tiles_zarr)["model"]
    rates, attrs = store.rates, store.attrs
    channels = [_channel(store, tiles, gene, pred_zarr) for gene in genes]
    model = model or attrs.get("model") or Path(pred_zarr).parent.parent.name
    relative = {model} if store.relative else set()
    totals = _tile_totals(tiles)
    scales = (4, 2, 1)
    fig = Figure(figsize=(3 * 3.6, 6 * len(genes) + 0.5), layout="constrained")
    axes = fig.subplots(2 * len(genes), len(scales), squeeze=False)
    for i, (gene, g, ch) in enumerate(zip(genes, idx, channels)):
        t = int(np.argmax(totals[:, g]))
        m = np.asarray(tiles.mask[t])
        for j, k in enumerate(scales):
            maps = {"truth": _pool(tiles.counts[t, g], m, k), model: _pool(rates[t, ch], m, k)}
            titles = {n: f"{'truth' if n == 'truth' else 'prediction'}, {2 * k} µm" for n in maps}
            _draw_maps(fig, axes[2 * i : 2 * i + 2, j], maps, titles, shared_scale, 2 * k, relative)
        for r, what in enumerate(("truth (counts)", "prediction")):
            axes[2 * i + r, 0].set_ylabel(f"{gene}, tile {t}\n{what}", fontsize=9)
    suptitle(
        fig,
        f"{model}, sample {tiles.sample}: sums over 8, 4, 2 µm bins, each gene on its tile with the most counts; "
        + ("truth and prediction on one colour scale at each bin size" if shared_scale else _scale_note(False)),
        fontsize=10,
    )
    save(fig, out_prefix, formats)
    return fig
