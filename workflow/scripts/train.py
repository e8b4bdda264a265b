from pathlib import Path

import torch

from sparsitytrap import config as stconfig
from sparsitytrap.genes import fold_genes
from sparsitytrap.smk import job
from sparsitytrap.training import fit

with job(snakemake):
    torch.set_num_threads(snakemake.threads)
    genes = fold_genes(snakemake.input.genes, snakemake.wildcards.fold)
    # params.model (the rerun trigger) leaves out the batch-serving keys: resolved here with them
    model = stconfig.model_config(snakemake.config, snakemake.wildcards.model)
    fit(
        {**model, "genes": genes},
        list(snakemake.input.tiles),
        list(snakemake.input.features),
        Path(snakemake.output.weights).parent,
        encoder_cfg=snakemake.params.encoder,
        fold=snakemake.wildcards.fold,
    )
