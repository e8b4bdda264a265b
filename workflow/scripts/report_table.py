from sparsitytrap.smk import job
from sparsitytrap.tables import html_table

with job(snakemake):
    html_table(snakemake.input[0], snakemake.output[0])
