from sparsitytrap.diffusion import correct_sample
from sparsitytrap.io import write_json
from sparsitytrap.smk import job
from sparsitytrap.tile import read_gene_list

with job(snakemake):
    p = snakemake.params
    genes = read_gene_list(snakemake.input.genes)
    report = correct_sample(
        snakemake.input.sdata, genes, snakemake.output.store, dataset_id=p.dataset_id, settings=p.settings
    )
    write_json(report, snakemake.output.report)
