# sparsitytrap: predict Visium HD expression at 2 um from H&E, and benchmark decoders x losses.
# Run: snakemake --cores N   (workstation)   |   snakemake --cores N --profile slurm   (cluster)


configfile: "config.yaml"


# `--configfile other.yaml` replaces config.yaml instead of merging into it (its models, samples
# and comparisons would otherwise mix with the defaults); `--config key=value` still merges.
if workflow.overwrite_configfiles:
    config.clear()
    config.update(workflow.config_settings.overwrite_config)


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/diffusion.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    default_target: True
    input:
        all_targets(),
