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
        names=(p.a, p.b),
        n_boot=p.bootstrap,
        seed=p.seed,
    )
