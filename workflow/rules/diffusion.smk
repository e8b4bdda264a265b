# Lateral-diffusion correction by optimal transport (seed 003) -> corrected tiles -> validation.
# Runs only where a model trains on corrected counts (`counts: corrected`) or validation is asked.


rule correct_diffusion:
    input:
        sdata=f"{R}/sdata/{{sample}}.zarr",
        genes=f"{R}/genes/genes.csv",
    output:
        store=directory(f"{R}/corrected/{{sample}}.zarr"),
        report=f"{R}/corrected/{{sample}}.json",
    log:
        f"{R}/logs/correct_diffusion/{{sample}}.log",
    benchmark:
        f"{R}/benchmarks/correct_diffusion/{{sample}}.tsv"
    conda:
        "../../envs/sparsitytrap.yaml"
    threads: 1
    resources:
        mem_mb=scaled("mem_mb", "correct_diffusion", 8000),
        runtime=scaled("runtime", "correct_diffusion", 120),
    params:
        settings=DIFFUSION,
        dataset_id=lambda wc: config["samples"][wc.sample].get("dataset_id", wc.sample),
    script:
        "../scripts/correct_diffusion.py"


rule corrected_tiles:
    input:
        tiles=f"{R}/tiles/{{sample}}.zarr",
        corrected=f"{R}/corrected/{{sample}}.zarr",
    output:
        directory(f"{R}/tiles_corrected/{{sample}}.zarr"),
    log:
        f"{R}/logs/corrected_tiles/{{sample}}.log",
    benchmark:
        f"{R}/benchmarks/corrected_tiles/{{sample}}.tsv"
    conda:
        "../../envs/sparsitytrap.yaml"
    resources:
        mem_mb=scaled("mem_mb", "corrected_tiles", 4000),
        runtime=scaled("runtime", "corrected_tiles", 30),
    script:
        "../scripts/corrected_tiles.py"


rule validate_diffusion:
    input:
        sdata=f"{R}/sdata/{{sample}}.zarr",
        corrected=f"{R}/corrected/{{sample}}.zarr",
        truth=lambda wc: truth_of(wc.sample),
        genes=f"{R}/genes/genes.csv",
    output:
        table=table(
            f"{R}/diffusion/{{sample}}/validation.csv",
            "diffusion",
            "Diffusion correction",
            "{sample}",
        ),
        table_view=view(f"{R}/diffusion/{{sample}}/validation.csv"),
        summary=f"{R}/diffusion/{{sample}}/summary.csv",
        figure=report(
            f"{R}/diffusion/{{sample}}/methods.png",
            caption="../report/diffusion.rst",
            category="Diffusion correction",
            subcategory="{sample}",
        ),
    log:
        f"{R}/logs/validate_diffusion/{{sample}}.log",
    benchmark:
        f"{R}/benchmarks/validate_diffusion/{{sample}}.tsv"
    conda:
        "../../envs/sparsitytrap.yaml"
    resources:
        mem_mb=scaled("mem_mb", "validate_diffusion", 8000),
        runtime=scaled("runtime", "validate_diffusion", 60),
    params:
        settings=DIFFUSION,
        dataset_id=lambda wc: config["samples"][wc.sample].get("dataset_id", wc.sample),
        figure_genes=config["figures"].get("mosaic_genes", []),
    script:
        "../scripts/validate_diffusion.py"
