"""Cut an ingested sample into 256 um tiles: H&E image, counts of the chosen genes, tissue mask.

Tiles lie on a regular grid of ``tile_bins`` x ``tile_bins`` 2 um bins starting at bin (0, 0).
The image of a tile is the affine image of its bin square in the full-resolution H&E, resampled
so that image rows follow bin rows and image columns follow bin columns (whatever the rotation
of the slide). Counts are rasterised from the sparse 2 um table streamed in row blocks, keeping
only the chosen genes: the sample is never densified. The store layout is in docs/architecture.md.

Pixel convention (that of SpatialData): pixel ``(i, j)`` of an image covers ``x in [j, j+1)``,
``y in [i, i+1)``; its centre is ``(j + 0.5, i + 0.5)``.
"""

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from .errors import InputError
from .io import atomic_path
from .spaceranger import fit_bin_to_pixel
from .stores import manifest
from .stores import tiles as tile_store

TABLE = "square_002um"
BIN_UM = 2.0
ROW_BLOCK = 1 << 19  # bins of the 2 um table read at a time
BACKGROUND = 255  # image fill outside the slide (white glass)


def tile_sample(
    sdata_zarr, genes_csv, out_zarr, *, tile_bins=128, image_px=224, min_tissue_fraction=0.5, dataset_id=None
):
    """Write the tile store of one ingested sample.

    Parameters
    ----------
    sdata_zarr
        SpatialData store written by :func:`sparsitytrap.ingest.ingest`.
    genes_csv
        Gene list (column ``gene``); its order is the channel order of ``counts``.
    out_zarr
        Tile store to write (zarr v3 group, atomically).
    tile_bins
        Tile edge in 2 um bins (128 bins = 256 um).
    image_px
        Tile image edge in pixels.
    min_tissue_fraction
        Keep tiles whose fraction of in-tissue bins (over ``tile_bins**2``) is at least this.
    dataset_id
        Sample id naming the SpatialData elements; inferred from the table when None.

    Returns
    -------
    int
        Number of tiles written.
    """
    table = _open_table(sdata_zarr)
    genes = read_gene_list(genes_csv)
    bins = read_bins(table, sdata_zarr)
    dataset_id = dataset_id or _dataset_id(bins, sdata_zarr)
    A = fit_bin_to_pixel(bins["array_row"], bins["array_col"], bins["y"], bins["x"])
    grid_shape, tile_of_bin, fraction = tissue_fractions(bins, tile_bins)
    kept = np.flatnonzero(fraction >= min_tissue_fraction)
    if kept.size == 0:
        fault = f"no tile has a tissue fraction >= {min_tissue_fraction} (max {fraction.max():.3f})"
        raise InputError(sdata_zarr, fault)
    columns = _gene_columns(table, genes, genes_csv, sdata_zarr)
    nonzeros = gather_counts(table, columns, bins, tile_bins, grid_shape)
    tissue_bins = _tissue_bins_by_tile(bins, tile_of_bin)
    image = _full_image(sdata_zarr, dataset_id)
    grid = np.column_stack(np.divmod(kept, grid_shape[1])).astype(np.int32)
    origin = grid * tile_bins

    corners = np.stack([tile_corners(A, r0, c0, tile_bins) for r0, c0 in origin])
    attrs = {
        "sample": dataset_id,
        "bin_um": BIN_UM,
        "min_tissue_fraction": float(min_tissue_fraction),
        "bin_to_pixel": A.tolist(),
        "grid_shape": [int(s) for s in grid_shape],
        "counts_kind": "raw",
    }
    with atomic_path(out_zarr) as tmp:
        images, counts, mask = tile_store.create(
            tmp, n_tiles=kept.size, genes=genes, tile_bins=tile_bins, image_px=image_px, attrs=attrs,
            grid=grid, bin_origin=origin.astype(np.int32), pixel_box=corners,
        )  # fmt: skip
        for t, tile in enumerate(kept):  # tile by tile: one tile in memory at a time
            r0, c0 = origin[t]
            counts[t] = nonzeros.tile(tile, len(genes))
            mask[t] = _tile_mask(bins, tissue_bins(tile), r0, c0, tile_bins)
            images[t] = tile_image(image, A, r0, c0, tile_bins, image_px)
        tile_store.finish(tmp)
    return int(kept.size)


