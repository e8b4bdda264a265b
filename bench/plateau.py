"""Do other training settings bring the default models to a plateau? Validation only.

Retrains models of a finished run with other `training` settings (the cap `epochs` of the
cosine, `lr`, `batch_size`, ...), on the run's own tiles and features, and prints per (model, fold, setting)
what the plateau test of issue 13 reads from the validation log: the best epoch, the epochs run
(early stopping), the last quarter's share of the decrease of the validation loss since epoch 1,
and the validation loss and pooled PCC at 8 um of the best epoch. The test patients are never
read. Every number but the seconds is seeded: the same run to run on one machine.

    .venv/bin/python bench/plateau.py [--results results] [--models D_hist2st_mse E_hist2st_poisson]
        [--folds test-P1 test-P3] [--settings epochs=12 epochs=16 epochs=12,batch_size=1 ...]

Each setting is a comma-separated list of `training` keys and values; an empty one (``""``) is the
config as it is.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from sparsitytrap import config as stconfig
from sparsitytrap.genes import fold_genes
from sparsitytrap.training import fit

PLATEAU_SHARE = 0.05  # the second criterion: the last quarter brought < 5 % of the decrease


def parse_setting(text):
    """``"epochs=16,lr=4e-3"`` -> ``{"epochs": 16, "lr": 0.004}`` (values read as YAML)."""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    return {k.strip(): yaml.safe_load(v) for k, v in pairs}


def one_run(cfg, results, model, fold, setting, out):
    train, _ = stconfig.fold_samples(cfg, fold)  # the training patients only
    spec = stconfig.model_config(cfg, model)
    t = {**spec["training"], **parse_setting(setting)}
    spec = {
        **spec,
        "training": t,
        "genes": fold_genes(results / "genes" / "genes.csv", fold),
    }
    feats = results / "features" / cfg["encoder"]
    start = time.perf_counter()
    fit(
        spec,
        [results / "tiles" / f"{s}.zarr" for s in train],
        [feats / f"{s}.zarr" for s in train],
        out,
        encoder_cfg=stconfig.encoder_config(cfg),
        fold=fold,
    )
    v = json.loads((out / "metrics_val.json").read_text())
    share = v["last_quarter_share"]
    plateau = v["best_epoch"] < v["epochs_run"] or (share is not None and share < PLATEAU_SHARE)
    return {
        "model": model,
        "fold": fold,
        "setting": setting or "(config)",
        "epochs": t["epochs"],
        "lr": t["lr"],
        "batch_size": t["batch_size"],
        "best_epoch": v["best_epoch"],
        "epochs_run": v["epochs_run"],
        "stop": v.get("stop"),
        "last_quarter_share": share,
        "plateau": plateau,
        "val_loss": v["val_loss"],
        "val_pcc_8um": v["val_pcc_8um"],
        "seconds": round(time.perf_counter() - start, 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config.yaml", help="the run's config")
    parser.add_argument("--results", default="results", help="the finished run's results folder")
    parser.add_argument("--models", nargs="+", default=["D_hist2st_mse", "E_hist2st_poisson"])
    parser.add_argument("--folds", nargs="+", default=["test-P1", "test-P3"])
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["", "epochs=16", "epochs=20", "lr=6e-3", "lr=8e-3"],
        help="training overrides, KEY=VALUE[,KEY=VALUE...] ('' = the config as it is)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = stconfig.load(args.config)
    results = Path(args.results)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            one_run(cfg, results, m, f, s, Path(tmp) / f"{m}_{f}_{i}")
            for m in args.models
            for f in args.folds
            for i, s in enumerate(args.settings)
        ]
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4g"))


if __name__ == "__main__":
    main()
