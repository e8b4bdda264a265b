# Evaluation per (model, fold) -> statistics across folds -> figures; every number from the run's outputs.
# Each figure is its own rule and target, with only its own options as params, so it reruns alone.


rule ceiling:
    input:
        tiles=f"{R}/tiles/{{sample}}.zarr",
        truth=lambda wc: truth_of(wc.sample),
    output:
        table(
            f"{R}/eval/ceiling/{{sample}}.csv",
            "ceiling",
            "Evaluation",
            "Noise ceilings",
        ),
        view(f"{R}/eval/ceiling/{{sample}}.csv"),
    log:
        f"{R}/logs/ceiling/{{sample}}.log",
    benchmark:
        f"{R}/benchmarks/ceiling/{{sample}}.tsv"
    conda:
        "../../envs/sparsitytrap.yaml"
    threads: 1
    resources:
        mem_mb=scaled("mem_mb", "ceiling", 4000),
        runtime=scaled("runtime", "ceiling", 30),
    params:
        batch_tiles=config["evaluation"]["batch_tiles"],
        shuffle_seed=config["evaluation"]["shuffle_seed"],
        ssim_min_tissue=config["evaluation"]["ssim_min_tissue"],
        ceiling_draws=config["evaluation"]["ceiling_draws"],
    script:
        "../scripts/ceiling.py"


rule evaluate:
    input:
        pred=f"{R}/models/{{model}}/{{fold}}/predictions.zarr",
        tiles=lambda wc: f"{R}/tiles/{test_sample(wc.fold)}.zarr",
        ceiling=lambda wc: f"{R}/eval/ceiling/{test_sample(wc.fold)}.csv",
        genes=f"{R}/genes/genes.csv",
    output:
        per_gene=table(
            f"{R}/eval/{{model}}/{{fold}}/per_gene.csv",
            "per_gene",
            "Evaluation",
            "{model}",
            labels={"model": "{model}", "fold": "{fold}"},
        ),
        per_gene_view=view(f"{R}/eval/{{model}}/{{fold}}/per_gene.csv"),
        per_tile=f"{R}/eval/{{model}}/{{fold}}/per_tile.parquet",
        summary=f"{R}/eval/{{model}}/{{fold}}/summary.json",
    log:
        f"{R}/logs/evaluate/{{model}}/{{fold}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{{model}}/{{fold}}.tsv"
    conda:
        "../../envs/sparsitytrap.yaml"
    threads: 1
    resources:
        mem_mb=scaled("mem_mb", "evaluate", 4000),
        runtime=scaled("runtime", "evaluate", 30),
    params:
        **config["evaluation"],
    script:
        "../scripts/evaluate.py"


rule stats:
    input:
        a=lambda wc: eval_files([COMPARISONS[wc.comparison]["a"]]),
        b=lambda wc: eval_files([COMPARISONS[wc.comparison]["b"]]),
    output:
        s1=table(
            f"{R}/stats/{{comparison}}/S1_per_gene.csv",
            "stats",
            "Comparisons",
            "{comparison}",
        ),
        s1_view=view(f"{R}/stats/{{comparison}}/S1_per_gene.csv"),
        s1_folds=f"{R}/stats/{{comparison}}/S1_per_fold.csv",
        s2=table(
            f"{R}/stats/{{comparison}}/S2_per_category.csv",
            "stats",
            "Comparisons",
            "{comparison}",
        ),
        s2_view=view(f"{R}/stats/{{comparison}}/S2_per_category.csv"),
        s3=table(
            f"{R}/stats/{{comparison}}/S3_per_quartile.csv",
            "stats",
            "Comparisons",
            "{comparison}",
        ),
        s3_view=view(f"{R}/stats/{{comparison}}/S3_per_quartile.csv"),
        summary=table(
            f"{R}/stats/{{comparison}}/summary.csv",
            "stats",
            "Comparisons",
            "{comparison}",
        ),
        summary_view=view(f"{R}/stats/{{comparison}}/summary.csv"),
    log:
        f"{R}/logs/stats/{{comparison}}.log",
    benchmark:
        f"{R}/benchmarks/stats/{{comparison}}.tsv"
    group:
        "summaries"
    conda:
        "../../envs/sparsitytrap.yaml"
    params:
        name_a=lambda wc: COMPARISONS[wc.comparison]["a"],
        name_b=lambda wc: COMPARISONS[wc.comparison]["b"],
        dirs_a=lambda wc: [eval_dir(COMPARISONS[wc.comparison]["a"], f) for f in FOLDS],
        dirs_b=lambda wc: [eval_dir(COMPARISONS[wc.comparison]["b"], f) for f in FOLDS],
        metrics=config["stats"]["metrics"],
        bootstrap=config["evaluation"]["bootstrap"],
        bootstrap_seed=config["evaluation"]["bootstrap_seed"],
    script:
        "../scripts/stats.py"


