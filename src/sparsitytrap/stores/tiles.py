"""The tile store of one sample: ``results/tiles/{sample}.zarr`` (zarr v3 group, one chunk per tile).

==============  =======  ==============================  ====================================
array           dtype    shape                           meaning
==============  =======  ==============================  ====================================
``images``      uint8    [T, px, px, 3]                  H&E, rows/cols along bin rows/cols
``counts``      int32    [T, G, tile_bins, tile_bins]    counts of the selected genes
                float32                                  (diffusion-corrected tiles)
``mask``        bool     [T, tile_bins, tile_bins]       tissue bins
``grid``        int32    [T, 2]                          tile (row, col) on the tile grid
``bin_origin``  int32    [T, 2]                          (array_row, array_col) of bin (0, 0)
``pixel_box``   float64  [T, 4, 2]                       full-res (x, y) of the four corners
==============  =======  ==============================  ====================================

Attributes: ``sample``, ``genes``, ``tile_bins``, ``bin_um``, ``image_px``,
``min_tissue_fraction``, ``bin_to_pixel`` (2x3 affine (row, col, 1) -> (x, y)), ``grid_shape``,
``counts_kind`` (``raw`` or ``corrected``).
"""

import zarr

from ..errors import InputError
from . import manifest

IMAGES, COUNTS, MASK, GRID, BIN_ORIGIN, PIXEL_BOX = "images", "counts", "mask", "grid", "bin_origin", "pixel_box"
ARRAYS = (IMAGES, COUNTS, MASK, GRID, BIN_ORIGIN, PIXEL_BOX)
#: What a reader needs (``pixel_box`` is for people and other tools).
REQUIRED = (IMAGES, COUNTS, MASK, GRID, BIN_ORIGIN)


class TileStore:
    """A tile store opened read-only and checked: its arrays as attributes, read lazily."""

    def __init__(self, path):
        self.path = str(path)
        try:
            self.root = zarr.open_group(self.path, mode="r")
        except Exception as err:  # zarr raises several types for a missing or foreign folder
            raise InputError(path, f"cannot open the tile store ({type(err).__name__})") from None
        manifest.verify(path)
        for name in REQUIRED:
            if name not in self.root:
                raise InputError(path, f"tile store has no array {name!r}")
        self.attrs = dict(self.root.attrs)
        self.genes = list(self.attrs.get("genes") or [])
        if not self.genes or len(self.genes) != self.counts.shape[1]:
            raise InputError(path, "attribute 'genes' is missing or does not match counts' gene axis")
        if self.counts.shape[0] == 0:
            raise InputError(path, "tile store holds no tiles")

    def __getattr__(self, name):  # images, counts, mask, grid, bin_origin, pixel_box
        if name in ARRAYS:
            return self.root[name]
        raise AttributeError(name)

    @property
    def sample(self):
        return self.attrs.get("sample")

    @property
    def n_tiles(self):
        return int(self.counts.shape[0])

    @property
    def tile_bins(self):
        return int(self.counts.shape[-1])


def open_tiles(path):
    """Open and check a tile store (:class:`TileStore`)."""
    return TileStore(path)


def finish(path):
    """Record what a filled tile store holds (before it is renamed into place)."""
    manifest.write(path)


def create(path, *, n_tiles, genes, tile_bins, image_px, attrs, grid, bin_origin, pixel_box, counts_dtype="int32"):
    """Create a tile store at ``path``: attributes and per-tile arrays; returns (images, counts, mask).

    The three per-tile arrays are returned empty, to be written tile by tile (one in memory at a time).
    """
    store = zarr.open_group(str(path), mode="w", zarr_format=3)
    store.attrs.update({**attrs, "genes": list(genes), "tile_bins": int(tile_bins), "image_px": int(image_px)})
    store.create_array(GRID, data=grid)
    store.create_array(BIN_ORIGIN, data=bin_origin)
    store.create_array(PIXEL_BOX, data=pixel_box)
    shapes = {
        IMAGES: ((n_tiles, image_px, image_px, 3), "uint8"),
        COUNTS: ((n_tiles, len(genes), tile_bins, tile_bins), counts_dtype),
        MASK: ((n_tiles, tile_bins, tile_bins), "bool"),
    }
    return [
        store.create_array(name, shape=shape, chunks=(1, *shape[1:]), dtype=dtype)
        for name, (shape, dtype) in shapes.items()
    ]
