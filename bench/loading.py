"""Training loader throughput at Virchow2 width: tiles read from zarr (one process, DataLoader workers) or resident.

Writes a synthetic tile store and feature cache with the project's store writers (Virchow2's
token grid by default: 1280 dims x 16 x 16 tokens, float16, 8 dihedral views per tile; random
values, poisson counts), then serves one training epoch of shuffled tiles under random views as
the training loop does (:func:`sparsitytrap.training.data.loader`), moving each batch to the
device, in three ways side by side, repeated and interleaved:

- ``zarr, 0 workers``: items read from the stores in the training process;
- ``zarr, N workers``: the same in DataLoader worker processes;
- ``resident``: the tiles loaded once as tensors on the device (``training.resident``), batches
  gathered by indexing; its load time is reported apart.

The stores were just written, so the reads come from the page cache: this is the cost of zarr
and decompression, not of the disk.

    .venv/bin/python bench/loading.py [--tiles 256] [--widths 1280x16 192x14] [--repeats 5] [--device cpu]
"""

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from machine import describe

from sparsitytrap.stores import features as feature_store
from sparsitytrap.stores import tiles as tile_store
from sparsitytrap.training.data import ResidentTiles, batches, loader, split_samples
from sparsitytrap.views import DIHEDRAL


def write_synthetic(folder, n_tiles, dim, grid, n_genes, tile_bins=128, image_px=224, seed=0):
    """(tile store, feature cache) of `n_tiles` synthetic tiles of `dim` x `grid` x `grid` tokens."""
    rng = np.random.default_rng(seed)
    folder, sample = Path(folder), f"W{dim}x{grid}"
    tiles, feats = folder / "tiles" / f"{sample}.zarr", folder / "features" / f"{sample}.zarr"
    cols = math.ceil(math.sqrt(n_tiles))
    rc = np.array([divmod(t, cols) for t in range(n_tiles)], dtype=np.int32)
    attrs = {"sample": sample, "bin_um": 2.0, "grid_shape": [int(rc[:, 0].max()) + 1, cols], "counts_kind": "raw"}
    images, counts, mask = tile_store.create(
        tiles, n_tiles=n_tiles, genes=[f"G{g}" for g in range(n_genes)], tile_bins=tile_bins, image_px=image_px,
        attrs=attrs, grid=rc, bin_origin=rc * tile_bins, pixel_box=np.zeros((n_tiles, 4, 2)),
    )  # fmt: skip
    tokens = feature_store.create(feats, n_tiles, (len(DIHEDRAL), dim, grid, grid))
    for t in range(n_tiles):
        counts[t] = rng.poisson(0.05, (n_genes, tile_bins, tile_bins)).astype(np.int32)
        mask[t] = rng.random((tile_bins, tile_bins)) < 0.9
        images[t] = rng.integers(0, 256, (image_px, image_px, 3), dtype=np.uint8)
        tokens[t] = rng.standard_normal((len(DIHEDRAL), dim, grid, grid), dtype=np.float32).astype(np.float16)
    tile_store.finish(tiles)
    feature_store.finish(feats, {"name": "synthetic"}, tokens, sample)
    return tiles, feats


def epoch_plan(dataset, batch_size, seed):
    """One epoch's batches of shuffled tiles under random views, as the training loop draws them."""
    g = torch.Generator().manual_seed(seed)
    order, views = (
        torch.randperm(len(dataset), generator=g),
        torch.randint(0, len(DIHEDRAL), (len(dataset),), generator=g),
    )
    return batches(dataset, [(int(i), int(views[i])) for i in order], batch_size)


def serve(dataset, plan, device, num_workers=0):
    """Tiles per second of one epoch, each batch moved to `device` (and waited for)."""
    start, n = time.perf_counter(), 0
    for batch in loader(dataset, plan, num_workers, device):
        for k in ("x", "target", "mask"):
            batch[k].to(device, non_blocking=True)
        n += len(batch["target"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def measure(tiles, feats, device, batch_size=8, workers=2, repeats=3):
    """Rows of (path, tiles/s) for zarr reads with 0 and `workers` workers and a resident set."""
    train_set, _, _ = split_samples([tiles], [feats], 0.2, 2, 0)
    rows = []
    for r in range(repeats):
        plan = epoch_plan(train_set, batch_size, r)
        rows.append({"path": "zarr, 0 workers", "tiles_per_s": serve(train_set, plan, device)})
        if workers:
            rate = serve(train_set, plan, device, workers)
            rows.append({"path": f"zarr, {workers} workers", "tiles_per_s": rate})
        start = time.perf_counter()
        resident = ResidentTiles(train_set, device)
        load_s = time.perf_counter() - start
        rows.append({"path": "resident", "tiles_per_s": serve(resident, plan, device), "load_s": load_s})
        del resident
    return pd.DataFrame(rows).assign(tiles=len(train_set), batch=batch_size)


def summary(df):
    """Median and best tiles/s per path (the best: the least disturbed run of a shared machine), and
    their ratios to the one-process zarr reads."""
    out = df.groupby("path", sort=False).agg(
        median=("tiles_per_s", "median"), best=("tiles_per_s", "max"), load_s=("load_s", "median")
    )
    for k in ("median", "best"):
        out[f"{k}_vs_zarr_0_workers"] = out[k] / out.loc["zarr, 0 workers", k]
    return out.reset_index()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=256, help="tiles of the synthetic sample (80%% train)")
    ap.add_argument("--widths", nargs="+", default=["1280x16", "192x14"], help="DIMxGRID token widths")
    ap.add_argument("--genes", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the second zarr path")
    ap.add_argument("--repeats", type=int, default=5, help="epochs of each path, interleaved")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the main process (workers use 1)")
    ap.add_argument("--work", help="folder for the synthetic stores (default: a temporary one)")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args()

    print(describe(), flush=True)
    torch.set_num_threads(a.threads)  # one thread each: no OpenMP team stalled by a shared machine's load
    device, tables = torch.device(a.device), []
    with tempfile.TemporaryDirectory() as tmp:
        for width in a.widths:
            dim, grid = (int(v) for v in width.split("x"))
            start = time.perf_counter()
            tiles, feats = write_synthetic(Path(a.work or tmp) / width, a.tiles, dim, grid, a.genes)
            print(f"{width}: {a.tiles} tiles written in {time.perf_counter() - start:.0f} s", flush=True)
            df = measure(tiles, feats, device, a.batch, a.workers, a.repeats).assign(width=width)
            tables.append(df)
            print(summary(df).assign(width=width).to_markdown(index=False, floatfmt=".2f"), flush=True)
    if a.json:
        Path(a.json).write_text(pd.concat(tables).to_json(orient="records", indent=1))


if __name__ == "__main__":
    main()
