"""The predictions of one (model, fold): ``results/models/{model}/{fold}/predictions.zarr``.

``rates`` float16 [T, G, tile_bins, tile_bins], one chunk per tile, tiles in the order of the
test sample's tile store. Attributes: ``model``, ``fold``, ``sample``, ``genes``, ``output``,
``tta``, ``relative`` (True for ranking models, whose ``exp(score)`` are relative scores, not
counts) and ``note``.

``stitched`` float16 [G, rows, cols] (when predicted with the H&E at hand): the seamless
whole-sample map, overlapping windows blended (``sparsitytrap.predict.stitch``); pixel (0, 0) is
bin ``attrs["stitched"]["origin"]`` (array_row, array_col), NaN where no window reached. Its
attribute ``stitched`` also gives ``stride_bins``, ``window`` and ``windows`` (how many were predicted).
Evaluation reads ``rates`` only, so metrics stay those of the non-overlapping tiles.
"""

import zarr

from ..errors import InputError
from . import manifest

RATES, STITCHED = "rates", "stitched"


class PredictionStore:
    """A predictions store opened read-only; its shape checked against the tile store's counts."""

    def __init__(self, path, shape=None):
        self.path = str(path)
        try:
            node = zarr.open(self.path, mode="r")
        except Exception as err:
            raise InputError(path, f"cannot open the predictions store ({type(err).__name__})") from None
        self.attrs = dict(node.attrs)
        manifest.verify(path)
        group = node if isinstance(node, zarr.Group) else None
        if group is not None:
            if RATES not in node:
                raise InputError(path, f"no array 'rates' (found {sorted(node.array_keys())})")
            node = node[RATES]
        if shape is not None and tuple(node.shape) != tuple(shape):
            raise InputError(path, f"shape {tuple(node.shape)} does not match the tile store's counts {tuple(shape)}")
        self.rates = node
        self.group = group

    @property
    def genes(self):
        return self.attrs.get("genes")

    @property
    def stitched(self):
        """The seamless map ``[G, rows, cols]``, or None when the store has none."""
        return self.group[STITCHED] if self.group is not None and STITCHED in self.group else None

    @property
    def relative(self):
        return bool(self.attrs.get("relative", False))


def open_predictions(path, shape=None):
    """Open and check a predictions store (:class:`PredictionStore`)."""
    return PredictionStore(path, shape)


def create(path, shape):
    """Create a predictions store at ``path``; returns the empty ``rates`` array."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    return root.create_array(RATES, shape=shape, chunks=(1, *shape[1:]), dtype="float16")


def create_stitched(path, shape, tile_bins):
    """The empty ``stitched`` [G, rows, cols] array of a predictions store being written."""
    root = zarr.open_group(str(path), mode="r+")
    chunks = (shape[0], min(tile_bins, shape[1]), min(tile_bins, shape[2]))
    return root.create_array(STITCHED, shape=shape, chunks=chunks, dtype="float16", fill_value=float("nan"))


def open_overlay(path):
    """Check a fold's SpatialData store (``results/predictions/{fold}.zarr``) against its manifest and read it."""
    import spatialdata

    manifest.verify(path)
    try:
        return spatialdata.read_zarr(str(path))
    except Exception as err:  # noqa: BLE001 - any unreadable store is an input fault
        raise InputError(path, f"cannot read the SpatialData store ({type(err).__name__}: {err})") from None


def finish(path, attrs):
    """Write the attributes of a filled predictions store, then its manifest."""
    zarr.open_group(str(path), mode="r+").attrs.update(attrs)
    manifest.write(path)
