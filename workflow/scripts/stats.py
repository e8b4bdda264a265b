from pathlib import Path

from sparsitytrap.smk import job
from sparsitytrap.stats import run_comparison

with job(snakemake):
    p = snakemake.params
    results = Path(snakemake.output.summary).parents[2]
    run_comparison(
        [results / "eval" / p.a / f for f in p.folds],
        [results / "eval" / p.b / f for f in p.folds],
        Path(snakemake.output.summary).parent,
        metrics=p.metrics,
        names=(p.a, p.b),
        n_boot=p.bootstrap,
        seed=p.seed,
    )
