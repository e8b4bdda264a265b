"""The ground truth of a simulated patient, ``truth.zarr`` (zarr v3 group): its one owner.

Expression is stored factored, programmes x loadings, so that any window of any gene's rate can
be rebuilt without the dense (genes x bins) array:

- `PROGRAMMES_UNDIFFUSED`, `PROGRAMMES_DIFFUSED`: float32 [K, rows, cols];
- `LOADINGS`: float32 [K, G]; `GENE_NAMES`: strings [G];
- `CAPTURE_EFFICIENCY`: float64 scalar; `KERNEL`: float32 lateral diffusion kernel;
- `IN_TISSUE`: bool [rows, cols]; `COMPARTMENTS`: uint8 [2 rows, 2 cols], compartment labels at
  half-bin resolution;
- only when the attribute `dense_rates` is true: `RATE_UNDIFFUSED`, `RATE_DIFFUSED` float32
  [G, rows, cols], chunked per gene.

Attributes: the names of the programmes, compartments, genes and gene categories, the capture
efficiency and `dense_rates`. Reading needs only zarr: importing this module never loads the
simulator.
"""

from pathlib import Path

import numpy as np
import zarr

from ..errors import InputError
from ..io import atomic_path
from . import manifest

PROGRAMMES_UNDIFFUSED = "programmes_undiffused"
PROGRAMMES_DIFFUSED = "programmes_diffused"
LOADINGS = "loadings"
GENE_NAMES = "gene_names"
CAPTURE_EFFICIENCY = "capture_efficiency"
KERNEL = "kernel"
IN_TISSUE = "in_tissue"
COMPARTMENTS = "compartments"
RATE_UNDIFFUSED = "rate_undiffused"
RATE_DIFFUSED = "rate_diffused"
ARRAYS = (
    PROGRAMMES_UNDIFFUSED,
    PROGRAMMES_DIFFUSED,
    LOADINGS,
    GENE_NAMES,
    CAPTURE_EFFICIENCY,
    KERNEL,
    IN_TISSUE,
    COMPARTMENTS,
)
DENSE_ARRAYS = (RATE_UNDIFFUSED, RATE_DIFFUSED)

ATTR_PROGRAMMES = "programmes"
ATTR_COMPARTMENTS = "compartments"
ATTR_GENE_NAMES = "gene_names"
ATTR_CATEGORIES = "categories"
ATTR_CAPTURE_EFFICIENCY = "capture_efficiency"
ATTR_DENSE_RATES = "dense_rates"
ATTRS = (
    ATTR_PROGRAMMES,
    ATTR_COMPARTMENTS,
    ATTR_GENE_NAMES,
    ATTR_CATEGORIES,
    ATTR_CAPTURE_EFFICIENCY,
    ATTR_DENSE_RATES,
)


def write_truth(
    path,
    *,
    undiffused,
    diffused,
    loadings,
    gene_names,
    categories,
    capture_efficiency,
    kernel,
    in_tissue,
    compartments,
    programme_names,
    compartment_names,
    dense_max,
):
    """Write truth.zarr atomically; the dense rates too when G * rows * cols <= dense_max.

    `in_tissue` may be flat ([rows * cols], bin order row-major) or [rows, cols]; the names of
    the programmes and compartments come from the simulator, which this module does not import.
    """
    K, n_rows, n_cols = undiffused.shape
    G = loadings.shape[1]
    dense = bool(G * n_rows * n_cols <= dense_max)
    with atomic_path(path) as tmp:
        root = zarr.open_group(tmp, mode="w", zarr_format=3)
        chunk = (1, min(n_rows, 512), min(n_cols, 512))
        for name, arr in ((PROGRAMMES_UNDIFFUSED, undiffused), (PROGRAMMES_DIFFUSED, diffused)):
            root.create_array(name, data=arr, chunks=chunk)
        root.create_array(LOADINGS, data=loadings)
        root.create_array(GENE_NAMES, data=np.array(gene_names, dtype=np.dtypes.StringDType()))
        root.create_array(CAPTURE_EFFICIENCY, data=np.array(capture_efficiency, dtype=np.float64))
        root.create_array(KERNEL, data=kernel)
        root.create_array(IN_TISSUE, data=in_tissue.reshape(n_rows, n_cols), chunks=chunk[1:])
        root.create_array(COMPARTMENTS, data=compartments, chunks=(1024, 1024))
        root.attrs.update(
            {
                ATTR_PROGRAMMES: list(programme_names),
                ATTR_COMPARTMENTS: list(compartment_names),
                ATTR_GENE_NAMES: list(gene_names),
                ATTR_CATEGORIES: list(categories),
                ATTR_CAPTURE_EFFICIENCY: float(capture_efficiency),
                ATTR_DENSE_RATES: dense,
            }
        )
        if dense:
            for name, prog in ((RATE_UNDIFFUSED, undiffused), (RATE_DIFFUSED, diffused)):
                _write_dense(root, name, prog, loadings)
        manifest.write(tmp)


