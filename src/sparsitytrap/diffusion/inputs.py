"""What the solver needs of a sample, read without densifying it: the grid form (`GridInput`).

Two sources: in-memory arrays (`arrays_input`, for tests and the benchmark) and an ingested
SpatialData store (`sample_input`), whose 2 um table is streamed in row blocks and kept as the
non-zeros of the chosen genes sorted by window (`sparsitytrap.tile.gather_counts`); a window of
any size is assembled from those on demand. The H&E is resampled onto the bin grid one window at
a time (`sparsitytrap.tile.tile_image`, one output pixel per bin).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .model import gene_stats

BIN_UM = 2.0


@dataclass
class GridInput:
    """A sample on its bin grid.

    `window(r0, c0, h, w)` gives float32 counts [G, h, w] (0 outside the grid); `image(r0, c0, n)`
    the H&E channel of a square window [n, n] (None: no image term); `totals` the counts summed
    over genes [H, W] (for the diffusion-length estimate).
    """

    name: str
    genes: list
    tissue: np.ndarray
    observed: np.ndarray
    stats: object
    window: Callable
    image: Callable | None
    totals: np.ndarray
    bin_um: float = BIN_UM

    @property
    def shape(self):
        return self.tissue.shape

    def crop(self, grid, r0, c0, h, w):
        """A window of a [H, W] grid of this sample, zero outside the grid."""
        return crop(grid, r0, c0, h, w)


def crop(grid, r0, c0, h, w):
    """Window [..., h, w] of an array [..., H, W] starting at (r0, c0), zero-padded outside it."""
    H, W = grid.shape[-2:]
    out = np.zeros(grid.shape[:-2] + (h, w), dtype=grid.dtype)
    a0, a1, b0, b1 = max(r0, 0), min(r0 + h, H), max(c0, 0), min(c0 + w, W)
    if a1 > a0 and b1 > b0:
        out[..., a0 - r0 : a1 - r0, b0 - c0 : b1 - c0] = grid[..., a0:a1, b0:b1]
    return out


def he_channel(rgb, kind):
    """One float32 channel of an RGB H&E window: haematoxylin (colour deconvolution) or darkness."""
    rgb = np.asarray(rgb)
    if kind == "darkness":
        return (1.0 - rgb.astype(np.float32).mean(axis=-1) / 255.0).astype(np.float32)
    from skimage.color import rgb2hed

    return rgb2hed(rgb)[..., 0].astype(np.float32)


def check_genes(genes, where):
    """A non-empty list of distinct gene names."""
    genes = [str(g) for g in (genes or [])]
    if not genes:
        raise InputError(where, "no genes to correct")
    if len(set(genes)) != len(genes):
        dup = next(g for g in genes if genes.count(g) > 1)
        raise InputError(where, f"gene {dup!r} is listed twice")
    return genes


# ---------------------------------------------------------------- in-memory arrays
def arrays_input(counts, tissue, image=None, *, observed=None, genes=None, name="arrays", bin_um=BIN_UM):
    """GridInput of dense arrays: counts [G, H, W], tissue bool [H, W], image channel [H, W] or None."""
    counts = np.asarray(counts, np.float32)
    tissue = np.asarray(tissue, bool)
    observed = np.ones_like(tissue) if observed is None else np.asarray(observed, bool)
    counts = counts * observed[None]
    genes = list(genes) if genes is not None else [f"G{g}" for g in range(counts.shape[0])]
    hists = [np.unique(c[observed & (c > 0)], return_counts=True) for c in counts]
    img = None if image is None else np.asarray(image, np.float32)
    return GridInput(
        name=name,
        genes=genes,
        tissue=tissue,
        observed=observed,
        stats=gene_stats(hists, int(observed.sum())),
        window=lambda r0, c0, h, w, genes=None: crop(counts if genes is None else counts[genes], r0, c0, h, w),
        image=None if img is None else (lambda r0, c0, n: crop(img, r0, c0, n, n)),
        totals=counts.sum(axis=0, dtype=np.float64),
        bin_um=bin_um,
    )


# ---------------------------------------------------------------- an ingested SpatialData store
def sample_input(sdata_zarr, genes, *, dataset_id=None, window_bins=256, channel="haematoxylin"):
    """GridInput of an ingested sample (table ``square_002um`` and its full-resolution H&E).

    Returns
    -------
    GridInput, dict, str
        The grid form, the table's bins (`sparsitytrap.tile.read_bins`) for the store, the sample id.

    Raises
    ------
    InputError
        No tissue bin, a gene not in the table, no image, or an image that does not cover the tissue.
    """
    from ..spaceranger import fit_bin_to_pixel
    from ..tile import _dataset_id, _full_image, _gene_columns, _open_table, gather_counts, read_bins, tile_image

    table = _open_table(sdata_zarr)
    bins = read_bins(table, sdata_zarr)
    dataset_id = dataset_id or _dataset_id(bins, sdata_zarr)
    where = f"{sdata_zarr} (sample {dataset_id})"
    genes = check_genes(genes, f"{where}: genes")
    in_tissue = bins["in_tissue"] > 0
    if not in_tissue.any():
        raise InputError(where, "no bin is in tissue: nothing to correct")
    columns = _gene_columns(table, genes, "genes", sdata_zarr)
    rows, cols = bins["array_row"], bins["array_col"]
    shape = (int(rows.max()) + 1, int(cols.max()) + 1)
    levels = _full_image(sdata_zarr, dataset_id)
    check_image_covers(levels, bins, in_tissue, where, f"{dataset_id}_full_image")
    A = fit_bin_to_pixel(rows, cols, bins["y"], bins["x"])
    tiles = (math.ceil(shape[0] / window_bins), math.ceil(shape[1] / window_bins))
    nonzeros = gather_counts(table, columns, bins, window_bins, tiles)
    tissue = np.zeros(shape, bool)
    tissue[rows[in_tissue], cols[in_tissue]] = True
    observed = np.zeros(shape, bool)
    observed[rows, cols] = True
    totals = _totals(nonzeros, window_bins, tiles, shape)
    inp = GridInput(
        name=where,
        genes=genes,
        tissue=tissue,
        observed=observed,
        stats=gene_stats(_histograms(nonzeros, len(genes)), len(rows)),
        window=_window_reader(nonzeros, window_bins, tiles, len(genes)),
        image=lambda r0, c0, n: he_channel(tile_image(levels, A, r0, c0, n, n), channel),
        totals=totals,
    )
    return inp, bins, dataset_id


def check_image_covers(levels, bins, in_tissue, where, name):
    """Every tissue bin's centre must lie on the full-resolution image."""
    height, width = levels[0][0].shape[1:]
    x, y = bins["x"][in_tissue], bins["y"][in_tissue]
    off = (x < 0) | (x >= width) | (y < 0) | (y >= height)
    if off.any():
        fault = f"{int(off.sum())} of {off.size} tissue bins lie outside it"
        raise InputError(where, f"image {name!r} ({width} x {height} px) does not cover the tissue: {fault}")


