from sparsitytrap.evaluate import evaluate_ceiling
from sparsitytrap.smk import job

with job(snakemake):
    p = snakemake.params
    evaluate_ceiling(
        snakemake.input.tiles,
        snakemake.output[0],
        truth_zarr=snakemake.input.truth or None,
        batch_tiles=p.batch_tiles,
        shuffle_seed=p.shuffle_seed,
        ssim_min_tissue=p.ssim_min_tissue,
        n_draws=p.ceiling_draws,
    )
