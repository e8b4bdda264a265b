"""The corrected-counts store (zarr v3 group): its one owner. Names, writes, opens, checks, reads.

Rows are the bins of the raw 2 um table in grid row-major order (array_row, then array_col),
which is the table's own order for stores written by `ingest`; `obs_index` maps each row back
to its row in the raw table. Columns are the corrected genes. Values are float32, stored as CSR
(bins x genes), never dense:

- `indptr` int64 [N + 1], `indices` int32 [nnz] (gene), `data` float32 [nnz];
- `array_row`, `array_col` int32 [N]; `in_tissue` bool [N]; `obs_index` int64 [N];
- `row_ptr` int64 [n_rows + 1]: rows of grid row r are `row_ptr[r]:row_ptr[r + 1]`, so a window
  of bins is one contiguous slice of the CSR.

A `manifest.json` (`sparsitytrap.stores.manifest`) records every chunk; opening verifies it.
Attributes: `format`, `version`, `sample`, `genes`, `grid_shape`, `settings`, and the report:
`observed_mass`, `corrected_mass`, `removed_mass` (per gene: the mass the plan put outside the
tissue, which the corrected table does not keep), `diffusion_length_um`, `diffusion_length`
(how it was obtained), `fitted` (global and per-gene parameters), `empty_genes`.
"""

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io import atomic_path
from ..stores import manifest

FORMAT = "sparsitytrap.corrected_counts"
VERSION = 1
INDPTR, INDICES, DATA = "indptr", "indices", "data"
ARRAY_ROW, ARRAY_COL, IN_TISSUE, OBS_INDEX, ROW_PTR = "array_row", "array_col", "in_tissue", "obs_index", "row_ptr"
BIN_ARRAYS = (ARRAY_ROW, ARRAY_COL, IN_TISSUE, OBS_INDEX)
ARRAYS = (INDPTR, INDICES, DATA, ROW_PTR) + BIN_ARRAYS
ATTR_FORMAT, ATTR_VERSION, ATTR_SAMPLE, ATTR_GENES, ATTR_GRID_SHAPE = (
    "format",
    "version",
    "sample",
    "genes",
    "grid_shape",
)
REPORT_ATTRS = (
    "settings",
    "observed_mass",
    "corrected_mass",
    "removed_mass",
    "diffusion_length_um",
    "diffusion_length",
    "fitted",
    "empty_genes",
)
ATTRS = (ATTR_FORMAT, ATTR_VERSION, ATTR_SAMPLE, ATTR_GENES, ATTR_GRID_SHAPE) + REPORT_ATTRS
CHUNK = 1 << 20


def row_major(array_row, array_col, n_cols):
    """Order of bins by (row, col): a stable argsort (the identity for a row-major table)."""
    key = np.asarray(array_row, np.int64) * int(n_cols) + np.asarray(array_col, np.int64)
    return np.arange(key.size) if key.size < 2 or (np.diff(key) > 0).all() else np.argsort(key, kind="stable")


class Writer:
    """Appends CSR rows band by band, in stored-row order; `finish` writes indptr and attributes."""

    def __init__(self, root, n_bins):
        self.root, self.n_bins = root, n_bins
        self.nnz_per_row = []
        self.data = root.create_array(DATA, shape=(0,), dtype=np.float32, chunks=(CHUNK,))
        self.indices = root.create_array(INDICES, shape=(0,), dtype=np.int32, chunks=(CHUNK,))

    def append(self, nnz_per_row, indices, data):
        """Rows next in order: their non-zero counts, gene indices and values."""
        self.nnz_per_row.append(np.asarray(nnz_per_row, np.int64))
        if len(data):
            self.data.append(np.asarray(data, np.float32))
            self.indices.append(np.asarray(indices, np.int32))

    def finish(self, attrs):
        counts = np.concatenate(self.nnz_per_row) if self.nnz_per_row else np.zeros(0, np.int64)
        if counts.size != self.n_bins:
            raise RuntimeError(f"wrote {counts.size} rows of {self.n_bins}")
        indptr = np.concatenate([[0], np.cumsum(counts)])
        self.root.create_array(INDPTR, data=indptr, chunks=(CHUNK,))
        self.root.attrs.update(_jsonable(attrs))


@contextmanager
def create_corrected(path, *, sample, genes, grid_shape, array_row, array_col, in_tissue, obs_index):
    """Write a corrected store atomically: yields a `Writer`; the store appears only if all succeeds.

    The bin arrays must already be in stored-row order (row-major).
    """
    import zarr

    array_row = np.asarray(array_row, np.int32)
    order_key = array_row.astype(np.int64) * int(grid_shape[1]) + np.asarray(array_col, np.int64)
    if order_key.size > 1 and not (np.diff(order_key) > 0).all():
        raise ValueError("bins must be in row-major order without duplicates")
    row_ptr = np.searchsorted(array_row, np.arange(int(grid_shape[0]) + 1), side="left").astype(np.int64)
    with atomic_path(path) as tmp:
        root = zarr.open_group(tmp, mode="w", zarr_format=3)
        root.attrs.update(
            {ATTR_FORMAT: FORMAT, ATTR_VERSION: VERSION, ATTR_SAMPLE: str(sample), ATTR_GENES: list(genes)}
        )
        root.attrs[ATTR_GRID_SHAPE] = [int(s) for s in grid_shape]
        for name, values, dtype in (
            (ARRAY_ROW, array_row, np.int32),
            (ARRAY_COL, array_col, np.int32),
            (IN_TISSUE, in_tissue, bool),
            (OBS_INDEX, obs_index, np.int64),
        ):
            root.create_array(name, data=np.asarray(values, dtype), chunks=(CHUNK,))
        root.create_array(ROW_PTR, data=row_ptr)
        writer = Writer(root, array_row.size)
        yield writer
        manifest.write(tmp)  # only once everything is written (an error above leaves no store)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