def _grid_positions(nonzeros, lo, hi, tile_bins, tiles):
    """(row, col) on the bin grid of the non-zeros lo:hi of a `TileCounts` (computed, not stored)."""
    tr, tc = np.divmod(nonzeros.tiles[lo:hi].astype(np.int64), tiles[1])
    pr, pc = np.divmod(nonzeros.pos[lo:hi].astype(np.int64), tile_bins)
    return tr * tile_bins + pr, tc * tile_bins + pc


def _totals(nonzeros, tile_bins, tiles, shape, block=1 << 24):
    """Counts summed over genes per bin, float64 [H, W], in blocks of non-zeros."""
    totals = np.zeros(shape[0] * shape[1])
    for lo in range(0, len(nonzeros.value), block):
        hi = min(lo + block, len(nonzeros.value))
        r, c = _grid_positions(nonzeros, lo, hi, tile_bins, tiles)
        totals += np.bincount(r * shape[1] + c, weights=nonzeros.value[lo:hi], minlength=totals.size)
    return totals.reshape(shape)


def _histograms(nonzeros, n_genes):
    """Per gene, (distinct non-zero counts, how many bins have each)."""
    keys, n = np.unique(nonzeros.gene.astype(np.int64) << 32 | nonzeros.value.astype(np.int64), return_counts=True)
    gene, value = keys >> 32, keys & 0xFFFFFFFF
    bounds = np.searchsorted(gene, np.arange(n_genes + 1))
    return [(value[bounds[g] : bounds[g + 1]], n[bounds[g] : bounds[g + 1]]) for g in range(n_genes)]


def _window_reader(nonzeros, tile_bins, tiles, n_genes):
    """window(r0, c0, h, w, genes=None): dense float32 counts [G, h, w] pasted from the tiles it overlaps.

    `genes` (indices) decodes only those genes, in that order.
    """
    H, W = tiles[0] * tile_bins, tiles[1] * tile_bins

    def window(r0, c0, h, w, genes=None):
        slot = np.arange(n_genes) if genes is None else np.full(n_genes, -1)
        if genes is not None:
            slot[np.asarray(genes)] = np.arange(len(genes))
        out = np.zeros((n_genes if genes is None else len(genes), h, w), np.float32)
        for tr in range(max(r0, 0) // tile_bins, min(r0 + h, H) // tile_bins + 1):
            for tc in range(max(c0, 0) // tile_bins, min(c0 + w, W) // tile_bins + 1):
                if tr >= tiles[0] or tc >= tiles[1]:
                    continue
                t = tr * tiles[1] + tc
                lo, hi = np.searchsorted(nonzeros.tiles, [t, t + 1])
                r, c = _grid_positions(nonzeros, lo, hi, tile_bins, tiles)
                r, c = r - r0, c - c0
                g = slot[nonzeros.gene[lo:hi]]
                keep = (r >= 0) & (r < h) & (c >= 0) & (c < w) & (g >= 0)
                out[g[keep], r[keep], c[keep]] = nonzeros.value[lo:hi][keep]
        return out

    return window
