"""The feature cache of one sample: ``results/features/{encoder}/{sample}.zarr``.

``tokens`` float16 [T, 8, D, h, w]: the frozen encoder's token grid of every tile under the 8
dihedral views (order of :data:`sparsitytrap.views.DIHEDRAL`), one chunk per (tile, view).
Attributes: ``encoder``, ``encoder_config``, ``dim``, ``grid`` ([h, w]), ``views``, ``sample``.
"""

import zarr

from ..errors import InputError
from ..views import DIHEDRAL
from . import manifest

TOKENS = "tokens"


class FeatureStore:
    """A feature cache opened read-only and checked (tile count against the tile store's)."""

    def __init__(self, path, n_tiles=None):
        self.path = str(path)
        try:
            self.root = zarr.open_group(self.path, mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
            raise InputError(path, "not a feature cache (no zarr group)") from None
        if TOKENS not in self.root:
            raise InputError(path, "feature cache has no 'tokens' array")
        manifest.verify(path)
        self.tokens = self.root[TOKENS]
        if self.tokens.ndim != 5 or self.tokens.shape[1] != len(DIHEDRAL):
            raise InputError(path, f"tokens must be [T, 8, D, h, w], got {list(self.tokens.shape)}")
        if n_tiles is not None and self.tokens.shape[0] != n_tiles:
            raise InputError(path, f"{self.tokens.shape[0]} tiles, the tile store has {n_tiles}")
        self.attrs = dict(self.root.attrs)

    @property
    def dim(self):
        return int(self.attrs["dim"])

    @property
    def grid(self):
        return list(self.attrs["grid"])


def open_features(path, n_tiles=None):
    """Open and check a feature cache (:class:`FeatureStore`)."""
    return FeatureStore(path, n_tiles)


def create(path, n_tiles, view_shape):
    """Create a feature cache at ``path`` for tokens of shape ``[8, D, h, w]`` per tile; returns the array."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    return root.create_array(TOKENS, shape=(n_tiles, *view_shape), chunks=(1, 1, *view_shape[1:]), dtype="float16")


def finish(path, encoder_cfg, tokens, sample):
    """Write the attributes of a filled feature cache."""
    zarr.open_group(str(path), mode="r+").attrs.update(
        {
            "encoder": dict(encoder_cfg).get("name"),
            "encoder_config": dict(encoder_cfg),
            "dim": int(tokens.shape[2]),
            "grid": [int(tokens.shape[3]), int(tokens.shape[4])],
            "views": [[k, flip] for k, flip in DIHEDRAL],
            "sample": sample,
        }
    )
    manifest.write(path)
