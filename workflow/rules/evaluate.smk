# Evaluation per (model, fold) -> statistics across folds -> figures; every number from the run's outputs.


rule evaluate:
    input:
        pred=f"{R}/models/{{model}}/{{fold}}/predictions.zarr",
        tiles=lambda wc: f"{R}/tiles/{test_sample(wc.fold)}.zarr",
        truth=lambda wc: truth_of(test_sample(wc.fold)),
        genes=f"{R}/genes/genes.csv",
    output:
        per_gene=f"{R}/eval/{{model}}/{{fold}}/per_gene.csv",
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


def stats_targets():
    return []


def figure_targets():
    return []
