import torch

from sparsitytrap.predict import predict
from sparsitytrap.smk import job

with job(snakemake):
    torch.set_num_threads(snakemake.threads)
    predict(
        snakemake.params.model,
        weights=snakemake.input.weights,
        tiles=snakemake.input.tiles,
        features=snakemake.input.features,
        out_pred=snakemake.output[0],
        encoder_cfg=snakemake.params.encoder,
        sdata=snakemake.input.sdata or None,
        prediction=snakemake.params.prediction,
    )
