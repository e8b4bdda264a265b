from sparsitytrap.ingest import ingest
from sparsitytrap.smk import job

with job(snakemake):
    ingest(snakemake.input[0], snakemake.params.dataset_id, snakemake.output[0], fullres_image=snakemake.params.fullres_image)
