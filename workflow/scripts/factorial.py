from pathlib import Path

from sparsitytrap.smk import job
from sparsitytrap.stats import run_factorial

with job(snakemake):
    p = snakemake.params
    results = Path(snakemake.output[0]).parents[1]
    # config keys are {loss}_{decoder}, e.g. poisson_hist2st
    cells = {tuple(key.split("_")[::-1]): [results / "eval" / m / f for f in p.folds] for key, m in p.cells.items()}
    run_factorial(cells, snakemake.output[0], metrics=p.metrics)
