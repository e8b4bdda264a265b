import torch

from sparsitytrap.features import cache_features
from sparsitytrap.smk import job

with job(snakemake):
    torch.set_num_threads(snakemake.threads)
    cache_features(snakemake.input[0], snakemake.params.encoder, snakemake.output[0], device=snakemake.params.device)
