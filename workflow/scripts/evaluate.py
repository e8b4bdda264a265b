from pathlib import Path

from sparsitytrap.evaluate import evaluate
from sparsitytrap.smk import job

with job(snakemake):
    p = snakemake.params
    evaluate(
        snakemake.input.pred,
        snakemake.input.tiles,
        Path(snakemake.output.per_gene).parent,
        ceiling_csv=snakemake.input.ceiling,
        genes_csv=snakemake.input.genes,
        model=snakemake.wildcards.model,
        fold=snakemake.wildcards.fold,
        batch_tiles=p.batch_tiles,
        shuffle_seed=p.shuffle_seed,
        bootstrap=p.bootstrap,
        ssim_min_tissue=p.ssim_min_tissue,
        bootstrap_seed=p.bootstrap_seed,
    )
