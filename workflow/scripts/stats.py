from pathlib import Path

from sparsitytrap.smk import job
from sparsitytrap.stats import run_comparison

with job(snakemake):
    p = snakemake.params
    run_comparison(
        p.dirs_a,
        p.dirs_b,
        Path(snakemake.output.summary).parent,
        metrics=p.metrics,
        names=(p.name_a, p.name_b),
        bootstrap=p.bootstrap,
        bootstrap_seed=p.bootstrap_seed,
    )
