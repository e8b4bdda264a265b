from sparsitytrap.genes import select_genes
from sparsitytrap.smk import job

with job(snakemake):
    select_genes(
        list(snakemake.input.sdata),
        snakemake.output[0],
        method=snakemake.params.method,
        n_genes=snakemake.params.n_genes,
        categories=snakemake.input.categories or None,
        panel=snakemake.input.panel or None,
        folds=snakemake.params.folds,
        # read from the config, not a param: a figure option must not rerun the selection
        required=snakemake.config["figures"].get("mosaic_genes", []),
    )
