from sparsitytrap.smk import job
from sparsitytrap.tile import tile_sample

with job(snakemake):
    p = snakemake.params
    tile_sample(
        snakemake.input.sdata,
        snakemake.input.genes,
        snakemake.output[0],
        tile_bins=p.tile_bins,
        image_px=p.image_px,
        min_tissue_fraction=p.min_tissue_fraction,
        dataset_id=p.dataset_id,
    )
