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
    gene_index
        Positions in the tile stores' gene axis of the genes trained on (a fold's own selection
        among the union the stores hold), or None for all of them.
    """

    def __init__(self, sources, gene_index=None):
        self.sources = sources
        self.gene_index = None if gene_index is None else np.asarray(gene_index)
        self.items = [(s, int(t)) for s, (_, _, _, idx) in enumerate(sources) for t in idx]
        self._open = {}

    @property
    def paths(self):
        """Every store this dataset reads (for checks that the test sample is not among them)."""
        return [str(p) for _, tiles, feats, _ in self.sources for p in (tiles, feats) if p is not None]

    def __len__(self):
        return len(self.items)

    def slide_of(self, i):
        """Slide id of item i (what the loss's ``slide`` argument receives)."""
        return self.sources[self.items[i][0]][0]

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
        counts = root.counts[t] if self.gene_index is None else root.counts[t][self.gene_index]
        item = {
            "target": torch.from_numpy(apply(counts.astype(np.float32), v)),
            "mask": torch.from_numpy(apply(root.mask[t], v)),
            "slide": torch.tensor(self.sources[s][0]),
        }
        if tokens is not None:
            item["x"] = torch.from_numpy(tokens[t, v].astype(np.float32))
        else:
            item["x"] = torch.from_numpy(apply(root.images[t].transpose(2, 0, 1), v))  # uint8 [3, H, W]
        return item


def _fold_genes(store_genes, genes, where):
    """(genes trained on, their positions in the stores) for a fold's `genes`, or all the store's."""
    if genes is None or list(genes) == list(store_genes):
        return list(store_genes), None
    missing = [g for g in genes if g not in set(store_genes)]
    if missing:
        raise InputError(where, f"{len(missing)} of the fold's genes are not in the tile store, e.g. {missing[0]!r}")
    position = {g: i for i, g in enumerate(store_genes)}
    return list(genes), np.array([position[g] for g in genes])


def batches(dataset, keys, batch_size, by_slide=False, generator=None):
    """The keys cut into batches of at most ``batch_size``, in order.

    With ``by_slide``, each batch holds tiles of one slide (a slide-scope ranking loss sees a batch's
    tiles as one list only then): each slide's keys, in their order, are cut into batches, and the
    batches are shuffled by ``generator`` (kept in slide order without one, as for validation).
    """
    if not by_slide:
        return [keys[j : j + batch_size] for j in range(0, len(keys), batch_size)]
    per_slide = {}
    for key in keys:
        per_slide.setdefault(dataset.slide_of(key[0]), []).append(key)
    out = [group[j : j + batch_size] for group in per_slide.values() for j in range(0, len(group), batch_size)]
    if generator is None:
        return out
    return [out[int(j)] for j in torch.randperm(len(out), generator=generator)]


def split_samples(tiles, features, val_fraction, block_tiles, seed, on_the_fly=False, genes=None):
    """Open the training samples, check them, and split each into training and validation tiles.

    genes: the fold's genes (a subset of the stores', in the fold's order); default all of them.

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
        if info.setdefault("store_genes", root.genes) != root.genes:
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
    info["genes"], index = _fold_genes(info.pop("store_genes"), genes, tiles[0])
    train_set, val_set = TileDataset(train_src, index), TileDataset(val_src, index)
    if len(val_set) == 0:
        raise InputError("training.val_fraction", "no validation tile: every training sample has fewer than 2 tiles")
    return train_set, val_set, info
