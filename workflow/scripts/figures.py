# One script for every figure rule: the rule's name picks the figure function.
from sparsitytrap import figures as F
from sparsitytrap.smk import job

with job(snakemake):
    rule, p, i = snakemake.rule, snakemake.params, snakemake.input
    out = str(snakemake.output[0]).rsplit(".", 1)[0]
    formats = [str(o).rsplit(".", 1)[1] for o in snakemake.output]
    if rule == "figure_results_table":
        F.results_table(p.dirs, out, formats=formats)
    elif rule == "figure_bar_chart":
        F.bar_chart(p.dirs, out, n_boot=p.n_boot, seed=p.seed, formats=formats)
    elif rule == "figure_noise_ceiling":
        F.noise_ceiling_chart(p.dirs, out, formats=formats)
    elif rule == "figure_training_curves":
        F.training_curves(list(i), out, formats=formats)
    elif rule == "figure_sparsity_scatter":
        F.sparsity_scatter(p.a, p.b, out, metric=p.metric, formats=formats)
    elif rule == "figure_heatmap":
        F.heatmap(p.a, p.b, out, formats=formats)
    elif rule == "figure_rescue":
        F.rescue_panels(i.tiles, p.a, p.b, i.pred_a, i.pred_b, out, top_k=p.top_k, metric=p.metric, formats=formats)
    elif rule == "figure_mosaic":
        preds = dict(zip(p.models, i.preds))
        F.mosaic(i.tiles, preds, snakemake.wildcards.gene, out, shared_scale=p.shared_scale, formats=formats)
    elif rule == "figure_multiscale":
        F.multiscale_panels(i.tiles, i.pred, p.genes, out, model=p.model, formats=formats)
    else:
        raise ValueError(f"no figure for rule {rule!r}")
