"""How much a held-out score moves with the training seed: what a difference between models must beat.

Retrains models of one fold of a finished run with several `training.seed` values (weights,
validation split and shuffling all follow the seed), predicts and evaluates each exactly as the
workflow does, and prints per model the mean over genes of each metric for every seed, and
their mean and SD over seeds.

    python bench/seeds.py [--results results] [--fold test-P1] [--models E_hist2st_poisson D_hist2st_mse]
                          [--seeds 42 1 2] [--training epochs=30,patience=5] [--work DIR]

`--training` overrides `training` keys of every model (KEY=VALUE,...: as `bench/plateau.py`),
e.g. the settings of `config/converged.yaml` with `--results results_converged`.
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from plateau import parse_setting

from sparsitytrap import config as stconfig
from sparsitytrap.evaluate import evaluate
from sparsitytrap.genes import fold_genes
from sparsitytrap.predict import predict
from sparsitytrap.training import fit

METRICS = ("pcc_2um_pooled", "pcc_8um_pooled", "scc_2um_pooled")


def one_seed(cfg, results, model, fold, seed, work, training=None):
    train, test = stconfig.fold_samples(cfg, fold)
    spec = stconfig.model_config(cfg, model)
    spec = {
        **spec,
        "training": {**spec["training"], **(training or {}), "seed": seed},
        "genes": fold_genes(results / "genes" / "genes.csv", fold),
    }
    tiles = "tiles" if cfg["models"][model].get("counts", "raw") == "raw" else "tiles_corrected"
    feats = results / "features" / cfg["encoder"]
    enc = stconfig.encoder_config(cfg)
    out = work / model / str(seed)
    train_tiles = [results / tiles / f"{s}.zarr" for s in train]
    fit(spec, train_tiles, [feats / f"{s}.zarr" for s in train], out, encoder_cfg=enc, fold=fold)
    test_tiles = results / "tiles" / f"{test}.zarr"
    predict(
        spec,
        weights=out / "best.safetensors",
        tiles=test_tiles,
        features=feats / f"{test}.zarr",
        out_pred=out / "pred.zarr",
        encoder_cfg=enc,
    )
    ceiling = results / "eval" / "ceiling" / f"{test}.csv"
    table = evaluate(
        out / "pred.zarr", test_tiles, out / "eval", ceiling_csv=ceiling, model=model, fold=fold, bootstrap=0
    )
    return {m: float(np.nanmean(table[m])) for m in METRICS}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config.yaml", help="the run's config")
    parser.add_argument("--results", default="results", help="the finished run's results folder")
    parser.add_argument("--fold", default="test-P1", help="fold retrained")
    parser.add_argument("--models", nargs="+", default=["E_hist2st_poisson", "D_hist2st_mse"], help="models retrained")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2], help="training.seed values")
    parser.add_argument("--training", default="", help="training overrides, KEY=VALUE[,KEY=VALUE...]")
    parser.add_argument("--work", help="folder for the retrained models (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    training = parse_setting(args.training)
    cfg = stconfig.load(args.config)
    results = Path(args.results)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        rows = [
            {"model": m, "seed": s, **one_seed(cfg, results, m, args.fold, s, work, training)}
            for m in args.models
            for s in args.seeds
        ]
    df = pd.DataFrame(rows)
    print(df.to_markdown(index=False, floatfmt=".4f"))
    spread = df.groupby("model")[list(METRICS)].agg(["mean", "std"])
    print(spread.to_markdown(floatfmt=".4f"))
    print(json.dumps({"fold": args.fold, "seeds": args.seeds, "training": training}))


if __name__ == "__main__":
    main()
