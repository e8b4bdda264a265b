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

    validate_spaceranger(a.spaceranger, a.dataset_id, fullres_image=a.fullres_image)
    print(f"{a.spaceranger}: looks like a valid Space Ranger Visium HD output")


def _ingest(a):
    from .ingest import ingest

    ingest(a.spaceranger, a.dataset_id, a.out, fullres_image=a.fullres_image, bins=a.bins)


def _select_genes(a):
    from .genes import select_genes

    folds = {}
    for item in a.folds or []:
        fold, sep, idx = item.partition("=")
        if not sep or not all(i.isdigit() and int(i) < len(a.sdata) for i in idx.split(",")):
            raise InputError("--folds", f"{item!r} is not FOLD=I,J with positions into the {len(a.sdata)} sdata")
        folds[fold] = [int(i) for i in idx.split(",")]
    select_genes(a.sdata, a.out, method=a.method, n_genes=a.n_genes, categories=a.categories, panel=a.panel,
                 folds=folds or None)  # fmt: skip


def _tile(a):
    from .tile import tile_sample

    tile_sample(
        a.sdata,
        a.genes,
        a.out,
        tile_bins=a.tile_bins,
        image_px=a.image_px,
        min_tissue_fraction=a.min_tissue_fraction,
        dataset_id=a.dataset_id,
    )


def _features(a):
    from .features import cache_features

    cfg = stconfig.load(a.config)
    cache_features(a.tiles, stconfig.encoder_config(cfg, a.encoder), a.out, device=a.device)


def _train(a):
    from .training import fit

    cfg = stconfig.load(a.config)
    fit(
        stconfig.model_config(cfg, a.model),
        a.tiles,
        a.features,
        a.out,
        encoder_cfg=stconfig.encoder_config(cfg, a.encoder),
    )


def _predict(a):
    from .predict import predict

    cfg = stconfig.load(a.config)
    predict(
        stconfig.model_config(cfg, a.model),
        weights=a.weights,
        tiles=a.tiles,
        features=a.features,
        out_pred=a.out,
        encoder_cfg=stconfig.encoder_config(cfg, a.encoder),
        sdata=a.sdata,
        prediction={**(cfg.get("prediction") or {}), **_mapping(a.prediction, "--prediction")},
    )


def _mapping(text, option):
    """An inline YAML mapping given on the command line ({} when not given)."""
    import yaml

    value = yaml.safe_load(text) if text else {}
    if not isinstance(value, dict):
        raise InputError(option, f"{text!r} is not a YAML mapping such as '{{stride_bins: 64}}'")
    return value


def _overlay(a):
    from .predict import write_predictions_sdata

    write_predictions_sdata(dict(zip(a.models, a.predictions, strict=True)), a.tiles, a.out)


def _settings(text):
    """`--settings`: a YAML file or an inline YAML mapping (the `diffusion:` section), checked."""
    from pathlib import Path

    import yaml

    from .diffusion.settings import check_settings

    value = yaml.safe_load(Path(text).read_text()) if text and Path(text).is_file() else yaml.safe_load(text or "{}")
    if not isinstance(value, dict):
        raise InputError("--settings", f"{text!r} is neither a YAML file nor a YAML mapping")
    return check_settings(value.get("diffusion", value), where="--settings")


def _correct_diffusion(a):
    from .diffusion import correct_sample
    from .io import write_json
    from .tile import read_gene_list

    report = correct_sample(
        a.sdata, read_gene_list(a.genes), a.out, dataset_id=a.dataset_id, settings=_settings(a.settings)
    )
    if a.report:
        write_json(report, a.report)


def _corrected_tiles(a):
    from .tile import corrected_tiles

    corrected_tiles(a.tiles, a.corrected, a.out)


def _validate_diffusion(a):
    from .diffusion.report import validate_diffusion

    validate_diffusion(
        a.sdata,
        a.corrected,
        a.truth,
        a.genes,
        a.out_table,
        a.out_summary,
        a.out_figure,
        dataset_id=a.dataset_id,
        settings=_settings(a.settings),
        figure_genes=a.figure_genes,
    )


