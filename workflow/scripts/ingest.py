from sparsitytrap.ingest import ingest
from sparsitytrap.smk import job

with job(snakemake):
    p = snakemake.params
    ingest(snakemake.input[0], p.dataset_id, snakemake.output[0], fullres_image=p.fullres_image, bins=p.bins)
