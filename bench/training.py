"""Training epoch time: tokens from the feature cache (read from zarr, or resident) against encoding on the fly.

Trains the config's models on one fold of the demo's tile stores and feature caches (``results/``)
in three ways, side by side in one run, each repeated and interleaved (a shared machine's load
then falls on all alike):

- ``cache``: tokens read from the feature cache per batch (``training.resident: false``);
- ``cache resident``: the training and validation tiles loaded once as tensors (``resident: true``);
- ``on the fly``: colour jitter, so every step encodes the images with the frozen encoder.

Prints seconds per epoch (median over the epochs after the first, and the repeats), the set-up
time of each job (statistics, encoder, resident load) and the ratios to ``cache``.

    .venv/bin/python bench/training.py [--results results] [--fold test-P1] [--epochs 3] [--repeats 2]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from machine import describe

from sparsitytrap import config as stconfig
from sparsitytrap.genes import fold_genes
from sparsitytrap.training import fit

VARIANTS = {
    "cache": {"resident": False},
    "cache resident": {"resident": True},
    "on the fly": {"resident": False, "augment": {"dihedral": True, "color_jitter": True}},
}


def run(cfg, results, model, fold, variant, epochs, out):
    """One training job of `variant`: (seconds of each epoch, seconds of the set-up)."""
    train, _ = stconfig.fold_samples(cfg, fold)
    spec = stconfig.model_config(cfg, model)
    training = {**spec["training"], "epochs": epochs, "patience": epochs, **VARIANTS[variant]}
    spec = {**spec, "training": training, "genes": fold_genes(results / "genes" / "genes.csv", fold)}
    feats = results / "features" / cfg["encoder"]
    start = time.perf_counter()
    fit(
        spec,
        [results / "tiles" / f"{s}.zarr" for s in train],
        [feats / f"{s}.zarr" for s in train],
        out,
        encoder_cfg=stconfig.encoder_config(cfg),
        fold=fold,
        resume=False,
    )
    seconds = pd.read_csv(out / "log.csv")["seconds"].to_numpy()
    return seconds, time.perf_counter() - start - seconds.sum()


def table(rows):
    """Per model and variant: median s/epoch (epochs after the first), set-up s, ratio to ``cache``."""
    df = pd.DataFrame(rows)
    out = df.groupby(["model", "variant"], sort=False).agg(
        s_per_epoch=("steady", lambda s: float(np.median(np.concatenate(list(s))))),
        first_epoch_s=("first", "median"),
        setup_s=("setup", "median"),
    )
    base = out.xs("cache", level="variant")["s_per_epoch"]
    out["vs_cache"] = out["s_per_epoch"] / base.reindex(out.index.get_level_values("model")).to_numpy()
    return out.reset_index()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="config.yaml")
    ap.add_argument("--results", default="results", help="results folder holding tiles/, features/, genes/")
    ap.add_argument("--fold", default="test-P1", help="fold trained (its training samples' stores are read)")
    ap.add_argument("--models", nargs="+", default=["E_hist2st_poisson", "F_img2st_poisson"])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--epochs", type=int, default=3, help="epochs per job (the first is reported apart)")
    ap.add_argument("--repeats", type=int, default=2, help="jobs per model and variant, interleaved")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg, results = stconfig.load(a.config), Path(a.results)
    print(describe(), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for model in a.models:
                for variant in a.variants:
                    out = Path(tmp) / f"{model}-{variant.replace(' ', '_')}-{r}"
                    seconds, setup = run(cfg, results, model, a.fold, variant, a.epochs, out)
                    rows.append({"model": model, "variant": variant, "repeat": r, "first": float(seconds[0]),
                                 "steady": seconds[1:], "setup": setup})  # fmt: skip
                    print(f"{model} {variant} #{r}: epochs {np.round(seconds, 2).tolist()} s, set-up {setup:.1f} s")
    print(table(rows).to_markdown(index=False, floatfmt=".3f"))
    if a.json:
        Path(a.json).write_text(json.dumps([{**r, "steady": r["steady"].tolist()} for r in rows], indent=1))


if __name__ == "__main__":
    main()
