from pathlib import Path

import torch

from sparsitytrap.smk import job
from sparsitytrap.training import fit

with job(snakemake):
    torch.set_num_threads(snakemake.threads)
    fit(
        snakemake.params.model,
        list(snakemake.input.tiles),
        list(snakemake.input.features),
        Path(snakemake.output.weights).parent,
        encoder_cfg=snakemake.params.encoder,
        fold=snakemake.wildcards.fold,
    )
