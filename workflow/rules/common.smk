# Helpers shared by the rules: config validation, sample paths, folds, resources.
import os
import re

import pandas as pd

from sparsitytrap import config as stconfig

for (
    _path
) in workflow.configfiles:  # YAML keeps the last of a duplicated key: refuse it instead
    stconfig.read_yaml(_path)
# nested `--config` values arrive as strings (Snakemake reads them with YAML's BaseLoader)
stconfig.retype_cli_config(config, workflow.config_settings.config)
stconfig.validate(
    config,
    source="config",
    # `--configfile` replaces config.yaml (Snakefile); `--config` values are named as such
    files=workflow.overwrite_configfiles or workflow.configfiles,
    cli=workflow.config_settings.config,
)
# key order never matters to a rerun (params are compared by their representation)
canonical = stconfig.canonical(config)
config.clear()
config.update(canonical)
R = config["results"]
SAMPLES = list(config["samples"])
MODELS = list(config["models"])
FOLDS = stconfig.fold_names(config)
ENCODER = config["encoder"]
RES = config.get("resources", {})


wildcard_constraints:
    sample="|".join(SAMPLES),
    model="|".join(MODELS),
    fold="|".join(FOLDS),


def is_simulated(sample):
    return "simulate" in config["samples"][sample]


def spaceranger_dir(wc):
    """The Space Ranger `outs` folder of a sample: simulated by the workflow or given in config."""
    if is_simulated(wc.sample):
        return f"{R}/simulated/{wc.sample}/outs"
    return config["samples"][wc.sample]["path"]


def simulation_params(wc):
    return {**config.get("simulation", {}), **config["samples"][wc.sample]["simulate"]}


def gene_samples():
    chosen = config["genes"]["samples"]
    return SAMPLES if chosen in ("all", "training") else chosen


def gene_folds():
    """Leak-free selection (`genes.samples: training`): fold -> positions of its training samples."""
    if config["genes"]["samples"] != "training" or config["genes"]["method"] == "panel":
        return None
    return {
        f: [SAMPLES.index(s) for s in stconfig.fold_samples(config, f)[0]]
        for f in FOLDS
    }


def truth_of(sample):
    """Ground truth store of a simulated sample (the noise ceiling), none for real data."""
    return f"{R}/simulated/{sample}/truth.zarr" if is_simulated(sample) else []


def test_sample(fold):
    return stconfig.fold_samples(config, fold)[1]


def gpu_resources():
    """GPU request for the rules that run the encoder or train a decoder."""
    res = {"gpu": RES.get("gpu", 1)}
    if RES.get("gpu_model"):
        res["gpu_model"] = RES["gpu_model"]
    return res


def scaled(resource, rule, default):
    """A rule's mem_mb or runtime (config `resources.<resource>.<rule>`, else the default), doubled per retry."""
    base = RES.get(resource, {}).get(rule, default)
    return lambda wc, attempt: base * attempt


def model_params(wc):
    """One model's resolved settings: only its own keys trigger a rerun of its jobs.

    Not those that only serve batches (stconfig.SERVING_KEYS): the train script reads them from config.
    """
    return stconfig.model_config(config, wc.model, serving=False)


def all_targets():
    targets = [f"{R}/tiles/{s}.zarr" for s in SAMPLES]
    targets += expand(f"{R}/predictions/{{fold}}.zarr", fold=FOLDS)
    targets += expand(
        f"{R}/eval/{{model}}/{{fold}}/per_gene.csv", model=MODELS, fold=FOLDS
    )
    targets += stats_targets() + figure_targets() + diffusion_targets()
    return targets


DIFFUSION = stconfig.diffusion_settings(config)


def diffusion_targets():
    """Validation of the correction against truth, for the simulated samples, when any model uses it."""
    used = any(m.get("counts", "raw") == "corrected" for m in config["models"].values())
    validate = config.get("diffusion", {}).get("validate", True)
    if not (used and validate):
        return []
    chosen = (
        SAMPLES if validate is True else validate
    )  # true: every simulated sample; or a list
    return [f"{R}/diffusion/{s}/validation.csv" for s in chosen if is_simulated(s)]


def stitched(fold):
    """Whether `predict` blends the seamless map of this fold (`prediction.stitch`: drawn, all, none)."""
    mode = config["prediction"]["stitch"]
    return mode == "all" or (mode == "drawn" and fold in DRAWN_FOLDS)