rule factorial:
    input:
        eval_files(FACTORIAL_MODELS),
    output:
        table(
            f"{R}/stats/factorial_2x2.csv",
            "factorial",
            "Comparisons",
            "Factorial 2x2",
        ),
        view(f"{R}/stats/factorial_2x2.csv"),
    log:
        f"{R}/logs/stats/factorial.log",
    benchmark:
        f"{R}/benchmarks/stats/factorial.tsv"
    group:
        "summaries"
    conda:
        "../../envs/sparsitytrap.yaml"
    params:
        cells=factorial_cells(),
        reference=[FACTORIAL.get("reference", {}).get(k) for k in ("decoder", "loss")],
        metrics=config["stats"]["metrics"],
    script:
        "../scripts/factorial.py"


rule figure_results_table:
    input:
        eval_files(MODELS),
    output:
        figure("results_table", "results_table", subcategory="Overview"),
    log:
        f"{R}/logs/figures/results_table.log",
    benchmark:
        f"{R}/benchmarks/figures/results_table.tsv"
    group:
        "summaries"
    conda:
        "../../envs/sparsitytrap.yaml"
    params:
        dirs=[eval_dir(m, f) for m in MODELS for f in FOLDS],
    script:
        "../scripts/figures.py"


rule figure_bar_chart:
    input:
        eval_files(MODELS),
    output:
        figure("bar_chart", "bar_chart", subcategory="Overview"),
    log:
        f"{R}/logs/figures/bar_chart.log",
    benchmark:
        f"{R}/benchmarks/figures/bar_chart.tsv"
    group:
        "summaries"
    conda:
        "../../envs/sparsitytrap.yaml"
    params:
        dirs=[eval_dir(m, f) for m in MODELS for f in FOLDS],
        bootstrap=config["evaluation"]["bootstrap"],
        bootstrap_seed=config["evaluation"]["bootstrap_seed"],
    script:
        "../scripts/figures.py"


rule figure_noise_ceiling:
    input:
        eval_files(MODELS),
    output:
        figure("noise_ceiling", "noise_ceiling", subcategory="Overview"),
    log:
        f"{R}/logs/figures/noise_ceiling.log",
    benchmark:
        f"{R}/benchmarks/figures/noise_ceiling.tsv"
    group:
        "summaries"
    conda:
        "../../envs/sparsitytrap.yaml"
    params:
        dirs=[eval_dir(m, f) for m in MODELS for f in FOLDS],
    script:
        "../scripts/figures.py"


rule figure_training_curves:
    input:
        expand(f"{R}/models/{{model}}/{{fold}}/log.csv", model=MODELS, fold=FOLDS),
        expand(
            f"{R}/models/{{model}}/{{fold}}/metrics_val.json", model=MODELS, fold=FOLDS
        ),
    output:
        figure("training_curves", "training_curves", subcategory="Overview"),
    log:
        f"{R}/logs/figures/training_curves.log",
    benchmark:
        f"{R}/benchmarks/figures/training_curves.tsv"
    group:
        "summaries"
    conda:
        "../../envs/sparsitytrap.yaml"
    script:
        "../scripts/figures.py"


rule figure_sparsity_scatter:
    input:
        a=lambda wc: eval_files([COMPARISONS[wc.comparison]["a"]]),
        b=lambda wc: eval_files([COMPARISONS[wc.comparison]["b"]]),
    output:
        figure(
            "sparsity_scatter/{comparison}",
            "sparsity_scatter",
            "Comparisons",
            "{comparison}",
        ),
    log:
        f"{R}/logs/figures/sparsity_scatter/{{comparison}}.log",
    benchmark:
        f"{R}/benchmarks/figures/sparsity_scatter/{{comparison}}.tsv"
    group:
        "summaries"
    conda:
        "../../envs/sparsitytrap.yaml"
    params:
        a=lambda wc: [eval_dir(COMPARISONS[wc.comparison]["a"], f) for f in FOLDS],
        b=lambda wc: [eval_dir(COMPARISONS[wc.comparison]["b"], f) for f in FOLDS],
        metric=config["stats"]["metrics"][0],
    script:
        "../scripts/figures.py"


