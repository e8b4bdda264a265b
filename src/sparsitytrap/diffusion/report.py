"""The workflow's validation stage: table, per-method summary and figure of one simulated sample."""

from ..io import write_csv
from .validate import figure_methods, summarise_validation, validate_against_truth

FIGURE_GENES = 4


def validate_diffusion(sdata_zarr, corrected_zarr, truth_zarr, genes_csv, out_table, out_summary, out_prefix, *,
                       dataset_id=None, settings=None, figure_genes=()):  # fmt: skip
    """Write the per gene x method table, the per-method summary and the observed | RL | OT | truth figure.

    The figure draws ``figure_genes`` that were corrected (config ``figures.mosaic_genes``), else
    the first four genes.
    """
    from ..tile import read_gene_list

    genes = read_gene_list(genes_csv)
    table = validate_against_truth(sdata_zarr, corrected_zarr, truth_zarr, genes, dataset_id=dataset_id,
                                   settings=settings)  # fmt: skip
    write_csv(table, out_table)
    write_csv(summarise_validation(table), out_summary)
    drawn = [g for g in figure_genes if g in genes] or genes[:FIGURE_GENES]
    figure_methods(sdata_zarr, corrected_zarr, truth_zarr, out_prefix, genes=drawn, dataset_id=dataset_id,
                   settings=settings)  # fmt: skip
    return table
