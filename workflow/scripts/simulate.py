from pathlib import Path

from sparsitytrap.simulate import simulate_patient
from sparsitytrap.smk import job

with job(snakemake):
    simulate_patient(Path(snakemake.output.outs).parent, snakemake.wildcards.sample, snakemake.params.sim)