rule figure_heatmap:
    input:
        a=lambda wc: eval_files([COMPARISONS[wc.comparison]["a"]]),
        b=lambda wc: eval_files([COMPARISONS[wc.comparison]["b"]]),
    output:
        figure("heatmap/{comparison}", "heatmap", "Comparisons", "{comparison}"),
    log:
        f"{R}/logs/figures/heatmap/{{comparison}}.log",
    benchmark:
        f"{R}/benchmarks/figures/heatmap/{{comparison}}.tsv"
    group:
        "summaries"
    conda:
        "../../envs/sparsitytrap.yaml"
    params:
        a=lambda wc: [eval_dir(COMPARISONS[wc.comparison]["a"], f) for f in FOLDS],
        b=lambda wc: [eval_dir(COMPARISONS[wc.comparison]["b"], f) for f in FOLDS],
    script:
        "../scripts/figures.py"


rule figure_rescue:
    input:
        tiles=lambda wc: f"{R}/tiles/{test_sample(wc.fold)}.zarr",
        a=lambda wc: eval_files([COMPARISONS[wc.comparison]["a"]], [wc.fold]),
        b=lambda wc: eval_files([COMPARISONS[wc.comparison]["b"]], [wc.fold]),
        pred_a=lambda wc: f"{R}/models/{COMPARISONS[wc.comparison]['a']}/{wc.fold}/predictions.zarr",
        pred_b=lambda wc: f"{R}/models/{COMPARISONS[wc.comparison]['b']}/{wc.fold}/predictions.zarr",
    output:
        figure("rescue/{comparison}/{fold}", "rescue", "Comparisons", "{comparison}"),
    log:
        f"{R}/logs/figures/rescue/{{comparison}}/{{fold}}.log",
    benchmark:
        f"{R}/benchmarks/figures/rescue/{{comparison}}/{{fold}}.tsv"
    group:
        "summaries"
    conda:
        "../../envs/sparsitytrap.yaml"
    params:
        a=lambda wc: eval_dir(COMPARISONS[wc.comparison]["a"], wc.fold),
        b=lambda wc: eval_dir(COMPARISONS[wc.comparison]["b"], wc.fold),
        top_k=config["figures"]["rescue_top_k"],
        metric=config["stats"]["metrics"][0],
        shared_scale=config["figures"]["shared_scale"],
    script:
        "../scripts/figures.py"


rule figure_mosaic:
    input:
        tiles=lambda wc: f"{R}/tiles/{test_sample(wc.fold)}.zarr",
        preds=expand(
            f"{R}/models/{{model}}/{{{{fold}}}}/predictions.zarr", model=MODELS
        ),
    output:
        figure("mosaic/{fold}/{gene}", "mosaic", "Mosaics", "{fold}"),
    log:
        f"{R}/logs/figures/mosaic/{{fold}}/{{gene}}.log",
    benchmark:
        f"{R}/benchmarks/figures/mosaic/{{fold}}/{{gene}}.tsv"
    group:
        "summaries"
    conda:
        "../../envs/sparsitytrap.yaml"
    params:
        predictions=lambda wc, input: dict(zip(MODELS, input.preds)),
        shared_scale=config["figures"]["shared_scale"],
    script:
        "../scripts/figures.py"


rule figure_multiscale:
    input:
        tiles=lambda wc: f"{R}/tiles/{test_sample(wc.fold)}.zarr",
        pred=f"{R}/models/{MULTISCALE}/{{fold}}/predictions.zarr",
    output:
        figure("multiscale/{fold}", "multiscale", "Multi-scale", "{fold}"),
    log:
        f"{R}/logs/figures/multiscale/{{fold}}.log",
    benchmark:
        f"{R}/benchmarks/figures/multiscale/{{fold}}.tsv"
    group:
        "summaries"
    conda:
        "../../envs/sparsitytrap.yaml"
    params:
        model=config["figures"].get("multiscale_model"),
        genes=config["figures"].get("mosaic_genes", []),
    script:
        "../scripts/figures.py"


rule figure_resolution_sweep:
    input:
        evals=eval_files(MODELS, FOLDS),
        tiles=[f"{R}/tiles/{test_sample(f)}.zarr" for f in FOLDS],
    output:
        figure("resolution_sweep", "resolution_sweep", subcategory="Overview"),
    log:
        f"{R}/logs/figures/resolution_sweep.log",
    benchmark:
        f"{R}/benchmarks/figures/resolution_sweep.tsv"
    group:
        "summaries"
    conda:
        "../../envs/sparsitytrap.yaml"
    params:
        dirs=[eval_dir(m, f) for m in MODELS for f in FOLDS],
        train_um={
            m: stconfig.model_config(config, m)["training"].get("train_um", 2)
            for m in MODELS
        },
        losses={m: config["models"][m]["loss"]["name"] for m in MODELS},
        bootstrap_seed=config["evaluation"]["bootstrap_seed"],
    script:
        "../scripts/figures.py"
