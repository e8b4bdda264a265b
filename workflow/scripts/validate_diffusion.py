from sparsitytrap.diffusion.report import validate_diffusion
from sparsitytrap.smk import job

with job(snakemake):
    p, i, o = snakemake.params, snakemake.input, snakemake.output
    validate_diffusion(i.sdata, i.corrected, i.truth, i.genes, o.table, o.summary, o.figure.removesuffix(".png"),
                       dataset_id=p.dataset_id, settings=p.settings, figure_genes=p.figure_genes)  # fmt: skip
