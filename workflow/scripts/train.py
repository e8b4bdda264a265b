from pathlib import Path

import torch

from sparsitytrap.genes import fold_genes
from sparsitytrap.smk import job
from sparsitytrap.training import fit

with job(snakemake):
    torch.set_num_threads(snakemake.threads)
    genes = fold_genes(snakemake.input.genes, snakemake.wildcards.fold)
    fit(
        {**snakemake.params.model, "genes": genes},
        list(snakemake.input.tiles),
        list(snakemake.input.features),
        Path(snakemake.output.weights).parent,
        encoder_cfg=snakemake.params.encoder,
        fold=snakemake.wildcards.fold,
    )
