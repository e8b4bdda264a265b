"""The training samples' tiles: a dataset read tile by tile, split into training and validation."""

import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..folds import validation_split
from ..stores.features import open_features
from ..stores.tiles import open_tiles
from ..views import apply


def encodes_on_the_fly(model_cfg):
    """Colour jitter changes the image, so its tokens cannot come from the cache."""
    return bool(model_cfg["training"].get("augment", {}).get("color_jitter", False))


class TileDataset(torch.utils.data.Dataset):
    """Training or validation tiles of the training samples, read tile by tile from zarr.

    An item key is ``(i, v)``: tile i of this set under dihedral view v. Tokens come from the
    cache (view v precomputed) or, for on-the-fly encoding, the image is transformed by v; the
    target and mask are transformed by the same v, so the augmentation is exact. An item holds
    ``x`` (tokens, or the uint8 image), ``target`` (counts), ``mask`` and ``slide``.

    Parameters
    ----------
    sources
        ``[(slide index, tile store path, feature cache path or None, tile indices)]``.
    """

    def __init__(self, sources):
        self.sources = sources
        self.items = [(s, int(t)) for s, (_, _, _, idx) in enumerate(sources) for t in idx]
        self._open = {}

    @property
    def paths(self):
        """Every store this dataset reads (for checks that the test sample is not among them)."""
        return [str(p) for _, tiles, feats, _ in self.sources for p in (tiles, feats) if p is not None]

    def __len__(self):
        return len(self.items)

    def _stores(self, s):
        # opened lazily, once per process (DataLoader workers open their own)
        if s not in self._open:
            _, tiles, feats, _ = self.sources[s]
            root = open_tiles(tiles)
            tokens = open_features(feats).tokens if feats is not None else None
            self._open[s] = (root, tokens)
        return self._open[s]

    def __getitem__(self, key):
        i, v = key
        s, t = self.items[i]
        root, tokens = self._stores(s)
        item = {
            "target": torch.from_numpy(apply(root.counts[t].astype(np.float32), v)),
            "mask": torch.from_numpy(apply(root.mask[t], v)),
            "slide": torch.tensor(self.sources[s][0]),
        }
        if tokens is not None:
            item["x"] = torch.from_numpy(tokens[t, v].astype(np.float32))
        else:
            item["x"] = torch.from_numpy(apply(root.images[t].transpose(2, 0, 1), v))  # uint8 [3, H, W]
        return item


def split_samples(tiles, features, val_fraction, block_tiles, seed, on_the_fly=False):
    """Open the training samples, check them, and split each into training and validation tiles.

    Returns
    -------
    train_set, val_set, info
        Two :class:`TileDataset` and a dict (genes, dim, grid, tile counts per sample).
    """
    features = [None] * len(tiles) if features is None else list(features)
    if len(tiles) != len(features):
        raise InputError("features", f"{len(features)} feature caches for {len(tiles)} tile stores")
    if not tiles:
        raise InputError("tiles", "no training samples")
    train_src, val_src, info = [], [], {"samples": {}}
    for s, (tpath, fpath) in enumerate(zip(tiles, features, strict=True)):
        root = open_tiles(tpath)
        genes = root.genes
        if info.setdefault("genes", genes) != genes:
            raise InputError(tpath, "genes differ from the first training sample's (same genes.csv needed)")
        n, side = root.n_tiles, root.tile_bins
        if info.setdefault("tile_bins", side) != side:
            raise InputError(tpath, "tile size differs from the first training sample's")
        if on_the_fly:
            fpath = None
            info.setdefault("dim", None)
        elif fpath is None:
            raise InputError(tpath, "no feature cache given for this tile store")
        else:
            feats = open_features(fpath, n_tiles=n)
            dim, grid = feats.dim, feats.grid
            if info.setdefault("dim", dim) != dim or info.setdefault("grid", grid) != grid:
                raise InputError(fpath, "token width or grid differs from the first training sample's")
        sample = root.sample or Path(tpath).stem
        sample_seed = (seed + zlib.crc32(str(sample).encode())) % 2**31  # same split in every fold
        is_val = validation_split(root.grid[:], val_fraction, block_tiles, sample_seed)
        train_src.append((s, tpath, fpath, np.flatnonzero(~is_val)))
        val_src.append((s, tpath, fpath, np.flatnonzero(is_val)))
        info["samples"][str(sample)] = {"tiles": n, "train": int((~is_val).sum()), "val": int(is_val.sum())}
    train_set, val_set = TileDataset(train_src), TileDataset(val_src)
    if len(val_set) == 0:
        raise InputError("training.val_fraction", "no validation tile: every training sample has fewer than 2 tiles")
    return train_set, val_set, info
