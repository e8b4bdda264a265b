# Evaluation per (model, fold) -> statistics across folds -> figures; every number from the run's outputs.
# Each figure is its own rule and target, with only its own options as params, so it reruns alone.

FIG = f"{R}/figures"
FORMATS = config["figures"]["format"]
COMPARISONS = {c["name"]: c for c in config.get("comparisons", [])}
MOSAIC_GENES = config["figures"].get("mosaic_genes", [])
MULTISCALE = config["figures"].get("multiscale_model")
DRAWN_FOLDS = FOLDS if config["figures"]["folds"] == "all" else config["figures"]["folds"]


wildcard_constraints:
    comparison="|".join(COMPARISONS) or "(?!)",
    gene="|".join(MOSAIC_GENES) or "(?!)",


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


def prefix(output):
    return str(output[0]).rsplit(".", 1)[0]


rule ceiling:
    input:
        tiles=f"{R}/tiles/{{sample}}.zarr",
        truth=lambda wc: truth_of(wc.sample),
    output:
        report(
            f"{R}/eval/ceiling/{{sample}}.csv",
            caption="../report/ceiling.rst",
            category="Evaluation",
            subcategory="Noise ceilings",
        ),
    params:
        batch_tiles=config["evaluation"]["batch_tiles"],
        shuffle_seed=config["evaluation"]["shuffle_seed"],
        ssim_min_tissue=config["evaluation"]["min_tissue_fraction_ssim"],
    log:
        f"{R}/logs/ceiling/{{sample}}.log",
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 30 * attempt,
    conda:
        "../../envs/sparsitytrap.yaml"
    script:
        "../scripts/ceiling.py"


rule evaluate:
    input:
        pred=f"{R}/models/{{model}}/{{fold}}/predictions.zarr",
        tiles=lambda wc: f"{R}/tiles/{test_sample(wc.fold)}.zarr",
        ceiling=lambda wc: f"{R}/eval/ceiling/{test_sample(wc.fold)}.csv",
        genes=f"{R}/genes/genes.csv",
    output:
        per_gene=report(
            f"{R}/eval/{{model}}/{{fold}}/per_gene.csv",
            caption="../report/per_gene.rst",
            category="Evaluation",
            subcategory="{model}",
            labels={"model": "{model}", "fold": "{fold}"},
        ),
        per_tile=f"{R}/eval/{{model}}/{{fold}}/per_tile.parquet",
        summary=f"{R}/eval/{{model}}/{{fold}}/summary.json",
    params:
        **config["evaluation"],
    log:
        f"{R}/logs/evaluate/{{model}}/{{fold}}.log",
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 30 * attempt,
    conda:
        "../../envs/sparsitytrap.yaml"
    script:
        "../scripts/evaluate.py"


rule stats:
    input:
        a=lambda wc: eval_files([COMPARISONS[wc.comparison]["a"]]),
        b=lambda wc: eval_files([COMPARISONS[wc.comparison]["b"]]),
    output:
        s1=report(
            f"{R}/stats/{{comparison}}/S1_per_gene.csv",
            caption="../report/stats.rst",
            category="Statistics",
            subcategory="{comparison}",
        ),
        s1_folds=f"{R}/stats/{{comparison}}/S1_per_fold.csv",
        s2=report(
            f"{R}/stats/{{comparison}}/S2_per_category.csv",
            caption="../report/stats.rst",
            category="Statistics",
            subcategory="{comparison}",
        ),
        s3=report(
            f"{R}/stats/{{comparison}}/S3_per_quartile.csv",
            caption="../report/stats.rst",
            category="Statistics",
            subcategory="{comparison}",
        ),
        summary=report(
            f"{R}/stats/{{comparison}}/summary.csv",
            caption="../report/stats.rst",
            category="Statistics",
            subcategory="{comparison}",
        ),
    params:
        a=lambda wc: COMPARISONS[wc.comparison]["a"],
        b=lambda wc: COMPARISONS[wc.comparison]["b"],
        folds=FOLDS,
        metrics=config["stats"]["metrics"],
        bootstrap=config["evaluation"]["bootstrap"],
        seed=config["evaluation"]["shuffle_seed"],
    log:
        f"{R}/logs/stats/{{comparison}}.log",
    group:
        "summaries"
    conda:
        "../../envs/sparsitytrap.yaml"
    script:
        "../scripts/stats.py"


rule factorial:
    input:
        eval_files(list(config.get("factorial", {}).values())),
    output:
        report(f"{R}/stats/factorial_2x2.csv", caption="../report/factorial.rst", category="Statistics"),
    params:
        cells=config.get("factorial", {}),
        folds=FOLDS,
        metrics=config["stats"]["metrics"],
    log:
        f"{R}/logs/stats/factorial.log",
    group:
        "summaries"
    conda:
        "../../envs/sparsitytrap.yaml"
    script:
        "../scripts/factorial.py"


rule figure_results_table:
    input:
        eval_files(MODELS),
    output:
        figure("results_table", "results_table", subcategory="Overview"),
    params:
        dirs=[eval_dir(m, f) for m in MODELS for f in FOLDS],
    log:
        f"{R}/logs/figures/results_table.log",
    group:
        "summaries"
    conda:
        "../../envs/sparsitytrap.yaml"
    script:
        "../scripts/figures.py"


