"""The training samples' tiles: a dataset read tile by tile, split into training and validation.

Batches come from :func:`loader`: read from zarr by a DataLoader, or indexed from a
:class:`ResidentTiles` (the set loaded once on the training device, ``training.resident``).
"""

import logging
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..folds import validation_split
from ..stores.features import open_features
from ..stores.tiles import open_tiles
from ..views import apply

log = logging.getLogger(__name__)

#: Share of the free device memory (CUDA) or available RAM (CPU) that ``resident: auto`` lets the
#: training and validation sets take; the rest is for the decoder's activations and optimizer.
RESIDENT_SHARE = 0.5


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


# ---------------------------------------------------------------------------------------------
# resident sets: every tile loaded once on the training device, batches served by indexing


class ResidentTiles(TileDataset):
    """A :class:`TileDataset` held as tensors on `device`: a batch is a gather, not a read.

    Holds every tile's 8 token views (float16, as cached) or its image (on-the-fly encoding), its
    counts (float32) and mask. :meth:`batch` gives what the DataLoader collates from the zarr items,
    equal tensor for tensor: the target and mask (and the image) are turned by the torch path of
    :func:`sparsitytrap.views.apply`.
    """

    def __init__(self, dataset, device, block=64):
        super().__init__(dataset.sources, dataset.gene_index)
        self.device = torch.device(device)
        self.x, self.target, self.mask = _load(self, self.device, block)
        slides = [self.sources[s][0] for s, _ in self.items]
        self.slide = torch.tensor(slides, dtype=torch.long, device=self.device)
        self.views_cached = self.x.ndim == 5  # tokens [N, 8, D, h, w]; images are [N, 3, H, W]

    def __getitem__(self, key):
        return {k: v[0] for k, v in self.batch([key]).items()}

    def batch(self, keys):
        """The batch of items ``keys`` (``(i, v)`` pairs), as :func:`loader` serves it."""
        views = [int(v) for _, v in keys]
        i = torch.tensor([k[0] for k in keys], device=self.device)
        out = {"slide": self.slide[i]}
        if self.views_cached:
            out["x"] = self.x[i, torch.tensor(views, device=self.device)].float()
        for name in ("target", "mask") if self.views_cached else ("target", "mask", "x"):
            out[name] = _turned(getattr(self, name), i, views)
        return out

    def batches(self, plan):
        return _Batches(self, plan)


def _turned(held, i, views):
    """``held[i[j]]`` under view ``views[j]`` for every j, contiguous: one gather per view present."""
    groups = {v: [j for j, w in enumerate(views) if w == v] for v in sorted(set(views))}  # on the host: no sync
    if len(groups) == 1:
        return apply(held[i], views[0]).contiguous()
    out = torch.empty((len(views), *held.shape[1:]), dtype=held.dtype, device=held.device)
    for v, sel in groups.items():
        sel = torch.tensor(sel, device=held.device)
        out[sel] = apply(held[i[sel]], v)
    return out


class _Batches:
    """An epoch's batches from a resident set, made one at a time (len() for the progress bar)."""

    def __init__(self, dataset, plan):
        self.dataset, self.plan = dataset, plan

    def __len__(self):
        return len(self.plan)

    def __iter__(self):
        return (self.dataset.batch(keys) for keys in self.plan)


def _layout(dataset):
    """{name: (shape of one tile, resident dtype)} of x, target and mask."""
    root, tokens = dataset._stores(0)
    genes = len(dataset.gene_index) if dataset.gene_index is not None else root.counts.shape[1]
    if tokens is not None:
        x = (tuple(tokens.shape[1:]), torch.float16)
    else:
        px = root.images.shape[1:3]
        x = ((3, *px), torch.uint8)
    side = tuple(root.mask.shape[1:])
    return {"x": x, "target": ((genes, *side), torch.float32), "mask": (side, torch.bool)}


def _load(dataset, device, block):
    """(x, target, mask) of every item on `device`, read `block` tiles at a time (one zarr call each)."""
    n = len(dataset)
    out = {k: torch.empty((n, *shape), dtype=dtype, device=device) for k, (shape, dtype) in _layout(dataset).items()}
    at = 0
    for s, (_, _, _, idx) in enumerate(dataset.sources):
        root, tokens = dataset._stores(s)
        for lo in range(0, len(idx), block):
            sel = np.asarray(idx[lo : lo + block])
            counts = root.counts.oindex[sel]
            counts = counts if dataset.gene_index is None else counts[:, dataset.gene_index]
            x = tokens.oindex[sel] if tokens is not None else root.images.oindex[sel].transpose(0, 3, 1, 2)
            part = {"x": np.ascontiguousarray(x), "target": counts.astype(np.float32), "mask": root.mask.oindex[sel]}
            for k, v in part.items():
                out[k][at : at + len(sel)] = torch.from_numpy(v)
            at += len(sel)
    return out["x"], out["target"], out["mask"]


def resident_bytes(dataset):
    """Bytes a :class:`ResidentTiles` of `dataset` takes."""
    if len(dataset) == 0:
        return 0
    per_tile = sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in _layout(dataset).values())
    return per_tile * len(dataset)


def memory_budget(device):
    """Bytes ``resident: auto`` may take: a share of the free device memory, or of the available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        import psutil

        free = psutil.virtual_memory().available
    return RESIDENT_SHARE * free


def wants_resident(setting, need, budget):
    """``training.resident``: true, false, or auto (resident when `need` bytes fit `budget()`)."""
    if not (isinstance(setting, bool) or setting == "auto"):
        raise InputError("training.resident", f"must be auto, true or false, got {setting!r}")
    return setting is True or (setting == "auto" and need <= budget())


def resident_sets(training, train_set, val_set, device):
    """The training and validation sets, resident on `device` when ``training.resident`` says so."""
    need = resident_bytes(train_set) + resident_bytes(val_set)
    if not wants_resident(training.get("resident", "auto"), need, lambda: memory_budget(device)):
        return train_set, val_set
    log.info("training and validation tiles resident on %s: %.2f GiB", device, need / 2**30)
    return ResidentTiles(train_set, device), ResidentTiles(val_set, device)


def loader(dataset, plan, num_workers=0, device="cpu"):
    """The batches of `plan` (lists of item keys): indexed from a resident set, else read from zarr."""
    if isinstance(dataset, ResidentTiles):
        return dataset.batches(plan)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=plan,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),  # keeps the DataLoader off the global RNG
        pin_memory=torch.device(device).type == "cuda",
    )
