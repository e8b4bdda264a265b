"""`sparsitytrap <stage>`: every workflow stage, runnable without Snakemake.

Each sub-command is a thin wrapper around one module's entry point; bad input ends the command
with one line on stderr (exit status 2).
"""

import argparse
import json
import sys

from . import config as stconfig
from .errors import InputError


def _simulate(a):
    from .simulate import simulate_patient

    params = {"preset": a.preset}
    if a.microns_per_pixel is not None:
        params["microns_per_pixel"] = a.microns_per_pixel
    for key in ("seed", "n_rows", "n_cols", "capture_efficiency"):
        if getattr(a, key) is not None:
            params[key] = getattr(a, key)
    simulate_patient(a.out, a.sample, params)


def _validate(a):
    from .ingest import validate_spaceranger

    validate_spaceranger(a.spaceranger, a.dataset_id)
    print(f"{a.spaceranger}: looks like a valid Space Ranger Visium HD output")


def _ingest(a):
    from .ingest import ingest

    ingest(a.spaceranger, a.dataset_id, a.out, fullres_image=a.fullres_image)


def _select_genes(a):
    from .genes import select_genes

    select_genes(a.sdata, a.out, method=a.method, n_genes=a.n_genes, categories=a.categories, panel=a.panel)


def _tile(a):
    from .tile import tile_sample

    tile_sample(a.sdata, a.genes, a.out, tile_bins=a.tile_bins, image_px=a.image_px,
                min_tissue_fraction=a.min_tissue_fraction, dataset_id=a.dataset_id)


def _features(a):
    from .features import cache_features

    cfg = stconfig.load(a.config)
    cache_features(a.tiles, stconfig.encoder_config(cfg, a.encoder), a.out, device=a.device)


def _train(a):
    from .train import fit

    cfg = stconfig.load(a.config)
    fit(stconfig.model_config(cfg, a.model), a.tiles, a.features, a.out, encoder_cfg=stconfig.encoder_config(cfg))


def _predict(a):
    from .predict import predict

    cfg = stconfig.load(a.config)
    predict(stconfig.model_config(cfg, a.model), weights=a.weights, tiles=a.tiles, features=a.features,
            out_pred=a.out, out_sdata=a.out_sdata, encoder_cfg=stconfig.encoder_config(cfg))


def _evaluate(a):
    from .evaluate import evaluate

    evaluate(a.predictions, a.tiles, a.out, truth_zarr=a.truth, ceiling_csv=a.ceiling, genes_csv=a.genes,
             batch_tiles=a.batch_tiles, bootstrap=a.bootstrap)


def _stats(a):
    from .stats import run_comparison

    run_comparison(a.a, a.b, a.out, names=(a.name_a, a.name_b), n_boot=a.bootstrap)


def _check_config(a):
    cfg = stconfig.load(a.config)
    print(json.dumps({"samples": list(cfg["samples"]), "models": list(cfg["models"]), "folds": stconfig.fold_names(cfg)}))


def parser():
    p = argparse.ArgumentParser(prog="sparsitytrap", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="write one simulated patient in the Space Ranger layout, with ground truth")
    s.add_argument("--out", required=True, help="patient folder (outs/, truth.zarr, params.json are written in it)")
    s.add_argument("--sample", required=True)
    s.add_argument("--preset", default="demo", choices=["demo", "full"])
    s.add_argument("--seed", type=int)
    s.add_argument("--n-rows", type=int)
    s.add_argument("--n-cols", type=int)
    s.add_argument("--capture-efficiency", type=float)
    s.add_argument("--microns-per-pixel", type=float, help="H&E scale (default 0.48: off the bin grid)")
    s.set_defaults(func=_simulate)

    s = sub.add_parser("validate", help="check a Space Ranger Visium HD folder before ingestion")
    s.add_argument("spaceranger")
    s.add_argument("--dataset-id", required=True)
    s.set_defaults(func=_validate)

    s = sub.add_parser("ingest", help="read a Space Ranger folder with spatialdata-io into a SpatialData zarr")
    s.add_argument("spaceranger")
    s.add_argument("--dataset-id", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--fullres-image")
    s.set_defaults(func=_ingest)

    s = sub.add_parser("select-genes", help="choose the modelled genes and write genes.csv")
    s.add_argument("sdata", nargs="+")
    s.add_argument("--out", required=True)
    s.add_argument("--method", default="variance", choices=["variance", "hvg", "panel"])
    s.add_argument("--n-genes", type=int, default=50)
    s.add_argument("--categories")
    s.add_argument("--panel")
    s.set_defaults(func=_select_genes)

    s = sub.add_parser("tile", help="cut 256 um tiles into a tile store")
    s.add_argument("sdata")
    s.add_argument("--genes", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--dataset-id")
    s.add_argument("--tile-bins", type=int, default=128)
    s.add_argument("--image-px", type=int, default=224)
    s.add_argument("--min-tissue-fraction", type=float, default=0.5)
    s.set_defaults(func=_tile)

    s = sub.add_parser("features", help="cache frozen-encoder token grids of every tile and dihedral view")
    s.add_argument("tiles")
    s.add_argument("--config", default="config.yaml")
    s.add_argument("--encoder", help="encoder name in the config (default: config's encoder)")
    s.add_argument("--device", default="auto")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_features)

    s = sub.add_parser("train", help="train one model on the training patients of a fold")
    s.add_argument("--config", default="config.yaml")
    s.add_argument("--model", required=True)
    s.add_argument("--tiles", nargs="+", required=True, help="tile stores of the training patients")
    s.add_argument("--features", nargs="+", required=True, help="their feature caches, same order")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_train)

    s = sub.add_parser("predict", help="predict the test patient's 2 um rates with trained weights")
    s.add_argument("--config", default="config.yaml")
    s.add_argument("--model", required=True)
    s.add_argument("--weights", required=True)
    s.add_argument("--tiles", required=True)
    s.add_argument("--features", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--out-sdata", required=True)
    s.set_defaults(func=_predict)

    s = sub.add_parser("evaluate", help="per-gene metrics of one (model, fold), with null and noise ceiling")
    s.add_argument("predictions")
    s.add_argument("tiles")
    s.add_argument("--truth")
    s.add_argument("--ceiling", help="ceiling table from a previous run (skips recomputing it)")
    s.add_argument("--genes", help="genes.csv, for the category column")
    s.add_argument("--batch-tiles", type=int, default=4)
    s.add_argument("--bootstrap", type=int, default=1000)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_evaluate)

    s = sub.add_parser("stats", help="compare two models over folds: tables S1-S3 and a summary")
    s.add_argument("--a", nargs="+", required=True, help="evaluation folders of model A, one per fold")
    s.add_argument("--b", nargs="+", required=True, help="evaluation folders of model B, same folds")
    s.add_argument("--name-a", default="A")
    s.add_argument("--name-b", default="B")
    s.add_argument("--bootstrap", type=int, default=1000)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_stats)

    s = sub.add_parser("check-config", help="validate a config file and list its samples, models and folds")
    s.add_argument("config", nargs="?", default="config.yaml")
    s.set_defaults(func=_check_config)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except InputError as err:
        print(f"sparsitytrap {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