rule figure_bar_chart:
    input:
        eval_files(MODELS),
    output:
        figure("bar_chart", "bar_chart", subcategory="Overview"),
    params:
        dirs=[eval_dir(m, f) for m in MODELS for f in FOLDS],
        n_boot=config["evaluation"]["bootstrap"],
        seed=config["evaluation"]["shuffle_seed"],
    log:
        f"{R}/logs/figures/bar_chart.log",
    group:
        "summaries"
    conda:
        "../../envs/sparsitytrap.yaml"
    script:
        "../scripts/figures.py"


rule figure_noise_ceiling:
    input:
        eval_files(MODELS),
    output:
        figure("noise_ceiling", "noise_ceiling", subcategory="Overview"),
    params:
        dirs=[eval_dir(m, f) for m in MODELS for f in FOLDS],
    log:
        f"{R}/logs/figures/noise_ceiling.log",
    group:
        "summaries"
    conda:
        "../../envs/sparsitytrap.yaml"
    script:
        "../scripts/figures.py"


rule figure_training_curves:
    input:
        expand(f"{R}/models/{{model}}/{{fold}}/log.csv", model=MODELS, fold=FOLDS),
    output:
        figure("training_curves", "training_curves", subcategory="Overview"),
    log:
        f"{R}/logs/figures/training_curves.log",
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
        figure("sparsity_scatter/{comparison}", "sparsity_scatter", "Comparisons", "{comparison}"),
    params:
        a=lambda wc: [eval_dir(COMPARISONS[wc.comparison]["a"], f) for f in FOLDS],
        b=lambda wc: [eval_dir(COMPARISONS[wc.comparison]["b"], f) for f in FOLDS],
        metric=config["stats"]["metrics"][0],
    log:
        f"{R}/logs/figures/sparsity_scatter/{{comparison}}.log",
    group:
        "summaries"
    conda:
        "../../envs/sparsitytrap.yaml"
    script:
        "../scripts/figures.py"


rule figure_heatmap:
    input:
        a=lambda wc: eval_files([COMPARISONS[wc.comparison]["a"]]),
        b=lambda wc: eval_files([COMPARISONS[wc.comparison]["b"]]),
    output:
        figure("heatmap/{comparison}", "heatmap", "Comparisons", "{comparison}"),
    params:
        a=lambda wc: [eval_dir(COMPARISONS[wc.comparison]["a"], f) for f in FOLDS],
        b=lambda wc: [eval_dir(COMPARISONS[wc.comparison]["b"], f) for f in FOLDS],
    log:
        f"{R}/logs/figures/heatmap/{{comparison}}.log",
    group:
        "summaries"
    conda:
        "../../envs/sparsitytrap.yaml"
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
    params:
        a=lambda wc: eval_dir(COMPARISONS[wc.comparison]["a"], wc.fold),
        b=lambda wc: eval_dir(COMPARISONS[wc.comparison]["b"], wc.fold),
        top_k=config["figures"]["rescue_top_k"],
        metric=config["stats"]["metrics"][0],
    log:
        f"{R}/logs/figures/rescue/{{comparison}}/{{fold}}.log",
    group:
        "summaries"
    conda:
        "../../envs/sparsitytrap.yaml"
    script:
        "../scripts/figures.py"


rule figure_mosaic:
    input:
        tiles=lambda wc: f"{R}/tiles/{test_sample(wc.fold)}.zarr",
        preds=expand(f"{R}/models/{{model}}/{{{{fold}}}}/predictions.zarr", model=MODELS),
    output:
        figure("mosaic/{fold}/{gene}", "mosaic", "Mosaics", "{fold}"),
    params:
        models=MODELS,
        shared_scale=config["figures"]["shared_scale"],
    log:
        f"{R}/logs/figures/mosaic/{{fold}}/{{gene}}.log",
    group:
        "summaries"
    conda:
        "../../envs/sparsitytrap.yaml"
    script:
        "../scripts/figures.py"


rule figure_multiscale:
    input:
        tiles=lambda wc: f"{R}/tiles/{test_sample(wc.fold)}.zarr",
        pred=f"{R}/models/{MULTISCALE}/{{fold}}/predictions.zarr",
    output:
        figure("multiscale/{fold}", "multiscale", "Multi-scale", "{fold}"),
    params:
        model=MULTISCALE,
        genes=MOSAIC_GENES,
    log:
        f"{R}/logs/figures/multiscale/{{fold}}.log",
    group:
        "summaries"
    conda:
        "../../envs/sparsitytrap.yaml"
    script:
        "../scripts/figures.py"


def stats_targets():
    out = [f"{R}/stats/{c}/summary.csv" for c in COMPARISONS]
    if config.get("factorial"):
        out.append(f"{R}/stats/factorial_2x2.csv")
    return out


def figure_targets():
    """Every figure, first format (the rule writes all formats)."""
    fmt = FORMATS[0]
    names = ["results_table", "bar_chart", "noise_ceiling", "training_curves"]
    names += [f"{kind}/{c}" for kind in ("sparsity_scatter", "heatmap") for c in COMPARISONS]
    names += [f"rescue/{c}/{f}" for c in COMPARISONS for f in DRAWN_FOLDS]
    names += [f"mosaic/{f}/{g}" for f in DRAWN_FOLDS for g in MOSAIC_GENES]
    if MULTISCALE and MOSAIC_GENES:
        names += [f"multiscale/{f}" for f in DRAWN_FOLDS]
    return [f"{FIG}/{n}.{fmt}" for n in names]
