"""Feature cache: the frozen encoder's token grid of every tile under the 8 dihedral views.

The encoder is frozen, so its output for a given image never changes: caching it turns an
epoch into a pass over the decoder only. The seeds' flip/rot90 augmentation stays exact: the
tile image is transformed *before* encoding (view v), and training transforms the target and
mask with the same v (image rows/cols follow bin rows/cols in the tile store).
"""

import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from .device import resolve_device
from .io import atomic_path
from .stores import features as feature_store
from .stores.tiles import open_tiles
from .views import DIHEDRAL, apply

log = logging.getLogger(__name__)


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

    tiles = open_tiles(tiles_zarr)
    images, n_tiles = tiles.images, tiles.n_tiles
    dev = resolve_device(device)
    # `name` labels the cache; the rest builds the encoder
    build_cfg = {k: v for k, v in dict(encoder_cfg).items() if k != "name"}
    encoder = build_encoder(build_cfg).to(dev).eval()
    with atomic_path(out_zarr) as tmp:
        tokens = None
        for start in tqdm(range(0, n_tiles, batch_size), desc=f"features {out_zarr}", unit="batch"):
            batch = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2)
            grids = encode_views(encoder, token_grid, batch, dev)  # [B, 8, D, h, w]
            if tokens is None:
                tokens = feature_store.create(tmp, n_tiles, grids.shape[1:])
            tokens[start : start + len(batch)] = grids.astype(np.float16)
        feature_store.finish(tmp, encoder_cfg, tokens, tiles.sample)
        log.info("cached %d tiles x 8 views of %s tokens", n_tiles, list(tokens.shape[2:]))


@torch.no_grad()
def encode_views(encoder, token_grid, images, device):
    """Token grids of each of the 8 views of a batch of [B, 3, H, W] images: numpy [B, 8, D, h, w]."""
    per_view = [token_grid(encoder, apply(images, v).to(device)).float().cpu() for v in range(len(DIHEDRAL))]
    return torch.stack(per_view, dim=1).numpy()
