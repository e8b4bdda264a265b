"""The tile stage at full capture-area size: streamed (``sparsitytrap.tile``) against the obvious version.

The obvious version reads the whole 2 um table into memory (``anndata.read_zarr``: matrix, obs
with its string index) and every level of the H&E pyramid, then loops over the kept tiles in
Python, cutting each tile's bins out of the in-memory table. The streamed tile stage reads the
matrix in row blocks, keeps only the chosen genes' non-zeros, and reads image windows. Both
write a tile store with the project's writer; the script checks the two stores are equal, array
by array, and prints wall time and peak RSS of each (its own child process, ``os.wait4``).

The input (simulate -> ingest -> select genes) is made by ``bench/full_scale.py``'s stages, in
the work folder, once per size: ``--side 3250`` (the default) is a full 6.5 mm capture area with
18,000 genes (~9 GiB RAM and ~6 min to prepare); a smaller ``--side`` is a quick run.

    .venv/bin/python bench/tiling.py [--work DIR (default: $TMPDIR/st_tiling)] [--side 3250] [--repeats 1]
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import full_scale
import numpy as np
from machine import describe

VARIANTS = ("streamed", "obvious")
TILE_ARGS = {"tile_bins": 128, "image_px": 224, "min_tissue_fraction": 0.5}


def prepare(a):
    """Simulate, ingest and select genes with full_scale's stages, unless the work folder has them."""
    ns = argparse.Namespace(work=str(a.work), sample=a.sample, seed=1, preset="full", n_genes=50, bins=a.bins,
                            mem_limit_gib=a.mem_limit_gib, side=a.side)  # fmt: skip
    for stage in ("simulate", "ingest", "genes"):
        if not (Path(a.work) / f"stats_{stage}.json").exists():
            row = full_scale.run_stage(ns, stage)
            if row["rc"] != 0:
                sys.exit(f"{stage} failed: {row}")
    return full_scale.paths(a.work, a.sample)


# ---------------------------------------------------------------- the two variants (in a child)
def streamed(p, out):
    from sparsitytrap.tile import tile_sample

    return tile_sample(p["sdata"], p["genes"], out, dataset_id=p["sample"], **TILE_ARGS)


def obvious(p, out, tile_bins=128, image_px=224, min_tissue_fraction=0.5):
    """Whole table and image in memory, then a Python loop over the tiles cutting each."""
    import anndata as ad
    import xarray as xr

    from sparsitytrap import tile
    from sparsitytrap.io import atomic_path
    from sparsitytrap.spaceranger import fit_bin_to_pixel
    from sparsitytrap.stores import tiles as tile_store

    table = ad.read_zarr(p["sdata"] / "tables" / tile.TABLE)  # the whole 2 um table
    genes = tile.read_gene_list(p["genes"])
    X = table.X.tocsr()
    rows, cols = (table.obs[k].to_numpy().astype(np.int64) for k in ("array_row", "array_col"))
    in_tissue = table.obs["in_tissue"].to_numpy() > 0
    xy = np.asarray(table.obsm["spatial"], dtype=np.float64)
    A = fit_bin_to_pixel(rows, cols, xy[:, 1], xy[:, 0])
    bins = {"array_row": rows, "array_col": cols, "in_tissue": in_tissue}
    grid_shape, tile_of_bin, fraction = tile.tissue_fractions(bins, tile_bins)
    kept = np.flatnonzero(fraction >= min_tissue_fraction)
    columns = table.var_names.get_indexer(genes)
    levels = [(xr.DataArray(np.asarray(a.values)), sy, sx) for a, sy, sx in tile._full_image(p["sdata"], p["sample"])]
    grid = np.column_stack(np.divmod(kept, grid_shape[1])).astype(np.int32)
    origin = grid * tile_bins
    attrs = {"sample": p["sample"], "bin_um": tile.BIN_UM, "min_tissue_fraction": float(min_tissue_fraction),
             "bin_to_pixel": A.tolist(), "grid_shape": [int(s) for s in grid_shape], "counts_kind": "raw"}  # fmt: skip
    corners = np.stack([tile.tile_corners(A, r0, c0, tile_bins) for r0, c0 in origin])
    with atomic_path(out) as tmp:
        images, counts, mask = tile_store.create(
            tmp, n_tiles=kept.size, genes=genes, tile_bins=tile_bins, image_px=image_px, attrs=attrs,
            grid=grid, bin_origin=origin.astype(np.int32), pixel_box=corners,
        )  # fmt: skip
        for t, (r0, c0) in enumerate(origin):
            sel = np.flatnonzero(tile_of_bin == kept[t])  # this tile's bins, by a scan of every bin
            r, c = rows[sel] - r0, cols[sel] - c0
            dense = np.zeros((len(genes), tile_bins, tile_bins), dtype=np.int32)
            dense[:, r, c] = np.rint(X[sel][:, columns].toarray().T)
            counts[t] = dense
            m = np.zeros((tile_bins, tile_bins), dtype=bool)
            m[r[in_tissue[sel]], c[in_tissue[sel]]] = True
            mask[t] = m
            images[t] = tile.tile_image(levels, A, r0, c0, tile_bins, image_px)
        tile_store.finish(tmp)
    return int(kept.size)


