from pathlib import Path

import torch

from sparsitytrap.smk import job
from sparsitytrap.train import train

with job(snakemake):
    torch.set_num_threads(snakemake.threads)
    train(
        snakemake.params.model,
        tiles=list(snakemake.input.tiles),
        features=list(snakemake.input.features),
        out_dir=Path(snakemake.output.weights).parent,
    )
