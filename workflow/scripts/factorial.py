from sparsitytrap.smk import job
from sparsitytrap.stats import run_factorial

with job(snakemake):
    p = snakemake.params
    run_factorial(p.cells, snakemake.output[0], metrics=p.metrics, reference=p.reference)
