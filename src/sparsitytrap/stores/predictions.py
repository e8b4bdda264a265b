"""The predictions of one (model, fold): ``results/models/{model}/{fold}/predictions.zarr``.

``rates`` float16 [T, G, tile_bins, tile_bins], one chunk per tile, tiles in the order of the
test sample's tile store. Attributes: ``model``, ``fold``, ``sample``, ``genes``, ``output``,
``tta``, ``relative`` (True for ranking models, whose ``exp(score)`` are relative scores, not
counts) and ``note``.
"""

import zarr

from ..errors import InputError
from . import manifest

RATES = "rates"


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
        if isinstance(node, zarr.Group):
            if RATES not in node:
                raise InputError(path, f"no array 'rates' (found {sorted(node.array_keys())})")
            node = node[RATES]
        if shape is not None and tuple(node.shape) != tuple(shape):
            raise InputError(path, f"shape {tuple(node.shape)} does not match the tile store's counts {tuple(shape)}")
        self.rates = node

    @property
    def genes(self):
        return self.attrs.get("genes")

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


def finish(path, attrs):
    """Write the attributes of a filled predictions store, then its manifest."""
    zarr.open_group(str(path), mode="r+").attrs.update(attrs)
    manifest.write(path)