def _ceiling(a):
    from .evaluate import evaluate_ceiling

    evaluate_ceiling(a.tiles, a.out, truth_zarr=a.truth, batch_tiles=a.batch_tiles, shuffle_seed=a.shuffle_seed,
                     ssim_min_tissue=a.ssim_min_tissue, n_draws=a.ceiling_draws)  # fmt: skip


def _evaluate(a):
    from .evaluate import evaluate

    evaluate(a.predictions, a.tiles, a.out, truth_zarr=a.truth, ceiling_csv=a.ceiling, genes_csv=a.genes,
             model=a.model, fold=a.fold, batch_tiles=a.batch_tiles, shuffle_seed=a.shuffle_seed,
             bootstrap=a.bootstrap, bootstrap_seed=a.bootstrap_seed, ssim_min_tissue=a.ssim_min_tissue)  # fmt: skip


def _stats(a):
    from .stats import run_comparison

    run_comparison(a.dirs_a, a.dirs_b, a.out, metrics=a.metrics, names=(a.name_a, a.name_b),
                   bootstrap=a.bootstrap, bootstrap_seed=a.bootstrap_seed)  # fmt: skip


def _factorial(a):
    from .stats import run_factorial

    cells = [{"decoder": c[0], "loss": c[1], "dirs": c[2:]} for c in a.cells]
    run_factorial(cells, a.out, metrics=a.metrics, reference=a.reference)


def _figure(a):
    import yaml

    from .figures import FIGURES

    entry = FIGURES[a.name]
    values = {}
    for item in a.set or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise InputError("--set", f"{item!r} is not KEY=VALUE")
        values[key] = yaml.safe_load(text)
    wanted = set(entry.args) | set(entry.options)
    missing, unknown = sorted(wanted - set(values)), sorted(set(values) - wanted)
    if missing or unknown:
        raise InputError(f"figure {a.name}", f"needs --set for {missing}" if missing else f"takes no {unknown}")
    entry.load()(**values, out_prefix=a.out, formats=a.format)


def _report_table(a):
    from .tables import html_table

    html_table(a.csv, a.out)


def _check_config(a):
    cfg = stconfig.load(a.config)
    print(
        json.dumps({"samples": list(cfg["samples"]), "models": list(cfg["models"]), "folds": stconfig.fold_names(cfg)})
    )


#: The workflow rule each sub-command is (tests check that every rule param is an option here).
RULE_COMMANDS = {
    "simulate": "simulate", "ingest": "ingest", "select_genes": "select-genes", "tile": "tile",
    "features": "features", "train": "train", "predict": "predict", "overlay": "overlay",
    "ceiling": "ceiling", "evaluate": "evaluate", "stats": "stats", "factorial": "factorial",
    "correct_diffusion": "correct-diffusion", "corrected_tiles": "corrected-tiles",
    "validate_diffusion": "validate-diffusion",
}  # fmt: skip
EVALUATION_DEFAULTS = stconfig.defaults("evaluation")
GENES_DEFAULTS, TILES_DEFAULTS = stconfig.defaults("genes"), stconfig.defaults("tiles")
CONFIG_HELP = "config file (its encoders, models and settings)"
METRICS_HELP = "per-gene metrics compared (columns of per_gene.csv)"
METRICS_DEFAULT = stconfig.defaults("stats")["metrics"]


def _evaluation_options(s, *names):
    """The `evaluation:` settings a command takes, with the config's defaults."""
    helps = {
        "batch_tiles": "tiles per batch (bounds memory)",
        "shuffle_seed": "seed of the label-shuffle null and the split-half thinning",
        "bootstrap": "tile-bootstrap resamples for the intervals (0: none)",
        "bootstrap_seed": "seed of the tile bootstrap",
        "ssim_min_tissue": "SSIM on tiles with a larger tissue fraction",
        "ceiling_draws": "split-half thinning draws averaged (real data, no --truth)",
    }
    for name in names:
        value = EVALUATION_DEFAULTS[name]
        s.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value, help=helps[name])


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Adds an option's default to its help, unless it has none or the help already says it."""

    def _get_help_string(self, action):
        if action.required or action.default in (None, argparse.SUPPRESS) or "default" in action.help:
            return action.help
        return super()._get_help_string(action)


def _command(sub, name, help):
    """A sub-command whose --help shows every option's default."""
    return sub.add_parser(name, help=help, description=help, formatter_class=_Defaults)