class CorrectedStore:
    """An opened, checked corrected store. `indptr` and `row_ptr` are read once, on first use."""

    def __init__(self, path, root):
        self.path, self.root = Path(path), root
        self.attrs = dict(root.attrs)
        self.genes = list(self.attrs[ATTR_GENES])
        self.grid_shape = tuple(self.attrs[ATTR_GRID_SHAPE])
        self._indptr = self._row_ptr = None

    @property
    def n_bins(self):
        return int(self.root[ARRAY_ROW].shape[0])

    @property
    def indptr(self):
        if self._indptr is None:
            self._indptr = self.root[INDPTR][:]
        return self._indptr

    @property
    def row_ptr(self):
        if self._row_ptr is None:
            self._row_ptr = self.root[ROW_PTR][:]
        return self._row_ptr

    def rows(self, lo, hi):
        """CSR of stored rows lo:hi: (indptr relative to lo, gene indices, values)."""
        ptr = self.indptr[lo : hi + 1]
        return ptr - ptr[0], self.root[INDICES][ptr[0] : ptr[-1]], self.root[DATA][ptr[0] : ptr[-1]]


def open_corrected(path):
    """Open a corrected store read-only; refuse one that is not one, or is inconsistent.

    Raises
    ------
    InputError
        One line naming the store and the first fault.
    """
    import zarr

    if not Path(path).is_dir():
        raise InputError(path, "corrected store does not exist")
    manifest.verify(path)
    root = zarr.open_group(path, mode="r")
    attrs = dict(root.attrs)
    if attrs.get(ATTR_FORMAT) != FORMAT or attrs.get(ATTR_VERSION) != VERSION:
        raise InputError(path, f"not a corrected-counts store ({FORMAT} v{VERSION})")
    missing = [k for k in ATTRS if k not in attrs]
    found = set(root.array_keys())
    missing += [k for k in ARRAYS if k not in found]
    if missing:
        raise InputError(path, f"corrected store lacks {missing[0]!r}")
    n = root[ARRAY_ROW].shape[0]
    if any(root[k].shape[0] != n for k in BIN_ARRAYS) or root[INDPTR].shape[0] != n + 1:
        raise InputError(path, "corrected store: bin arrays and indptr disagree in length")
    if root[INDICES].shape != root[DATA].shape or root[ROW_PTR].shape[0] != attrs[ATTR_GRID_SHAPE][0] + 1:
        raise InputError(path, "corrected store: indices, data or row_ptr have the wrong length")
    return CorrectedStore(path, root)


def read_window(store, row0, col0, n_rows, n_cols):
    """Corrected counts of every gene over a window of bins: float32 [G, n_rows, n_cols].

    Bins outside the grid or not in the table are 0. Reads one contiguous slice of the CSR.
    """
    store = store if isinstance(store, CorrectedStore) else open_corrected(store)
    out = np.zeros((len(store.genes), n_rows, n_cols), np.float32)
    H = store.grid_shape[0]
    r0, r1 = min(max(row0, 0), H), min(max(row0 + n_rows, 0), H)
    lo, hi = int(store.row_ptr[r0]), int(store.row_ptr[r1])
    if hi <= lo:
        return out
    rows = store.root[ARRAY_ROW][lo:hi]
    cols = store.root[ARRAY_COL][lo:hi]
    ptr, genes, values = store.rows(lo, hi)
    per_row = np.diff(ptr)
    r = np.repeat(rows - row0, per_row)
    c = np.repeat(cols - col0, per_row)
    keep = (c >= 0) & (c < n_cols)
    out[genes[keep], r[keep], c[keep]] = values[keep]
    return out


def read_gene_grids(store, genes, block_rows=256):
    """Whole-grid corrected counts of a few genes (names or indices): float32 [k, n_rows, n_cols].

    Streams the CSR in bands of grid rows; memory is the k grids plus one band.
    """
    store = store if isinstance(store, CorrectedStore) else open_corrected(store)
    idx = [store.genes.index(g) if isinstance(g, str) else int(g) for g in genes]
    H, W = store.grid_shape
    out = np.zeros((len(idx), H, W), np.float32)
    for r0 in range(0, H, block_rows):
        band = read_window(store, r0, 0, min(block_rows, H - r0), W)
        out[:, r0 : r0 + band.shape[1]] = band[idx]
    return out