def tissue_fractions(bins, tile_bins):
    """Tile grid shape, tile index of every bin, and tissue fraction of every tile (row-major).

    The grid starts at bin (0, 0) and ends with the tile holding the last bin of the table; bins
    outside the array count as not tissue.
    """
    grid_shape = tuple(-(-(int(bins[key].max()) + 1) // tile_bins) for key in ("array_row", "array_col"))
    tile_of_bin = (bins["array_row"] // tile_bins) * grid_shape[1] + bins["array_col"] // tile_bins
    n_tiles = grid_shape[0] * grid_shape[1]
    fraction = np.bincount(tile_of_bin, weights=bins["in_tissue"] > 0, minlength=n_tiles) / tile_bins**2
    return grid_shape, tile_of_bin, fraction


def _open_table(sdata_zarr):
    """The 2 um table's zarr group (an AnnData element): its matrix is streamed, not loaded."""
    import zarr

    path = Path(sdata_zarr) / "tables" / TABLE
    if not path.is_dir():
        raise InputError(sdata_zarr, f"no table {TABLE!r} (is it a store written by 'ingest'?)")
    manifest.verify(sdata_zarr)
    return zarr.open_group(path, mode="r")


def read_gene_list(genes_csv):
    """Genes of genes.csv (column ``gene``) in file order."""
    try:
        genes = pd.read_csv(genes_csv)["gene"].astype(str).tolist()
    except (OSError, KeyError, pd.errors.ParserError) as err:
        raise InputError(genes_csv, f"cannot read a 'gene' column ({err})") from None
    if not genes or len(set(genes)) != len(genes):
        raise InputError(genes_csv, "gene list is empty or has duplicates")
    return genes


def read_bins(table, sdata_zarr):
    """Bin grid positions, tissue flags, pixel centres and region of a 2 um table (zarr group)."""
    import anndata as ad

    # Column by column: the obs index (one Python string per bin) would cost ~1 GB on 10M bins.
    obs = table["obs"]
    columns = {
        key: np.asarray(ad.io.read_elem(obs[key])).astype(np.int64) for key in ("array_row", "array_col", "in_tissue")
    }
    xy = np.asarray(ad.io.read_elem(table["obsm/spatial"]), dtype=np.float64)
    if len(xy) == 0:
        raise InputError(sdata_zarr, f"table {TABLE!r} has no bins")
    region = ad.io.read_elem(obs["region"]).categories if "region" in obs else []
    return {**columns, "x": xy[:, 0], "y": xy[:, 1], "region": region[0] if len(region) == 1 else None}


def _dataset_id(bins, sdata_zarr):
    """``{id}`` of the region the 2 um table annotates: ``{id}_square_002um`` (shapes) or ``..._labels``."""
    region = str(bins["region"] or "").removesuffix("_labels")
    suffix = "_" + TABLE
    if not region.endswith(suffix):
        raise InputError(sdata_zarr, "cannot infer the dataset id from obs['region']: pass dataset_id")
    return region[: -len(suffix)]


def _gene_columns(table, genes, genes_csv, sdata_zarr):
    import anndata as ad

    var_names = pd.Index(ad.io.read_elem(table["var"]).index.astype(str))
    missing = [g for g in genes if g not in var_names]
    if missing:
        raise InputError(genes_csv, f"{len(missing)} genes not in the table of {sdata_zarr}, e.g. {missing[0]!r}")
    return var_names.get_indexer(genes)


class TileCounts:
    """Non-zeros of the chosen genes, sorted by tile: (gene, position in tile, count) per entry."""

    def __init__(self, tile, gene, pos, value, tile_bins):
        order = np.argsort(tile, kind="stable")
        self.tiles = tile[order]
        self.gene, self.pos, self.value = gene[order], pos[order], value[order]
        self.tile_bins = tile_bins

    def tile(self, tile, n_genes):
        """Dense ``[n_genes, tile_bins, tile_bins]`` int32 counts of one tile."""
        lo, hi = np.searchsorted(self.tiles, [tile, tile + 1])
        out = np.zeros((n_genes, self.tile_bins * self.tile_bins), dtype=np.int32)
        out[self.gene[lo:hi], self.pos[lo:hi]] = self.value[lo:hi]
        return out.reshape(n_genes, self.tile_bins, self.tile_bins)


def gather_counts(table, columns, bins, tile_bins, grid_shape):
    """Stream the 2 um matrix in row blocks and keep the non-zeros of `columns`, by tile."""
    import anndata as ad

    X = ad.io.sparse_dataset(table["X"])
    parts = []
    for start in range(0, X.shape[0], ROW_BLOCK):
        block = X[start : start + ROW_BLOCK][:, columns].tocoo()
        row = bins["array_row"][start + block.row]
        col = bins["array_col"][start + block.row]
        parts.append(
            (
                ((row // tile_bins) * grid_shape[1] + col // tile_bins).astype(np.int32),
                block.col.astype(np.int32),
                ((row % tile_bins) * tile_bins + col % tile_bins).astype(np.int32),
                np.rint(block.data).astype(np.int32),  # the reader stores counts as float32
            )
        )
    tile, gene, pos, value = (np.concatenate(p) for p in zip(*parts, strict=True))
    return TileCounts(tile, gene, pos, value, tile_bins)


def _tissue_bins_by_tile(bins, tile_of_bin):
    """A function tile -> indices of its in-tissue bins (one sort, then a slice per tile)."""
    tissue = np.flatnonzero(bins["in_tissue"] > 0)
    tissue = tissue[np.argsort(tile_of_bin[tissue], kind="stable")]
    sorted_tiles = tile_of_bin[tissue]
    return lambda tile: tissue[slice(*np.searchsorted(sorted_tiles, [tile, tile + 1]))]


def _tile_mask(bins, idx, r0, c0, tile_bins):
    mask = np.zeros((tile_bins, tile_bins), dtype=bool)
    mask[bins["array_row"][idx] - r0, bins["array_col"][idx] - c0] = True
    return mask


def tile_corners(A, r0, c0, tile_bins):
    """Full-res (x, y) of the corners of a tile's bin square: top-left, top-right, bottom-right, bottom-left."""
    r = np.array([r0, r0, r0 + tile_bins, r0 + tile_bins], dtype=np.float64) - 0.5
    c = np.array([c0, c0 + tile_bins, c0 + tile_bins, c0], dtype=np.float64) - 0.5
    return (np.asarray(A) @ np.stack([r, c, np.ones(4)])).T


def _full_image(sdata_zarr, dataset_id):
    """The full-resolution image as a list of (DataArray c,y,x, y scale, x scale) per pyramid level."""
    import spatialdata
    from spatialdata.transformations import Identity, get_transformation

    manifest.verify(sdata_zarr)
    sdata = spatialdata.read_zarr(sdata_zarr, selection=("images",))
    name = f"{dataset_id}_full_image"
    if name not in sdata.images:
        raise InputError(sdata_zarr, f"no image {name!r} (found {sorted(sdata.images)})")
    element = sdata.images[name]
    if not isinstance(get_transformation(element, to_coordinate_system=dataset_id), Identity):
        raise InputError(sdata_zarr, f"image {name!r} is not in full-resolution pixels of {dataset_id!r}")
    arrays = [element[key]["image"] for key in element] if hasattr(element, "children") else [element]
    height, width = arrays[0].shape[1:]
    return [(a, height / a.shape[1], width / a.shape[2]) for a in arrays]


def tile_image(levels, A, r0, c0, tile_bins, image_px):
    """Resample a tile's bin square from the H&E to ``image_px`` x ``image_px`` (bilinear).

    Reads only the bounding-box window, from the coarsest pyramid level whose pixels are still
    no larger than the output pixels (a 2x mean-pooled level is an anti-aliased source; sampling
    full resolution at a 4x stride would alias).
    """
    step = tile_bins / image_px  # bins per output pixel
    u = (np.arange(image_px) + 0.5) * step - 0.5
    rows, cols = np.meshgrid(r0 + u, c0 + u, indexing="ij")
    x = A[0, 0] * rows + A[0, 1] * cols + A[0, 2]
    y = A[1, 0] * rows + A[1, 1] * cols + A[1, 2]
    out_px = step * np.sqrt(abs(np.linalg.det(A[:, :2])))  # full-res pixels per output pixel
    array, sy, sx = max((lvl for lvl in levels if max(lvl[1], lvl[2]) <= max(out_px, 1.0)), key=lambda lvl: lvl[1])
    yi, xi = y / sy - 0.5, x / sx - 0.5  # continuous array indices at this level
    i0, j0 = max(int(np.floor(yi.min())) - 1, 0), max(int(np.floor(xi.min())) - 1, 0)
    i1, j1 = min(int(np.ceil(yi.max())) + 2, array.shape[1]), min(int(np.ceil(xi.max())) + 2, array.shape[2])
    if i1 <= i0 or j1 <= j0:
        return np.full((image_px, image_px, 3), BACKGROUND, dtype=np.uint8)
    window = np.asarray(array[:, i0:i1, j0:j1].values, dtype=np.float32)
    coords = np.stack([yi - i0, xi - j0])
    out = np.stack(
        [ndimage.map_coordinates(ch, coords, order=1, mode="constant", cval=BACKGROUND) for ch in window[:3]],
        axis=-1,
    )
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def corrected_tiles(tiles_zarr, corrected_zarr, out_zarr):
    """The tile store of a sample with its counts replaced by diffusion-corrected counts.

    Same tiles, images, masks and genes as ``tiles_zarr``; ``counts`` are float32 windows of the
    corrected store (:mod:`sparsitytrap.diffusion.store`) and ``counts_kind`` is ``corrected``.

    Returns
    -------
    int
        Number of tiles written.
    """
    from .diffusion import open_corrected, read_window

    raw = tile_store.open_tiles(tiles_zarr)
    corrected = open_corrected(corrected_zarr)
    if corrected.genes != raw.genes:
        raise InputError(corrected_zarr, f"genes differ from the tile store's ({tiles_zarr}): same genes.csv needed")
    if corrected.attrs.get("sample") not in (None, raw.sample):
        raise InputError(corrected_zarr, f"corrects sample {corrected.attrs.get('sample')!r}, not {raw.sample!r}")
    tb, origin = raw.tile_bins, raw.bin_origin[:]
    keep = ("genes", "tile_bins", "image_px")
    with atomic_path(out_zarr) as tmp:
        images, counts, mask = tile_store.create(
            tmp, n_tiles=raw.n_tiles, genes=raw.genes, tile_bins=tb, image_px=int(raw.images.shape[1]),
            attrs={**{k: v for k, v in raw.attrs.items() if k not in keep}, "counts_kind": "corrected"},
            grid=raw.grid[:], bin_origin=origin, pixel_box=raw.pixel_box[:], counts_dtype="float32",
        )  # fmt: skip
        for t in range(raw.n_tiles):
            images[t], mask[t] = raw.images[t], raw.mask[t]
            counts[t] = read_window(corrected, int(origin[t, 0]), int(origin[t, 1]), tb, tb)
        tile_store.finish(tmp)
    return raw.n_tiles
