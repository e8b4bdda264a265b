"""Seams of whole-sample predictions: tile by tile vs overlapping windows blended, and the extra time.

For each trained model of one fold of a workflow's results, predicts the test patient twice on one
CPU thread: the non-overlapping tiles (what evaluation scores) and, in addition, the overlapping
windows of the ``prediction:`` settings blended into the ``stitched`` map. Prints, per model, the
mean |difference| of the predicted 2 um rates of neighbouring in-tissue bins across tile borders
and inside tiles (a seam: across > inside), for the tiles laid side by side and for the stitched
map, and both prediction times.

    .venv/bin/python bench/seams.py [--config config.yaml] [--results DIR] [--fold test-P3] [--models ...]

It needs the workflow's outputs of the fold (ingested test sample, its tile store and feature
cache, each model's ``best.safetensors``); when they are missing it prints the snakemake command
that builds them.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sparsitytrap import config as stconfig
from sparsitytrap.predict import extent, predict, seams, tile_map
from sparsitytrap.stores.predictions import open_predictions
from sparsitytrap.stores.tiles import open_tiles


def inputs(cfg, results, fold, models):
    """Paths the fold's predictions need, and those missing."""
    _, test = stconfig.fold_samples(cfg, fold)
    paths = {
        "sdata": results / "sdata" / f"{test}.zarr",
        "tiles": results / "tiles" / f"{test}.zarr",
        "features": results / "features" / cfg["encoder"] / f"{test}.zarr",
        **{m: results / "models" / m / fold / "best.safetensors" for m in models},
    }
    return paths, [str(p) for p in paths.values() if not p.exists()]


def timed_predict(cfg, model, paths, out, prediction):
    start = time.perf_counter()
    predict(
        stconfig.model_config(cfg, model),
        weights=paths[model],
        tiles=paths["tiles"],
        features=paths["features"],
        out_pred=out,
        encoder_cfg=stconfig.encoder_config(cfg),
        device="cpu",
        sdata=paths["sdata"] if prediction else None,
        prediction=prediction,
    )
    return time.perf_counter() - start


def measure(cfg, model, paths, work, prediction):
    """Seams (across, inside) of the tiled and stitched maps, and the two prediction times."""
    tiled_s = timed_predict(cfg, model, paths, work / f"{model}_tiled.zarr", None)
    both_s = timed_predict(cfg, model, paths, work / f"{model}_stitched.zarr", prediction)
    root = open_tiles(paths["tiles"])
    lo, _ = extent(root)
    mask = tile_map(root, root.mask, fill=False, dtype=bool)
    tiled = tile_map(root, open_predictions(work / f"{model}_tiled.zarr").rates[:].astype(np.float32))
    store = open_predictions(work / f"{model}_stitched.zarr")
    stitched = store.stitched[:].astype(np.float32)
    return {
        "model": model,
        "tiles": root.n_tiles,
        "windows": store.attrs["stitched"]["windows"],
        "tiled": seams(tiled, mask, root.tile_bins, lo),
        "stitched": seams(stitched, mask, root.tile_bins, lo),
        "tiled_s": tiled_s,
        "with_stitch_s": both_s,
    }


def print_table(rows, prediction):
    print(f"prediction: {prediction}; seam = mean |rate difference| of neighbouring in-tissue bins")
    print("| model | tiles | windows | tiled: across / inside (ratio) | stitched: across / inside (ratio) "
          "| predict tiles (s) | tiles + stitched (s) | extra |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{a:.4g} / {b:.4g} ({a / b:.2f})" for a, b in (r["tiled"], r["stitched"])]
        extra = r["with_stitch_s"] / r["tiled_s"]
        print(f"| {r['model']} | {r['tiles']} | {r['windows']} | {cells[0]} | {cells[1]} "
              f"| {r['tiled_s']:.1f} | {r['with_stitch_s']:.1f} | {extra:.1f}x |")  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--results", help="the workflow's results folder (default: the config's `results`)")
    p.add_argument("--fold", help="default: the config's first fold")
    p.add_argument("--models", nargs="+", help="default: every model of the config with weights for the fold")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "st_seams_bench"))
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = stconfig.load(a.config)
    results = Path(a.results or cfg["results"])
    fold = a.fold or stconfig.fold_names(cfg)[0]
    models = a.models or [m for m in cfg["models"] if (results / "models" / m / fold / "best.safetensors").exists()]
    paths, missing = inputs(cfg, results, fold, models)
    if missing or not models:
        targets = " ".join(missing) or f"{results}/models/<model>/{fold}/best.safetensors"
        sys.exit(
            f"missing workflow outputs: run  .venv/bin/snakemake --cores 2 --config results={results} -- {targets}"
        )
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = [measure(cfg, m, paths, work, cfg["prediction"]) for m in models]
    print_table(rows, cfg["prediction"])


if __name__ == "__main__":
    main()