def _write_dense(root, name, programmes, loadings):
    """One dense rate array [G, rows, cols], 16 genes at a time (memory)."""
    G = loadings.shape[1]
    arr = root.create_array(name, shape=(G, *programmes.shape[1:]), dtype=np.float32, chunks=(1, *programmes.shape[1:]))
    for g0 in range(0, G, 16):
        g1 = min(g0 + 16, G)
        arr[g0:g1] = np.tensordot(loadings[:, g0:g1].T, programmes, axes=(1, 0))


def open_truth(path):
    """Open truth.zarr read-only, refusing a store that lacks an array or attribute readers need.

    Raises
    ------
    InputError
        One line naming the store and the first missing array or attribute.
    """
    if not Path(path).is_dir():
        raise InputError(path, "truth store does not exist")
    try:
        root = zarr.open_group(path, mode="r")
    except Exception as err:  # zarr raises several types for a folder that is not a zarr group
        raise InputError(path, f"cannot open the truth store ({type(err).__name__})") from None
    manifest.verify(path)
    attrs = dict(root.attrs)
    for key in ATTRS:
        if key not in attrs:
            raise InputError(path, f"truth store has no attribute {key!r}")
    found = set(root.array_keys())
    for name in ARRAYS + (DENSE_ARRAYS if attrs[ATTR_DENSE_RATES] else ()):
        if name not in found:
            raise InputError(path, f"truth store has no array {name!r} (found {sorted(found)})")
    return root


def _gene_index(truth_zarr, names, genes):
    """Indices of `genes` (names or indices; None: all) among the store's gene names."""
    if genes is None:
        return np.arange(len(names))
    lookup = {n: i for i, n in enumerate(names)}
    try:
        return np.array([g if isinstance(g, (int, np.integer)) else lookup[g] for g in genes], dtype=np.int64)
    except KeyError as err:
        raise InputError(truth_zarr, f"gene {err.args[0]!r} is not in the truth") from None


def truth_rate(truth_zarr, genes=None, rows=slice(None), cols=slice(None), diffused=True, with_efficiency=False):
    """Ground-truth rates of any genes over any window of bins, from the factored truth.

    Parameters
    ----------
    truth_zarr
        A simulated patient's truth.zarr.
    genes
        Gene names or indices (None: all genes).
    rows, cols
        Slices of the bin grid.
    diffused
        Rates after lateral diffusion (what the counts are drawn from) or before.
    with_efficiency
        Multiply by the patient's capture efficiency (the expected counts).

    Returns
    -------
    numpy.ndarray
        float32 [n_genes, n_rows_window, n_cols_window].
    """
    root = open_truth(truth_zarr)
    idx = _gene_index(truth_zarr, list(root.attrs[ATTR_GENE_NAMES]), genes)
    prog = root[PROGRAMMES_DIFFUSED if diffused else PROGRAMMES_UNDIFFUSED][:, rows, cols]
    load = root[LOADINGS][:][:, idx]
    out = np.tensordot(load.T, prog, axes=(1, 0)).astype(np.float32)
    if with_efficiency:
        out *= np.float32(root.attrs[ATTR_CAPTURE_EFFICIENCY])
    return out


def truth_window(truth_zarr, genes, origin, tile_bins):
    """True expected counts ``[G, tile_bins, tile_bins]`` of one tile; bins outside the truth are 0.

    The counts are Poisson(diffused rate x capture efficiency), so the expected count is the
    diffused rate with the efficiency. `origin` is the tile's top-left (array_row, array_col)
    and may lie outside the grid.
    """
    r0, c0 = int(origin[0]), int(origin[1])
    rows, cols = slice(max(r0, 0), r0 + tile_bins), slice(max(c0, 0), c0 + tile_bins)
    rate = truth_rate(truth_zarr, genes, rows=rows, cols=cols, diffused=True, with_efficiency=True)
    out = np.zeros((len(genes), tile_bins, tile_bins), dtype=np.float32)
    h, w = rate.shape[1:]
    out[:, rows.start - r0 : rows.start - r0 + h, cols.start - c0 : cols.start - c0 + w] = rate
    return out