def tiles_of(model):
    """Tile stores a model trains on: raw counts, or diffusion-corrected (`counts: corrected`)."""
    counts = config["models"][model].get("counts", "raw")
    return "tiles" if counts == "raw" else "tiles_corrected"


def train_inputs(wc):
    train, _ = stconfig.fold_samples(config, wc.fold)
    return {
        "tiles": [f"{R}/{tiles_of(wc.model)}/{s}.zarr" for s in train],
        "features": [f"{R}/features/{ENCODER}/{s}.zarr" for s in train],
        "genes": f"{R}/genes/genes.csv",  # the fold's own genes (genes.samples: training)
    }


# --- evaluation, statistics and figures ---
from sparsitytrap.figures import FIGURES

FIG = f"{R}/figures"
FORMATS = config["figures"]["format"]
COMPARISONS = {c["name"]: c for c in config.get("comparisons", [])}
MOSAIC_GENES = config["figures"].get("mosaic_genes", [])
if MOSAIC_GENES and os.path.exists(
    f"{R}/genes/genes.csv"
):  # plan time, once genes are chosen
    from sparsitytrap.genes import check_required

    check_required(
        pd.read_csv(f"{R}/genes/genes.csv")["gene"].tolist(),
        MOSAIC_GENES,
        source=f"{R}/genes/genes.csv",
    )
MULTISCALE = config["figures"].get("multiscale_model")
DRAWN_FOLDS = (
    FOLDS if config["figures"]["folds"] == "all" else config["figures"]["folds"]
)


wildcard_constraints:
    comparison="|".join(map(re.escape, COMPARISONS)) or "(?!)",
    gene="|".join(map(re.escape, MOSAIC_GENES)) or "(?!)",


def eval_dir(model, fold):
    return f"{R}/eval/{model}/{fold}"


def eval_files(models, folds=FOLDS):
    """The three files of each evaluation folder (figures and stats read the folders)."""
    return [
        f"{eval_dir(m, f)}/{name}"
        for m in models
        for f in folds
        for name in ("per_gene.csv", "per_tile.parquet", "summary.json")
    ]


def figure(name, caption, category="Figures", subcategory=None, labels=None):
    """Outputs `{name}.{fmt}` for every configured format; the PNG goes into the report."""
    out = []
    for fmt in FORMATS:
        path = f"{FIG}/{name}.{fmt}"
        if fmt == "png":
            path = report(path, caption=f"../report/{caption}.rst", category=category,
                          subcategory=subcategory, labels=labels)  # fmt: skip
        out.append(path)
    return out


#: CSV pattern -> its report entry; the job that writes the CSV also writes its HTML view
#: (`sparsitytrap.smk.job` fills every `.html` output whose `.csv` twin is an output)
TABLES = {}
STATS_TABLES = ["S1_per_gene", "S2_per_category", "S3_per_quartile", "summary"]


def table(path, caption, category, subcategory=None, labels=None):
    """A CSV output whose HTML view (`view(path)`, same name `.html`) goes into the report: the
    report shows HTML in the page but offers a CSV only as a download.
    """
    TABLES[path] = dict(caption=f"../report/{caption}.rst", category=category,
                        subcategory=subcategory, labels=labels)  # fmt: skip
    return path


def view(path):
    """The report item of table `path`: its HTML view, an output of the same rule."""
    return report(path.removesuffix(".csv") + ".html", **TABLES[path])


FACTORIAL = config.get("factorial") or {}
FACTORIAL_MODELS = [c["model"] for c in FACTORIAL.get("cells", [])]


def factorial_cells():
    """The 2x2 cells as given in config, each with its evaluation folders (one per fold)."""
    return [
        {**c, "dirs": [eval_dir(c["model"], f) for f in FOLDS]}
        for c in FACTORIAL.get("cells", [])
    ]


def stats_targets():
    out = [f"{R}/stats/{c}/summary.csv" for c in COMPARISONS]
    if config.get("factorial"):
        out.append(f"{R}/stats/factorial_2x2.csv")
    return out


def figure_targets():
    """Every figure of sparsitytrap.figures.FIGURES that the config asks for, each output
    name expanded over what it is drawn per; first format (the rule writes all formats).
    """
    over = {"comparison": list(COMPARISONS), "fold": DRAWN_FOLDS, "gene": MOSAIC_GENES}
    names = [n for f in FIGURES.values() if f.drawn(config) for n in f.names(over)]
    return [f"{FIG}/{n}.{FORMATS[0]}" for n in names]
