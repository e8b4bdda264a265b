# Data stages: simulate (the embedded cohort) -> ingest -> select_genes -> tile.


rule simulate:
    output:
        outs=directory(f"{R}/simulated/{{sample}}/outs"),
        truth=directory(f"{R}/simulated/{{sample}}/truth.zarr"),
        params=f"{R}/simulated/{{sample}}/params.json",
    log:
        f"{R}/logs/simulate/{{sample}}.log",
    benchmark:
        f"{R}/benchmarks/simulate/{{sample}}.tsv"
    group:
        "sample_prep"
    conda:
        "../../envs/sparsitytrap.yaml"
    resources:
        mem_mb=scaled("mem_mb", "simulate", 4000),
        runtime=scaled("runtime", "simulate", 30),
    params:
        sim=simulation_params,
    script:
        "../scripts/simulate.py"


rule ingest:
    input:
        spaceranger_dir,
    output:
        directory(f"{R}/sdata/{{sample}}.zarr"),
    log:
        f"{R}/logs/ingest/{{sample}}.log",
    benchmark:
        f"{R}/benchmarks/ingest/{{sample}}.tsv"
    group:
        "sample_prep"
    conda:
        "../../envs/sparsitytrap.yaml"
    resources:
        mem_mb=scaled("mem_mb", "ingest", 8000),
        runtime=scaled("runtime", "ingest", 60),
    params:
        dataset_id=lambda wc: config["samples"][wc.sample].get("dataset_id", wc.sample),
        fullres_image=lambda wc: config["samples"][wc.sample].get("fullres_image"),
        bins=config["ingest"]["bins"],
    script:
        "../scripts/ingest.py"


rule select_genes:
    input:
        sdata=expand(f"{R}/sdata/{{sample}}.zarr", sample=gene_samples()),
        categories=config["genes"]["categories"] or [],
        panel=config["genes"]["panel"] or [],
    output:
        table(f"{R}/genes/genes.csv", "genes", "Data"),
        view(f"{R}/genes/genes.csv"),
    log:
        f"{R}/logs/select_genes.log",
    benchmark:
        f"{R}/benchmarks/select_genes.tsv"
    conda:
        "../../envs/sparsitytrap.yaml"
    resources:
        mem_mb=scaled("mem_mb", "select_genes", 8000),
        runtime=scaled("runtime", "select_genes", 30),
    params:
        method=config["genes"]["method"],
        n_genes=config["genes"]["n_genes"],
        folds=gene_folds(),
    script:
        "../scripts/select_genes.py"


rule tile:
    input:
        sdata=f"{R}/sdata/{{sample}}.zarr",
        genes=f"{R}/genes/genes.csv",
    output:
        directory(f"{R}/tiles/{{sample}}.zarr"),
    log:
        f"{R}/logs/tile/{{sample}}.log",
    benchmark:
        f"{R}/benchmarks/tile/{{sample}}.tsv"
    group:
        "sample_tiles"
    conda:
        "../../envs/sparsitytrap.yaml"
    resources:
        mem_mb=scaled("mem_mb", "tile", 8000),
        runtime=scaled("runtime", "tile", 60),
    params:
        **config["tiles"],
        dataset_id=lambda wc: config["samples"][wc.sample].get("dataset_id", wc.sample),
    script:
        "../scripts/tile.py"