def run_child(a):
    p = {**full_scale.paths(a.work, a.sample), "sample": a.sample}
    n = globals()[a.child](p, Path(a.work) / f"{a.child}.tiles.zarr")
    print(json.dumps({"tiles": n}))


# ---------------------------------------------------------------- driver
def run_variant(a, variant):
    """(wall s, peak RSS GiB, killed) of one variant in its own process, watched for memory."""
    out = Path(a.work) / f"{variant}.tiles.zarr"
    cmd = [sys.executable, __file__, "--child", variant, "--work", str(a.work), "--sample", a.sample]
    start = time.perf_counter()
    with open(Path(a.work) / f"{variant}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        killed = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if full_scale.mem_used_gib() > a.mem_limit_gib:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: only this variant's processes
                killed = True
            time.sleep(0.2)
    wall = time.perf_counter() - start
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0 or killed:
        sys.exit(f"{variant}: rc {rc}, killed {killed} (log {Path(a.work) / (variant + '.log')})")
    return {"variant": variant, "wall_s": wall, "peak_rss_gib": usage.ru_maxrss / 2**20, "out": out}


def same_stores(a, b):
    """The arrays of two tile stores that differ (empty: equal), compared tile by tile."""
    import zarr

    ra, rb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    differ = [k for k in sorted(ra.attrs) if ra.attrs[k] != rb.attrs.get(k)]
    for name in ("grid", "bin_origin", "pixel_box", "images", "counts", "mask"):
        x, y = ra[name], rb[name]
        if x.shape != y.shape or not all(np.array_equal(x[t], y[t]) for t in range(x.shape[0])):
            differ.append(name)
    return differ


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="work folder, outside the repository (default: $TMPDIR/st_tiling/SIDE)")
    ap.add_argument("--side", type=int, default=3250, help="bins per side of the capture area (3250: 6.5 mm)")
    ap.add_argument("--sample", default="P1")
    ap.add_argument("--bins", default="circles", help="ingest.bins of the input (the tile stage reads only the table)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each variant, interleaved")
    ap.add_argument("--mem-limit-gib", type=float, default=22.0, help="kill a run above this machine memory")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.work = a.work or Path(tempfile.gettempdir()) / "st_tiling" / str(a.side)
    if a.child:
        return run_child(a)
    print(describe(), flush=True)
    a.work.mkdir(parents=True, exist_ok=True)
    prepare(a)
    rows = []
    for r in range(a.repeats):
        for variant in VARIANTS:
            rows.append({**run_variant(a, variant), "repeat": r})
            print(f"{variant} #{r}: {rows[-1]['wall_s']:.1f} s, {rows[-1]['peak_rss_gib']:.2f} GiB", flush=True)
    differ = same_stores(a.work / "streamed.tiles.zarr", a.work / "obvious.tiles.zarr")
    stats = json.loads((a.work / "stats_simulate.json").read_text())
    print(f"capture area {a.side} x {a.side} bins, {stats['genes']:,} genes, {stats['nnz']:,} non-zeros")
    print("| variant | wall (s) | peak RSS (GiB) |\n|---|---|---|")
    for variant in VARIANTS:
        mine = [row for row in rows if row["variant"] == variant]
        wall, rss = np.median([m["wall_s"] for m in mine]), max(m["peak_rss_gib"] for m in mine)
        print(f"| {variant} | {wall:.1f} | {rss:.2f} |")
    print("outputs equal" if not differ else f"outputs DIFFER in {differ}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
