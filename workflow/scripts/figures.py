# One script for every figure rule: rule figure_<name> draws FIGURES[name] from its input, params and wildcards.
from sparsitytrap.figures import FIGURES
from sparsitytrap.smk import job

with job(snakemake):
    out = str(snakemake.output[0]).rsplit(".", 1)[0]
    formats = [str(o).rsplit(".", 1)[1] for o in snakemake.output]
    FIGURES[snakemake.rule.removeprefix("figure_")].draw(snakemake, out, formats)
