from sparsitytrap.predict import write_predictions_sdata
from sparsitytrap.smk import job

with job(snakemake):
    preds = dict(zip(snakemake.params.models, snakemake.input.preds))
    write_predictions_sdata(preds, snakemake.input.tiles, snakemake.output[0], sdata=snakemake.input.sdata)