def parser():
    from importlib.metadata import version

    p = argparse.ArgumentParser(prog="sparsitytrap", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"%(prog)s {version('sparsitytrap')}")
    sub = p.add_subparsers(dest="command", required=True)

    s = _command(sub, "simulate", help="write one simulated patient in the Space Ranger layout, with ground truth")
    s.add_argument("--out", required=True, help="patient folder (outs/, truth.zarr, params.json are written in it)")
    s.add_argument("--sample", required=True, help="sample id (names the Space Ranger files and elements)")
    s.add_argument("--preset", default="demo", choices=["demo", "full"], help="demo: small and fast; full: real size")
    s.add_argument("--seed", type=int, help="random seed of the patient (default: the preset's)")
    s.add_argument("--n-rows", type=int, help="2 um bin rows of the capture area (default: the preset's)")
    s.add_argument("--n-cols", type=int, help="2 um bin columns (default: the preset's)")
    s.add_argument("--capture-efficiency", type=float, help="scale of the UMI counts (default: the preset's)")
    s.add_argument("--microns-per-pixel", type=float, help="H&E scale (default 0.48: off the bin grid)")
    s.set_defaults(func=_simulate)

    s = _command(sub, "validate", help="check a Space Ranger Visium HD folder before ingestion")
    s.add_argument("spaceranger", help="Space Ranger `outs` folder")
    s.add_argument("--dataset-id", help="prefix of {dataset_id}_feature_slice.h5 (default: inferred from the folder)")
    s.add_argument("--fullres-image", help="the full-resolution H&E when it is not in the folder")
    s.set_defaults(func=_validate)

    s = _command(sub, "ingest", help="read a Space Ranger folder with spatialdata-io into a SpatialData zarr")
    s.add_argument("spaceranger", help="Space Ranger `outs` folder")
    s.add_argument("--dataset-id", required=True, help="prefix of {dataset_id}_feature_slice.h5; names the elements")
    s.add_argument("--out", required=True, help="SpatialData store to write (zarr)")
    s.add_argument("--fullres-image", help="the full-resolution H&E when it is not in the folder")
    s.add_argument(
        "--bins",
        default="labels",
        choices=("labels", "squares", "circles"),
        help="how the bins are stored (ingest.bins)",
    )
    s.set_defaults(func=_ingest)

    s = _command(sub, "select-genes", help="choose the modelled genes and write genes.csv")
    s.add_argument("sdata", nargs="+", help="SpatialData stores of the samples the genes are chosen on")
    s.add_argument("--out", required=True, help="genes.csv to write")
    s.add_argument("--method", default=GENES_DEFAULTS["method"], choices=["variance", "hvg", "panel"],
                   help="variance of raw counts, scanpy highly-variable genes, or a panel file")  # fmt: skip
    s.add_argument("--n-genes", type=int, default=GENES_DEFAULTS["n_genes"], help="number of genes modelled")
    s.add_argument("--categories", help="TSV gene -> category, for the stratified statistics")
    s.add_argument("--panel", help="text file of gene names (method panel)")
    s.add_argument("--folds", nargs="+", metavar="FOLD=I,J",
                   help="leak-free selection: each fold's genes on its training sdata (positions, from 0)")  # fmt: skip
    s.set_defaults(func=_select_genes)

    s = _command(sub, "tile", help="cut 256 um tiles into a tile store")
    s.add_argument("sdata", help="SpatialData store written by `sparsitytrap ingest`")
    s.add_argument("--genes", required=True, help="genes.csv from `sparsitytrap select-genes`")
    s.add_argument("--out", required=True, help="tile store to write (zarr)")
    s.add_argument("--dataset-id", help="sample id naming the SpatialData elements (default: inferred)")
    s.add_argument("--tile-bins", type=int, default=TILES_DEFAULTS["tile_bins"], help="tile side in 2 um bins")
    s.add_argument("--image-px", type=int, default=TILES_DEFAULTS["image_px"], help="H&E crop side in pixels")
    s.add_argument("--min-tissue-fraction", type=float, default=TILES_DEFAULTS["min_tissue_fraction"],
                   help="keep tiles with at least this fraction of bins in tissue")  # fmt: skip
    s.set_defaults(func=_tile)

    s = _command(sub, "features", help="cache frozen-encoder token grids of every tile and dihedral view")
    s.add_argument("tiles", help="tile store from `sparsitytrap tile`")
    s.add_argument("--config", default="config.yaml", help=CONFIG_HELP)
    s.add_argument("--encoder", help="encoder name in the config (default: config's encoder)")
    s.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    s.add_argument("--out", required=True, help="feature store to write (zarr)")
    s.set_defaults(func=_features)

    s = _command(sub, "train", help="train one model on the training patients of a fold")
    s.add_argument("--config", default="config.yaml", help=CONFIG_HELP)
    s.add_argument("--model", required=True, help="model name in the config's `models:`")
    s.add_argument("--tiles", nargs="+", required=True, help="tile stores of the training patients")
    s.add_argument("--features", nargs="+", required=True, help="their feature caches, same order")
    s.add_argument("--encoder", help="encoder name in the config (default: the config's encoder)")
    s.add_argument("--out", required=True, help="model folder (best.safetensors, log.csv, checkpoint.pt)")
    s.set_defaults(func=_train)

    s = _command(sub, "predict", help="predict the test patient's 2 um rates with trained weights")
    s.add_argument("--config", default="config.yaml", help=CONFIG_HELP)
    s.add_argument("--model", required=True, help="model name in the config's `models:`")
    s.add_argument("--weights", required=True, help="best.safetensors from `sparsitytrap train`")
    s.add_argument("--tiles", required=True, help="the test patient's tile store")
    s.add_argument("--features", required=True, help="its feature store")
    s.add_argument("--sdata", help="its SpatialData store: with it, the seamless whole-sample map is predicted too")
    s.add_argument("--prediction", help="overlap settings over the config's `prediction:`, e.g. '{stride_bins: 64}'")
    s.add_argument("--encoder", help="encoder name in the config (default: the config's encoder)")
    s.add_argument("--out", required=True, help="predictions store to write (zarr)")
    s.set_defaults(func=_predict)

    s = _command(sub, "overlay", help="one SpatialData store with every model's 2 um predictions of a fold")
    s.add_argument("tiles", help="the fold's test sample tile store")
    s.add_argument("--models", nargs="+", required=True, help="model names, one per predictions store")
    s.add_argument("--predictions", nargs="+", required=True, help="their predictions.zarr, same order")
    s.add_argument("--out", required=True, help="SpatialData store to write (zarr)")
    s.set_defaults(func=_overlay)

    s = _command(
        sub, "correct-diffusion", help="correct lateral mRNA diffusion of an ingested sample (optimal transport)"
    )
    s.add_argument("sdata", help="SpatialData store written by `sparsitytrap ingest`")
    s.add_argument("--genes", required=True, help="genes.csv: the genes to correct")
    s.add_argument("--out", required=True, help="corrected-counts store (zarr)")
    s.add_argument("--report", help="JSON report: removed mass per gene, fitted parameters, diffusion length")
    s.add_argument("--dataset-id", help="sample id naming the SpatialData elements (default: inferred)")
    s.add_argument("--settings", help="the `diffusion:` settings: a YAML file or an inline mapping such as '{rho: 2}'")
    s.set_defaults(func=_correct_diffusion)

    s = _command(sub, "corrected-tiles", help="a tile store with its counts replaced by corrected counts")
    s.add_argument("tiles", help="the sample's tile store")
    s.add_argument("--corrected", required=True, help="its corrected-counts store")
    s.add_argument("--out", required=True, help="tile store to write (zarr)")
    s.set_defaults(func=_corrected_tiles)

    s = _command(sub, "validate-diffusion", help="raw, Richardson-Lucy and OT against a simulated sample's truth")
    s.add_argument("sdata", help="SpatialData store written by `sparsitytrap ingest`")
    s.add_argument("--corrected", required=True, help="corrected-counts store from `sparsitytrap correct-diffusion`")
    s.add_argument("--truth", required=True, help="the simulated sample's truth.zarr")
    s.add_argument("--genes", required=True, help="genes.csv: the genes compared")
    s.add_argument("--out-table", required=True, help="per gene and method (CSV)")
    s.add_argument("--out-summary", required=True, help="per method (CSV)")
    s.add_argument("--out-figure", required=True, help="figure path without extension (.png is written)")
    s.add_argument("--dataset-id", help="sample id naming the SpatialData elements (default: inferred)")
    s.add_argument("--settings", help="the `diffusion:` settings: a YAML file or an inline mapping")
    s.add_argument("--figure-genes", nargs="*", default=[], help="genes drawn (default: the first four)")
    s.set_defaults(func=_validate_diffusion)

    s = _command(sub, "ceiling", help="noise ceiling per gene of one test patient (once for every model)")
    s.add_argument("tiles", help="the test patient's tile store")
    s.add_argument("--truth", help="simulated truth.zarr; without it: split-half thinning of the counts")
    s.add_argument("--out", required=True, help="ceiling CSV")
    _evaluation_options(s, "batch_tiles", "shuffle_seed", "ssim_min_tissue", "ceiling_draws")
    s.set_defaults(func=_ceiling)

    s = _command(sub, "evaluate", help="per-gene metrics of one (model, fold), with null and noise ceiling")
    s.add_argument("predictions", help="predictions store from `sparsitytrap predict`")
    s.add_argument("tiles", help="the test patient's tile store")
    s.add_argument("--truth", help="simulated truth.zarr (the ceiling's true rates)")
    s.add_argument("--ceiling", help="ceiling table from `sparsitytrap ceiling` (skips recomputing it)")
    s.add_argument("--genes", help="genes.csv, for the category column")
    s.add_argument("--model", help="model name (default: the predictions store's)")
    s.add_argument("--fold", help="fold name (default: the predictions store's)")
    _evaluation_options(s, *EVALUATION_DEFAULTS)
    s.add_argument("--out", required=True, help="evaluation folder (per_gene.csv, per_tile.parquet, summary.json)")
    s.set_defaults(func=_evaluate)

    s = _command(sub, "stats", help="compare two models over folds: tables S1-S3 and a summary")
    s.add_argument("--dirs-a", nargs="+", required=True, help="evaluation folders of model A, one per fold")
    s.add_argument("--dirs-b", nargs="+", required=True, help="evaluation folders of model B, same folds")
    s.add_argument("--name-a", default="A", help="model A's name in the tables")
    s.add_argument("--name-b", default="B", help="model B's name in the tables")
    s.add_argument("--metrics", nargs="+", default=METRICS_DEFAULT, help=METRICS_HELP)
    _evaluation_options(s, "bootstrap", "bootstrap_seed")
    s.add_argument("--out", required=True, help="folder for S1_per_gene.csv ... summary.csv")
    s.set_defaults(func=_stats)

    s = _command(sub, "factorial", help="2x2 decoder x loss decomposition per fold and pooled")
    s.add_argument("--cells", nargs="+", action="append", required=True, metavar="DECODER LOSS DIR",
                   help="one cell: decoder, loss, then its evaluation folders (one per fold); give four")  # fmt: skip
    s.add_argument("--reference", nargs=2, default=["img2st", "mse"], metavar=("DECODER", "LOSS"),
                   help="the cell the effects are measured from")  # fmt: skip
    s.add_argument("--metrics", nargs="+", default=METRICS_DEFAULT, help=METRICS_HELP)
    s.add_argument("--out", required=True, help="factorial CSV to write")
    s.set_defaults(func=_factorial)

    from .figures import FIGURES

    s = _command(sub, "figure", help="draw one figure of the workflow (`figures.FIGURES`) from its inputs")
    s.add_argument("name", choices=sorted(FIGURES), help="the figure")
    s.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="an argument of the figure (its data and options; a YAML value: a path, a number, a list)",
    )
    s.add_argument("--format", nargs="+", default=["png"], help="file formats written (png, pdf, svg)")
    s.add_argument("--out", required=True, help="output path without extension")
    s.set_defaults(func=_figure)

    s = _command(sub, "check-config", help="validate a config file and list its samples, models and folds")
    s.add_argument("config", nargs="?", default="config.yaml", help=CONFIG_HELP)
    s.set_defaults(func=_check_config)

    s = _command(sub, "report-table", help="the HTML view of a CSV table, as `snakemake --report` shows it")
    s.add_argument("csv", help="the CSV table")
    s.add_argument("--out", required=True, help="HTML file to write")
    s.set_defaults(func=_report_table)
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
