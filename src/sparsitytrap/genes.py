"""Gene selection: which genes the models predict, in which channel order.

The statistics are computed over the in-tissue 2 um bins of the chosen samples, straight from
the sparse tables (never densified). The order of `genes.csv` is the channel order of every
later array; no later stage re-derives it.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import InputError
from .io import write_csv
from .stores import manifest

METHODS = ("variance", "hvg", "panel")
TABLE = "square_002um"
ROW_BLOCK = 1 << 19  # bins of a table read at a time by `table_moments`


def read_bin_table(sdata_zarr, table=TABLE):
    """The in-tissue bins of one table of an ingested SpatialData store, as AnnData (CSR)."""
    import spatialdata

    manifest.verify(sdata_zarr)
    sdata = spatialdata.read_zarr(sdata_zarr, selection=("tables",))
    if table not in sdata.tables:
        raise InputError(sdata_zarr, f"no table {table!r} (found {sorted(sdata.tables)})")
    adata = sdata.tables[table]
    keep = np.asarray(adata.obs["in_tissue"]).astype(bool)
    # A copy, not a view: setting X on a view makes anndata write it back into the parent
    # through a dense (bins x genes) index grid (496 GiB on a full capture area).
    adata = adata[keep].copy()
    adata.X = sp.csr_matrix(adata.X)
    return adata


def table_moments(sdata_zarr, table=TABLE, block_rows=ROW_BLOCK):
    """Gene names and `count_moments` of the in-tissue bins of one table, streamed in row blocks.

    Reads the table's zarr group directly (as `sparsitytrap.tile` does): only this table, its
    in_tissue column and var, and at most `block_rows` bins of the matrix at a time. Loading the
    tables whole costs more than 11 GB on a full capture area (all bin sizes, obs strings, CSC
    float64 copies).
    """
    import anndata as ad
    import zarr

    path = Path(sdata_zarr) / "tables" / table
    if not path.is_dir():
        found = sorted(p.name for p in (Path(sdata_zarr) / "tables").glob("*") if p.is_dir())
        raise InputError(sdata_zarr, f"no table {table!r} (found {found})")
    manifest.verify(sdata_zarr)
    group = zarr.open_group(path, mode="r")
    keep = np.asarray(ad.io.read_elem(group["obs/in_tissue"])).astype(bool)
    names = list(pd.Index(ad.io.read_elem(group["var"]).index.astype(str)))
    X = ad.io.sparse_dataset(group["X"])
    total = None
    for start in range(0, X.shape[0], block_rows):
        m = count_moments(X[start : start + block_rows][keep[start : start + block_rows]])
        total = m if total is None else {k: total[k] + m[k] for k in m}
    return names, total


def count_moments(X):
    """Per-gene n, sum, sum of squares and non-zero count of a sparse bins x genes matrix."""
    X = sp.csc_matrix(X, dtype=np.float64)
    return {
        "n": X.shape[0],
        "sum": np.asarray(X.sum(axis=0)).ravel(),
        "sumsq": np.asarray(X.multiply(X).sum(axis=0)).ravel(),
        "nnz": np.diff(X.indptr),
    }


def statistics(moments):
    """Mean, variance (population) and zero fraction per gene from summed moments."""
    n = moments["n"]
    mean = moments["sum"] / n
    var = moments["sumsq"] / n - mean**2
    return pd.DataFrame({"mean": mean, "variance": np.maximum(var, 0.0), "zero_fraction": 1 - moments["nnz"] / n})


def read_categories(path):
    """gene -> category from a TSV with columns gene, category (more columns are ignored)."""
    df = pd.read_csv(path, sep="\t")
    if not {"gene", "category"} <= set(df.columns):
        raise InputError(path, "needs tab-separated columns 'gene' and 'category'")
    return dict(zip(df["gene"], df["category"]))


def read_panel(path):
    """One gene per line; blank lines and '#' comments ignored."""
    lines = Path(path).read_text().splitlines()
    genes = [g.strip() for g in lines if g.strip() and not g.lstrip().startswith("#")]
    if not genes:
        raise InputError(path, "gene panel is empty")
    return genes


def _hvg_order(adatas, n_genes):
    import anndata as ad
    import scanpy as sc

    adata = ad.concat(adatas, label="sample", index_unique="-")
    try:
        sc.pp.highly_variable_genes(
            adata, n_top_genes=n_genes, flavor="seurat_v3", batch_key="sample" if len(adatas) > 1 else None
        )
    except ValueError as err:  # seurat_v3's loess fit of variance on mean fails on too few or degenerate genes
        raise InputError(
            "config genes.method", f"scanpy hvg (seurat_v3) failed on these data ({err}); use 'variance'"
        ) from None
    var = adata.var.sort_values("highly_variable_rank")
    return list(var.index[var["highly_variable"]])[:n_genes]


def check_required(selected, required, key="figures.mosaic_genes", source="the selected genes"):
    """Refuse genes that a later stage needs (the mosaic figure) but the selection did not keep.

    Called when the gene list is made and at plan time once it exists, so that the fault stops the
    run before training instead of in the figure job at its end.
    """
    missing = [g for g in required if g not in set(selected)]
    if missing:
        raise InputError(
            f"config {key}",
            f"{', '.join(map(repr, missing))} not among the {len(selected)} genes of {source}; "
            "choose genes from that list (or name them in a genes.panel)",
        )


def _sum(moments):
    total = None
    for m in moments:
        total = m if total is None else {k: total[k] + m[k] for k in m}
    return total


def _choose(method, names, moments, zarrs, n_genes, panel):
    """Genes chosen by `method` on the samples whose `moments` (and stores `zarrs`) are given."""
    if method == "variance":
        stats = statistics(_sum(moments))
        order = np.argsort(-stats["variance"].to_numpy(), kind="stable")[:n_genes]
        chosen = [names[i] for i in order]
    elif method == "hvg":
        chosen = _hvg_order([read_bin_table(p) for p in zarrs], n_genes)
    else:
        if panel is None:
            raise InputError("config genes.panel", "method 'panel' needs a panel file")
        chosen = read_panel(panel)
        missing = [g for g in chosen if g not in set(names)]
        if missing:
            raise InputError(panel, f"{len(missing)} panel genes are not in the data, e.g. {missing[0]!r}")
    if len(chosen) < n_genes and method != "panel":
        raise InputError("config genes.n_genes", f"asks for {n_genes} genes but only {len(chosen)} are available")
    return chosen


def select_genes(
    sdata_zarrs, out_csv, *, method="variance", n_genes=50, categories=None, panel=None, required=(), folds=None
):
    """Choose genes and write `out_csv` (gene, rank, mean, variance, zero_fraction, category[, rank_<fold>]).

    method: ``variance`` ranks genes by the variance of raw counts over in-tissue bins (the
    seeds' choice, dominated by highly expressed genes); ``hvg`` uses scanpy's seurat_v3
    highly-variable genes on raw counts; ``panel`` keeps the genes of a user file, in its order.
    folds: ``{fold: indices into sdata_zarrs of its training samples}`` for leak-free selection:
    each fold's genes are chosen on its training samples only (column ``rank_<fold>``, empty where
    the fold did not choose the gene), and the table lists their union (what the tile stores hold).
    Without `folds`, one selection on all `sdata_zarrs` serves every fold.
    required: genes later stages need (``figures.mosaic_genes``); missing ones are refused.
    """
    if method not in METHODS:
        raise InputError("config genes.method", f"unknown method {method!r}; use one of {METHODS}")
    # Statistics are streamed per sample (moments add up); only 'hvg' (scanpy) needs the tables in memory.
    per_sample = [table_moments(p) for p in sdata_zarrs]
    names = per_sample[0][0]
    for path, (other, _) in zip(sdata_zarrs[1:], per_sample[1:]):
        if other != names:
            raise InputError(path, "its genes differ from the first sample's; samples must share one feature list")
    moments = [m for _, m in per_sample]
    groups = folds or {None: range(len(sdata_zarrs))}
    chosen = {
        fold: _choose(method, names, [moments[i] for i in idx], [sdata_zarrs[i] for i in idx], n_genes, panel)
        for fold, idx in groups.items()
    }
    for fold, genes in chosen.items():
        check_required(genes, required, source=f"this {method} selection" + (f" for fold {fold}" if fold else ""))
    union = list(dict.fromkeys(g for genes in chosen.values() for g in genes))

    stats = statistics(_sum(moments))
    stats.insert(0, "gene", names)
    cats = read_categories(categories) if categories else {}
    table = stats.set_index("gene").loc[union].reset_index()
    table.insert(1, "rank", np.arange(1, len(table) + 1))
    table["category"] = [cats.get(g, "Unassigned") for g in table["gene"]]
    if folds:
        for fold, genes in chosen.items():
            table[f"rank_{fold}"] = pd.array(table["gene"].map({g: r + 1 for r, g in enumerate(genes)}), dtype="Int64")
    write_csv(table, out_csv)
    return table


def fold_genes(genes_csv, fold):
    """The genes of one fold, in its channel order: its ``rank_<fold>`` column, else the whole list."""
    table = pd.read_csv(genes_csv)
    column = f"rank_{fold}"
    if column not in table:
        return table["gene"].astype(str).tolist()
    chosen = table[table[column].notna()].sort_values(column)
    return chosen["gene"].astype(str).tolist()
