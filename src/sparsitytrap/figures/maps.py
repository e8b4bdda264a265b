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
from ._common import FORMATS, metric_label, read_evaluations, save

GENES_KEY = "figures.mosaic_genes"
OFF_TISSUE = "lightgrey"


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
    """Open each prediction store, checking shape, genes and sample against the tile store."""
    out = {}
    for name, path in predictions.items():
        store = open_predictions(path, tiles.counts.shape)
        rates, attrs = store.rates, store.attrs
        if attrs.get("genes") is not None and list(attrs["genes"]) != tiles.genes:
            raise InputError(path, f"genes differ from those of {tiles_zarr}")
        if attrs.get("sample") and tiles.sample and attrs["sample"] != tiles.sample:
            raise InputError(path, f"predicts sample {attrs['sample']!r}, not {tiles.sample!r}")
        out[name] = rates
    return out


def _scale(panels, shared):
    """(vmin, vmax) per panel: the 99.5th percentile of the tissue values, shared or per panel."""

    def top(arrays):
        v = np.concatenate([a[np.isfinite(a)].ravel() for a in arrays])
        hi = float(np.percentile(v, 99.5)) if v.size else 1.0
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
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def mosaic(tiles_zarr, predictions, gene, out_prefix, shared_scale=True, pool=4, he_px=64, formats=FORMATS):
    """Whole-slide mosaic of one gene: H&E | truth | each model, tiles on their grid positions.

    Tiles are read one at a time. Expression is sum-pooled over ``pool x pool`` bins (counts
    and predicted rates alike; 4: 8 µm bins); off-tissue bins and grid cells without a tile are
    grey. One colour scale is shared by the truth and every model (99.5th percentile of their
    tissue values) unless ``shared_scale`` is false.

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
        One colour scale per gene (config ``figures.shared_scale``), else one per panel.
    pool
        Display bin size in 2 µm bins.
    he_px
        Pixels per tile of the H&E panel.
    formats
        File formats.

    Returns
    -------
    matplotlib.figure.Figure
    """
    tiles = open_tiles(tiles_zarr)
    g = gene_index(tiles.genes, gene, source=str(tiles_zarr))
    preds = _predictions(predictions, tiles, tiles_zarr)
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
        for name, rates in preds.items():
            maps[name][r * d : (r + 1) * d, c * d : (c + 1) * d] = _pool(rates[t, g], m, pool)
    extent = (0, cols, rows, 0)
    # a ranking model's exp(score) is not a count: it gets its own scale, or it would set everyone's
    relative = {n for n, p in predictions.items() if open_predictions(p).relative}
    counted = [n for n in maps if n not in relative]
    shared = dict(zip(counted, _scale([maps[n] for n in counted], shared_scale)))
    vlims = [shared[n] if n in shared else _scale([maps[n]], False)[0] for n in maps]
    fig = Figure(figsize=(3.2 * (len(maps) + 1), 3.4 * rows / max(cols, 1) + 0.8), layout="constrained")
    axes = fig.subplots(1, len(maps) + 1)
    axes[0].imshow(he, extent=extent)
    axes[0].set_title("H&E", fontsize=8)
    axes[0].set_xticks([]), axes[0].set_yticks([])
    for ax, (name, data), vlim in zip(axes[1:], maps.items(), vlims):
        title = "truth (counts)" if name == "truth" else name + (" (relative, own scale)" if name in relative else "")
        im = _show(ax, data, title, vlim, extent)
        if not shared_scale or name in relative:
            fig.colorbar(im, ax=ax, shrink=0.6)
        else:
            shared_im = im
    if shared_scale:
        fig.colorbar(
            shared_im,
            ax=[a for a, n in zip(axes[1:], maps) if n not in relative],
            shrink=0.6,
            label=f"sum per {2 * pool:g} µm bin",
        )
    scale = "one colour scale shared by all panels" if shared_scale else "one colour scale per panel"
    fig.suptitle(f"{gene}, sample {tiles.sample}: {2 * pool:g} µm bins; {scale}; grey: off tissue", fontsize=9)
    save(fig, out_prefix, formats)
    return fig


