"""The 8 dihedral views of a tile (flips and quarter turns): the exact augmentation of image, target and mask.

Image rows/cols follow bin rows/cols in the tile store, so transforming the image before encoding
and the counts and mask after reading with the same view keeps them aligned.
"""

import numpy as np
import torch

from .errors import InputError

#: The 8 symmetries of the square as (k, flip): flip the last axis (W) if `flip`, then rotate
#: k quarter turns in the (H, W) plane. View 0 is the identity.
DIHEDRAL = tuple((k, flip) for flip in (False, True) for k in range(4))


def _check_view(v):
    if not 0 <= int(v) < len(DIHEDRAL):
        raise InputError("view", f"must be in 0..7, got {v}")
    return DIHEDRAL[int(v)]


def apply(x, v, axes=(-2, -1)):
    """Transform the (H, W) plane of `x` (numpy array or torch tensor) by dihedral view `v`.

    Parameters
    ----------
    x
        Array with the two spatial axes at `axes` (default: the last two).
    v
        View index into :data:`DIHEDRAL`.
    axes
        The (H, W) axes, e.g. ``(0, 1)`` for an HWC image.

    Returns
    -------
    Same type as `x` (a contiguous copy for numpy).
    """
    k, flip = _check_view(v)
    if isinstance(x, torch.Tensor):
        if flip:
            x = torch.flip(x, dims=(axes[1],))
        return torch.rot90(x, k, dims=axes)
    if flip:
        x = np.flip(x, axis=axes[1])
    return np.ascontiguousarray(np.rot90(x, k, axes=axes))


def inverse(x, v, axes=(-2, -1)):
    """Undo :func:`apply`: ``inverse(apply(x, v), v) == x``."""
    k, flip = _check_view(v)
    if isinstance(x, torch.Tensor):
        x = torch.rot90(x, -k, dims=axes)
        return torch.flip(x, dims=(axes[1],)) if flip else x
    x = np.rot90(x, -k, axes=axes)
    return np.ascontiguousarray(np.flip(x, axis=axes[1]) if flip else x)
