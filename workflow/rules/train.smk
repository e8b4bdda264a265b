# Frozen-encoder feature cache -> one training job per (model, fold) -> predictions of the test patient.
# `train` reads only the training patients; `predict` is the first job that opens the test patient.


rule features:
    input:
        f"{R}/tiles/{{sample}}.zarr",
    output:
        directory(f"{R}/features/{ENCODER}/{{sample}}.zarr"),
    log:
        f"{R}/logs/features/{ENCODER}/{{sample}}.log",
    benchmark:
        f"{R}/benchmarks/features/{{sample}}.tsv"
    conda:
        "../../envs/sparsitytrap.yaml"
    threads: 2
    resources:
        **gpu_resources(),
        mem_mb=scaled("mem_mb", "features", 16000),
        runtime=scaled("runtime", "features", 60),
    params:
        encoder=stconfig.encoder_config(config),
        device=config["training"].get("device", "auto"),
    script:
        "../scripts/features.py"


rule train:
    input:
        unpack(train_inputs),
    output:
        weights=f"{R}/models/{{model}}/{{fold}}/best.safetensors",
        log_csv=f"{R}/models/{{model}}/{{fold}}/log.csv",
        val=f"{R}/models/{{model}}/{{fold}}/metrics_val.json",
    log:
        f"{R}/logs/train/{{model}}/{{fold}}.log",
    benchmark:
        f"{R}/benchmarks/train/{{model}}/{{fold}}.tsv"
    conda:
        "../../envs/sparsitytrap.yaml"
    threads: 1
    resources:
        **gpu_resources(),
        mem_mb=scaled("mem_mb", "train", 8000),
        runtime=scaled("runtime", "train", 240),
    params:
        model=model_params,
        encoder=stconfig.encoder_config(config),
    script:
        "../scripts/train.py"


rule predict:
    input:
        weights=f"{R}/models/{{model}}/{{fold}}/best.safetensors",
        tiles=lambda wc: f"{R}/tiles/{test_sample(wc.fold)}.zarr",
        features=lambda wc: f"{R}/features/{ENCODER}/{test_sample(wc.fold)}.zarr",
        # the H&E of the overlapping windows, for the folds that get a stitched map (prediction.stitch)
        sdata=lambda wc: (
            f"{R}/sdata/{test_sample(wc.fold)}.zarr" if stitched(wc.fold) else []
        ),
    output:
        directory(f"{R}/models/{{model}}/{{fold}}/predictions.zarr"),
    log:
        f"{R}/logs/predict/{{model}}/{{fold}}.log",
    benchmark:
        f"{R}/benchmarks/predict/{{model}}/{{fold}}.tsv"
    conda:
        "../../envs/sparsitytrap.yaml"
    threads: 1
    resources:
        mem_mb=scaled("mem_mb", "predict", 8000),
        runtime=scaled("runtime", "predict", 60),
    params:
        model=model_params,
        encoder=stconfig.encoder_config(config),
        prediction=config["prediction"],
    script:
        "../scripts/predict.py"


rule overlay:
    input:
        tiles=lambda wc: f"{R}/tiles/{test_sample(wc.fold)}.zarr",
        sdata=lambda wc: f"{R}/sdata/{test_sample(wc.fold)}.zarr",
        preds=expand(
            f"{R}/models/{{model}}/{{{{fold}}}}/predictions.zarr", model=MODELS
        ),
    output:
        directory(f"{R}/predictions/{{fold}}.zarr"),
    log:
        f"{R}/logs/overlay/{{fold}}.log",
    benchmark:
        f"{R}/benchmarks/overlay/{{fold}}.tsv"
    conda:
        "../../envs/sparsitytrap.yaml"
    resources:
        mem_mb=scaled("mem_mb", "overlay", 8000),
        runtime=scaled("runtime", "overlay", 60),
    params:
        models=MODELS,
    script:
        "../scripts/overlay.py"
