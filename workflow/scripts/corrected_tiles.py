from sparsitytrap.smk import job
from sparsitytrap.tile import corrected_tiles

with job(snakemake):
    corrected_tiles(snakemake.input.tiles, snakemake.input.corrected, snakemake.output[0])
