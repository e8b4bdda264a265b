# Frozen-encoder feature cache -> one training job per (model, fold) -> predictions of the test patient.
# `train` reads only the training patients; `predict` is the first job that opens the test patient.


rule features:
    input:
        f"{R}/tiles/{{sample}}.zarr",
    output:
        directory(f"{R}/features/{ENCODER}/{{sample}}.zarr"),
    params:
        encoder=stconfig.encoder_config(config),
        device=config["training"].get("device", "auto"),
    log:
        f"{R}/logs/features/{ENCODER}/{{sample}}.log",
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=lambda wc, attempt: 60 * attempt,
        **gpu_resources(),
    conda:
        "../../envs/sparsitytrap.yaml"
    script:
        "../scripts/features.py"


def train_inputs(wc):
    train, _ = stconfig.fold_samples(config, wc.fold)
    return {
        "tiles": [f"{R}/tiles/{s}.zarr" for s in train],
        "features": [f"{R}/features/{ENCODER}/{s}.zarr" for s in train],
    }


rule train:
    input:
        unpack(train_inputs),
    output:
        weights=f"{R}/models/{{model}}/{{fold}}/best.safetensors",
        log_csv=f"{R}/models/{{model}}/{{fold}}/log.csv",
        val=f"{R}/models/{{model}}/{{fold}}/metrics_val.json",
    params:
        model=model_params,
        encoder=stconfig.encoder_config(config),
    log:
        f"{R}/logs/train/{{model}}/{{fold}}.log",
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 240 * attempt,
        **gpu_resources(),
    conda:
        "../../envs/sparsitytrap.yaml"
    script:
        "../scripts/train.py"


rule predict:
    input:
        weights=f"{R}/models/{{model}}/{{fold}}/best.safetensors",
        tiles=lambda wc: f"{R}/tiles/{test_sample(wc.fold)}.zarr",
        features=lambda wc: f"{R}/features/{ENCODER}/{test_sample(wc.fold)}.zarr",
    output:
        pred=directory(f"{R}/models/{{model}}/{{fold}}/predictions.zarr"),
        sdata=directory(f"{R}/models/{{model}}/{{fold}}/predictions_sdata.zarr"),
    params:
        model=model_params,
        encoder=stconfig.encoder_config(config),
    log:
        f"{R}/logs/predict/{{model}}/{{fold}}.log",
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 60 * attempt,
    conda:
        "../../envs/sparsitytrap.yaml"
    script:
        "../scripts/predict.py"
