# sparsitytrap: predict Visium HD expression at 2 um from H&E, and benchmark decoders x losses.
# Run: snakemake --cores N   (workstation)   |   snakemake --cores N --profile slurm   (cluster)


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    input:
        all_targets(),
    default_target: True
