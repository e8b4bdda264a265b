# Helpers shared by the rules: config validation, sample paths, folds, resources.
import json

from sparsitytrap import config as stconfig

stconfig.validate(config, source="config")
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
    return SAMPLES if chosen == "all" else chosen


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


def model_params(wc):
    """One model's resolved settings: only its own keys trigger a rerun of its jobs."""
    return stconfig.model_config(config, wc.model)


def all_targets():
    targets = [f"{R}/tiles/{s}.zarr" for s in SAMPLES]
    targets += expand(f"{R}/models/{{model}}/{{fold}}/predictions.zarr", model=MODELS, fold=FOLDS)
    targets += expand(f"{R}/eval/{{model}}/{{fold}}/per_gene.csv", model=MODELS, fold=FOLDS)
    targets += stats_targets() + figure_targets()
    return targets