def _tile_totals(tiles):
    """Masked total count per (tile, gene), read tile by tile: ``[T, G]``."""
    counts, mask = tiles.counts, tiles.mask
    return np.stack([(np.asarray(counts[t]) * np.asarray(mask[t])[None]).sum((1, 2)) for t in range(counts.shape[0])])


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
    formats=FORMATS,
):
    """H&E, truth, model A, model B for the top-k genes by delta (B - A), each on the tile where it is most expressed.

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
    delta = b.set_index("gene")[metric] - a.set_index("gene")[metric]
    top = delta.dropna().sort_values(ascending=False, kind="stable").head(int(top_k))
    if top.empty:
        raise InputError(eval_dir_b, f"no gene has a finite {metric} in both evaluations")
    preds = _predictions({na: pred_a, nb: pred_b}, tiles, tiles_zarr)
    totals = _tile_totals(tiles)
    fig = Figure(figsize=(10, 2.6 * len(top) + 0.6), layout="constrained")
    axes = fig.subplots(len(top), 4, squeeze=False)
    for row, (gene, dv) in zip(axes, top.items()):
        g = genes.index(gene)
        t = int(np.argmax(totals[:, g]))
        m = np.asarray(tiles.mask[t])
        maps = [_pool(tiles.counts[t, g], m, pool)] + [_pool(p[t, g], m, pool) for p in preds.values()]
        row[0].imshow(np.asarray(tiles.images[t]))
        row[0].set_xticks([]), row[0].set_yticks([])
        row[0].set_title(
            f"{gene}: Δ = {dv:+.3f}\nH&E, tile {t} (grid {tuple(int(v) for v in tiles.grid[t])})", fontsize=8
        )
        vlim = _scale(maps, True)[0]
        for ax, data, title in zip(row[1:], maps, ["truth (counts)", na, nb]):
            im = _show(ax, data, title, vlim)
        fig.colorbar(im, ax=list(row[1:]), shrink=0.8)
    fig.suptitle(
        f"Top {len(top)} genes by Δ {metric_label(metric)} ({nb} − {na}), fold {sa[0]['fold']}; "
        f"each on its tile with the most counts; {2 * pool:g} µm bins",
        fontsize=9,
    )
    save(fig, out_prefix, formats)
    return fig


def multiscale_panels(tiles_zarr, pred_zarr, genes, out_prefix, model=None, genes_key=GENES_KEY, formats=FORMATS):
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
    store = open_predictions(pred_zarr, tiles.counts.shape)
    rates, attrs = store.rates, store.attrs
    model = model or attrs.get("model") or Path(pred_zarr).parent.parent.name
    totals = _tile_totals(tiles)
    scales = (4, 2, 1)
    fig = Figure(figsize=(9, 5.2 * len(genes) + 0.4), layout="constrained")
    axes = fig.subplots(2 * len(genes), len(scales), squeeze=False)
    for i, (gene, g) in enumerate(zip(genes, idx)):
        t = int(np.argmax(totals[:, g]))
        m = np.asarray(tiles.mask[t])
        for j, k in enumerate(scales):
            maps = [_pool(tiles.counts[t, g], m, k), _pool(rates[t, g], m, k)]
            vlim = _scale(maps, True)[0]  # per scale: sums grow with the bin area
            for r, (data, what) in enumerate(zip(maps, ("truth", model))):
                im = _show(axes[2 * i + r, j], data, f"{gene} {what}, {2 * k} µm (tile {t})", vlim)
            fig.colorbar(im, ax=[axes[2 * i, j], axes[2 * i + 1, j]], shrink=0.7)
    fig.suptitle(
        f"{model}, sample {tiles.sample}: sums over 8, 4, 2 µm bins; "
        "colour scale shared by truth and prediction at each scale",
        fontsize=9,
    )
    save(fig, out_prefix, formats)
    return fig
