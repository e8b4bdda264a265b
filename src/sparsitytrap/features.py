"""Feature cache: the frozen encoder's token grid of every tile under the 8 dihedral views.

The encoder is frozen, so its output for a given image never changes: caching it turns an
epoch into a pass over the decoder only. The seeds' flip/rot90 augmentation stays exact: the
tile image is transformed *before* encoding (view v), and training transforms the target and
mask with the same v (image rows/cols follow bin rows/cols in the tile store).
"""

import logging

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from .errors import InputError
from .io import atomic_path

log = logging.getLogger(__name__)

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


def resolve_device(device="auto"):
    """``"auto"`` -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise InputError("training.device", f"must be auto, cpu or cuda, got {device!r}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError("training.device", "cuda was asked for but no GPU is visible")
    return torch.device(device)


def open_tiles(tiles_zarr):
    """Open a tile store read-only, checking the arrays the training needs."""
    try:
        root = zarr.open_group(str(tiles_zarr), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        raise InputError(tiles_zarr, "not a tile store (no zarr group)") from None
    for name in ("images", "counts", "mask", "grid"):
        if name not in root:
            raise InputError(tiles_zarr, f"tile store has no {name!r} array")
    if root["images"].shape[0] == 0:
        raise InputError(tiles_zarr, "tile store holds no tiles")
    return root


def open_features(features_zarr, n_tiles=None):
    """Open a feature cache read-only; check its tile count against the tile store's."""
    try:
        root = zarr.open_group(str(features_zarr), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        raise InputError(features_zarr, "not a feature cache (no zarr group)") from None
    if "tokens" not in root:
        raise InputError(features_zarr, "feature cache has no 'tokens' array")
    tokens = root["tokens"]
    if tokens.ndim != 5 or tokens.shape[1] != len(DIHEDRAL):
        raise InputError(features_zarr, f"tokens must be [T, 8, D, h, w], got {list(tokens.shape)}")
    if n_tiles is not None and tokens.shape[0] != n_tiles:
        raise InputError(features_zarr, f"{tokens.shape[0]} tiles, the tile store has {n_tiles}")
    return root


def cache_features(tiles_zarr, encoder_cfg, out_zarr, batch_size=16, device="auto"):
    """Encode every tile of a tile store under the 8 dihedral views.

    Parameters
    ----------
    tiles_zarr
        Tile store (``images`` uint8 [T, 224, 224, 3]).
    encoder_cfg
        Encoder settings as given by ``sparsitytrap.config.encoder_config`` (``name`` plus the
        keys of ``config["encoders"][name]``), passed to ``encoder.build_encoder``.
    out_zarr
        Output store: ``tokens`` float16 [T, 8, D, h, w], one chunk per (tile, view); attrs
        ``encoder``, ``encoder_config``, ``dim``, ``grid`` ([h, w]), ``views``, ``sample``.
    batch_size
        Tiles per encoder forward (each forward sees one view of `batch_size` tiles).
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    """
    from .encoder import build_encoder, token_grid

    images = open_tiles(tiles_zarr)["images"]
    n_tiles = images.shape[0]
    dev = resolve_device(device)
    # `name` labels the cache; the rest builds the encoder
    build_cfg = {k: v for k, v in dict(encoder_cfg).items() if k != "name"}
    encoder = build_encoder(build_cfg).to(dev).eval()
    with atomic_path(out_zarr) as tmp:
        out = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        tokens = None
        for start in tqdm(range(0, n_tiles, batch_size), desc=f"features {out_zarr}", unit="batch"):
            batch = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2)
            grids = encode_views(encoder, token_grid, batch, dev)  # [B, 8, D, h, w]
            if tokens is None:
                tokens = out.create_array(
                    "tokens", shape=(n_tiles, *grids.shape[1:]), chunks=(1, 1, *grids.shape[2:]), dtype="float16"
                )
            tokens[start : start + len(batch)] = grids.astype(np.float16)
        out.attrs.update(
            {
                "encoder": dict(encoder_cfg).get("name"),
                "encoder_config": dict(encoder_cfg),
                "dim": int(tokens.shape[2]),
                "grid": [int(tokens.shape[3]), int(tokens.shape[4])],
                "views": [[k, flip] for k, flip in DIHEDRAL],
                "sample": zarr.open_group(str(tiles_zarr), mode="r").attrs.get("sample"),
            }
        )
        log.info("cached %d tiles x 8 views of %s tokens", n_tiles, list(tokens.shape[2:]))


@torch.no_grad()
def encode_views(encoder, token_grid, images, device):
    """Token grids of each of the 8 views of a batch of [B, 3, H, W] images: numpy [B, 8, D, h, w]."""
    per_view = [token_grid(encoder, apply(images, v).to(device)).float().cpu() for v in range(len(DIHEDRAL))]
    return torch.stack(per_view, dim=1).numpy()
