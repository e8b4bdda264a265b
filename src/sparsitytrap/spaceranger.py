"""Write (and describe) the Space Ranger Visium HD output layout.

The simulator writes its samples in the same folder layout as Space Ranger, so the workflow reads
simulated and real samples with the same reader (spatialdata-io ``visium_hd``). Paths, keys and
column orders follow ``spatialdata_io.readers.visium_hd`` (0.7.1) and ``VisiumHDKeys``.

Everything is written in bands of bin rows, so a full capture area (3250 x 3250 bins, 18,000
genes, hundreds of millions of non-zeros) is never densified and never copied whole.
"""

import json
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from PIL import Image

from .io import atomic_path

POSITION_COLUMNS = [
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
]
MATRIX_FILE = "filtered_feature_bc_matrix.h5"
POSITIONS_FILE = "tissue_positions.parquet"
SCALEFACTORS_FILE = "scalefactors_json.json"
HIRES_FILE = "tissue_hires_image.png"
LOWRES_FILE = "tissue_lowres_image.png"
H5_CHUNK = 1 << 18  # elements per HDF5 chunk of the growing matrix datasets
BAND_BINS = 1 << 20  # about this many fine bins are pooled and written at a time
BARCODE_CHARS = 21  # len("s_002um_00000_00000-1"), the same for every bin size


def bin_folder(bin_um):
    """Name of the binned_outputs sub-folder of a bin size in um, e.g. ``square_002um``."""
    return f"square_{int(bin_um):03d}um"


def barcodes(bin_um, rows, cols):
    """Space Ranger HD barcodes ``s_{bin:03d}um_{row:05d}_{col:05d}-1`` as fixed-width bytes.

    Built digit by digit in numpy (no Python loop): millions of barcodes take a fraction of a second.
    """
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    prefix = f"s_{int(bin_um):03d}um_".encode()
    out = np.empty((rows.size, len(prefix) + 13), dtype=np.uint8)
    out[:, : len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    for start, values in ((len(prefix), rows), (len(prefix) + 6, cols)):
        for k in range(5):
            out[:, start + k] = 48 + (values // 10 ** (4 - k)) % 10
    out[:, len(prefix) + 5] = ord("_")
    out[:, -2:] = np.frombuffer(b"-1", dtype=np.uint8)
    return out.view(f"S{out.shape[1]}").ravel()


def fit_bin_to_pixel(array_row, array_col, pxl_row, pxl_col):
    """Least-squares affine map from bin grid to full-resolution pixels.

    Parameters
    ----------
    array_row, array_col
        Bin grid coordinates (any number of bins, at least three not on a line).
    pxl_row, pxl_col
        Full-resolution pixel coordinates of the bin centres (y and x).

    Returns
    -------
    numpy.ndarray
        2x3 matrix ``A`` with ``(x, y) = A @ (array_row, array_col, 1)``.
    """
    # Normal equations on centred coordinates: 3x3 sums, no N x 3 design matrix for 10M bins.
    r = np.asarray(array_row, dtype=np.float64)
    c = np.asarray(array_col, dtype=np.float64)
    x = np.asarray(pxl_col, dtype=np.float64)
    y = np.asarray(pxl_row, dtype=np.float64)
    r0, c0, x0, y0 = r.mean(), c.mean(), x.mean(), y.mean()
    r, c, x, y = r - r0, c - c0, x - x0, y - y0
    gram = np.array([[r @ r, r @ c], [r @ c, c @ c]])
    if np.linalg.cond(gram) > 1e12:
        raise ValueError("bin positions are degenerate (all on one line): cannot fit an affine map")
    lin = np.linalg.solve(gram, np.array([[r @ x, r @ y], [c @ x, c @ y]])).T  # rows: x, y
    offset = np.array([x0, y0]) - lin @ np.array([r0, c0])
    return np.column_stack([lin, offset])


def bin_centres(bin_to_pixel, rows, cols):
    """Full-resolution (x, y) of bin centres under a 2x3 affine; returns two float64 arrays."""
    A = np.asarray(bin_to_pixel, dtype=np.float64)
    x = A[0, 0] * rows + A[0, 1] * cols + A[0, 2]
    y = A[1, 0] * rows + A[1, 1] * cols + A[1, 2]
    return x, y


def write_sample(
    out_dir,
    sample_id,
    *,
    counts,
    gene_ids,
    gene_names,
    n_rows,
    n_cols,
    in_tissue,
    bin_to_pixel,
    microns_per_pixel,
    fullres_shape,
    hires_image,
    lowres_image,
    bin_sizes=(2, 8, 16),
):
    """Write one sample as a Space Ranger Visium HD ``outs`` folder.

    Parameters
    ----------
    out_dir
        The ``outs`` folder to create (replaced if present; built in a temporary folder first).
    sample_id
        Dataset id: prefix of ``{sample_id}_feature_slice.h5`` and of the full-resolution image.
    counts
        scipy.sparse CSR ``[n_rows * n_cols, G]`` integer counts of the 2 um bins, row-major
        (row index = ``array_row * n_cols + array_col``).
    gene_ids, gene_names
        Length-G sequences of strings.
    n_rows, n_cols
        Shape of the 2 um bin grid.
    in_tissue
        Bool ``[n_rows * n_cols]``.
    bin_to_pixel
        2x3 affine with ``(x, y) = A @ (array_row, array_col, 1)`` (full-resolution pixels of the
        bin centre; may rotate).
    microns_per_pixel
        Full-resolution pixel size.
    fullres_shape
        ``(height, width)`` of the full-resolution image (written later by
        :func:`write_fullres_image`).
    hires_image, lowres_image
        uint8 ``[h, w, 3]`` downscaled copies of the full-resolution image.
    bin_sizes
        Bin sizes in um, even multiples of 2; coarser bins are sum-pooled from 2 um (a coarse bin
        is in tissue if any of its children is; edge bins of a grid not divisible by the pooling
        factor pool fewer children).
    """
    out_dir = Path(out_dir)
    n_bins = int(n_rows) * int(n_cols)
    counts = sp.csr_matrix(counts)
    in_tissue = np.asarray(in_tissue, dtype=bool).ravel()
    if counts.shape[0] != n_bins or in_tissue.size != n_bins:
        raise ValueError(f"counts has {counts.shape[0]} rows and in_tissue {in_tissue.size}; grid needs {n_bins}")
    if not (len(gene_ids) == len(gene_names) == counts.shape[1]):
        raise ValueError("gene_ids, gene_names and the columns of counts differ in length")
    if any(int(b) < 2 or int(b) % 2 for b in bin_sizes) or 2 not in bin_sizes:
        raise ValueError(f"bin_sizes must be even numbers of um and include 2, got {bin_sizes}")
    A = np.asarray(bin_to_pixel, dtype=np.float64).reshape(2, 3)
    scalefactors = _scalefactors(microns_per_pixel, fullres_shape, hires_image, lowres_image)

    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        _write_feature_slice(tmp / f"{sample_id}_feature_slice.h5", A, n_rows, n_cols)
        _write_images(tmp / "spatial", hires_image, lowres_image, scalefactors, 2)
        for b in sorted(int(b) for b in bin_sizes):
            folder = tmp / "binned_outputs" / bin_folder(b)
            _write_images(folder / "spatial", hires_image, lowres_image, scalefactors, b)
            _write_bins(folder, b, counts, in_tissue, n_rows, n_cols, A, gene_ids, gene_names)


def _scalefactors(microns_per_pixel, fullres_shape, hires_image, lowres_image):
    """Scale factors shared by every bin size (as in Space Ranger: longest side ratio)."""
    full = max(int(s) for s in fullres_shape[:2])
    return {
        "microns_per_pixel": float(microns_per_pixel),
        "tissue_hires_scalef": max(np.shape(hires_image)[:2]) / full,
        "tissue_lowres_scalef": max(np.shape(lowres_image)[:2]) / full,
    }


def _write_feature_slice(path, A, n_rows, n_cols):
    """Feature slice file: only its metadata is read (file format, bin-to-microscope transform)."""
    # Space Ranger's matrices map (col, row, 1) -> (x, y, 1); ours maps (row, col, 1) -> (x, y).
    spot_to_micro = np.array([[A[0, 1], A[0, 0], A[0, 2]], [A[1, 1], A[1, 0], A[1, 2]], [0, 0, 1]])
    layout = {"file_format": "1.0", "num_rows": int(n_rows), "num_cols": int(n_cols), "bin_size_um": 2.0}
    metadata = {
        "hd_layout_json": json.dumps(layout),
        "transform_matrices": {
            "spot_colrow_to_microscope_colrow": spot_to_micro.ravel().tolist(),
            "microscope_colrow_to_spot_colrow": np.linalg.inv(spot_to_micro).ravel().tolist(),
        },
    }
    with h5py.File(path, "w") as f:
        f.attrs["metadata_json"] = json.dumps(metadata)


def _write_images(folder, hires_image, lowres_image, scalefactors, bin_um):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(hires_image, dtype=np.uint8)).save(folder / HIRES_FILE)
    Image.fromarray(np.asarray(lowres_image, dtype=np.uint8)).save(folder / LOWRES_FILE)
    mpp = scalefactors["microns_per_pixel"]
    factors = {"bin_size_um": float(bin_um), "spot_diameter_fullres": bin_um / mpp, **scalefactors}
    (folder / SCALEFACTORS_FILE).write_text(json.dumps(factors, indent=2) + "\n")


def _write_bins(folder, bin_um, counts, in_tissue, n_rows, n_cols, A, gene_ids, gene_names):
    """Pool 2 um bins to ``bin_um`` band by band; write the matrix (tissue) and positions (all)."""
    k = bin_um // 2
    rows_b, cols_b = -(-n_rows // k), -(-n_cols // k)
    band = max(1, BAND_BINS // (k * k * cols_b))  # coarse rows per band
    schema = pa.schema(
        [
            ("barcode", pa.string()),
            ("in_tissue", pa.int32()),
            ("array_row", pa.int32()),
            ("array_col", pa.int32()),
            ("pxl_row_in_fullres", pa.float64()),
            ("pxl_col_in_fullres", pa.float64()),
        ]
    )
    with (
        h5py.File(folder / MATRIX_FILE, "w") as h5,
        pq.ParquetWriter(folder / "spatial" / POSITIONS_FILE, schema, compression="zstd") as positions,
    ):
        matrix = _open_matrix(h5, gene_ids, gene_names)
        n_written = 0
        for r0 in range(0, rows_b, band):
            r1 = min(r0 + band, rows_b)
            pooled, tissue = _pool_band(counts, in_tissue, n_rows, n_cols, k, r0, r1)
            rows = np.repeat(np.arange(r0, r1), cols_b)
            cols = np.tile(np.arange(cols_b), r1 - r0)
            codes = barcodes(bin_um, rows, cols)
            # A coarse bin's centre is the mean of its (full-block) children's centres.
            x, y = bin_centres(A, k * rows + (k - 1) / 2, k * cols + (k - 1) / 2)
            table = pa.table(
                [
                    codes.astype(str),
                    tissue.astype(np.int32),
                    rows.astype(np.int32),
                    cols.astype(np.int32),
                    y,
                    x,
                ],
                schema=schema,
            )
            positions.write_table(table)
            n_written = _append_matrix(matrix, pooled[tissue], codes[tissue], n_written)
        matrix["shape"][...] = [len(gene_ids), n_written]


def _pool_band(counts, in_tissue, n_rows, n_cols, k, r0, r1):
    """Sum-pool coarse rows [r0, r1) of the k x k pooled grid; returns (CSR, tissue flags)."""
    cols_b = -(-n_cols // k)
    f0, f1 = r0 * k, min(r1 * k, n_rows)
    fine = counts[f0 * n_cols : f1 * n_cols]
    fine_tissue = in_tissue[f0 * n_cols : f1 * n_cols]
    if k == 1:
        return fine, fine_tissue
    fr, fc = np.divmod(np.arange(fine.shape[0]), n_cols)
    target = (fr // k) * cols_b + fc // k  # coarse bin (within the band) of each fine bin
    n_coarse = (r1 - r0) * cols_b
    pool = sp.csr_matrix(
        (np.ones(target.size, dtype=counts.dtype), (target, np.arange(target.size))),
        shape=(n_coarse, target.size),
    )
    tissue = np.bincount(target, weights=fine_tissue, minlength=n_coarse) > 0
    return (pool @ fine).tocsr(), tissue


def _open_matrix(h5, gene_ids, gene_names):
    """10x HDF5 v3 feature-barcode matrix with growing, chunked, compressed datasets."""
    h5.attrs["filetype"] = "matrix"
    h5.attrs["version"] = 2
    group = h5.create_group("matrix")
    opts = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    matrix = {
        "barcodes": group.create_dataset(
            "barcodes", shape=(0,), maxshape=(None,), dtype=f"S{BARCODE_CHARS}", chunks=(H5_CHUNK,), **opts
        ),
        "data": group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(H5_CHUNK,), **opts),
        "indices": group.create_dataset(
            "indices", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(H5_CHUNK,), **opts
        ),
        "indptr": group.create_dataset(
            "indptr", data=np.zeros(1, dtype=np.int64), maxshape=(None,), chunks=(H5_CHUNK,), **opts
        ),
        "shape": group.create_dataset("shape", data=np.array([len(gene_ids), 0], dtype=np.int32)),
    }
    features = group.create_group("features")
    n = len(gene_ids)
    features.create_dataset("id", data=np.array([str(g).encode() for g in gene_ids]))
    features.create_dataset("name", data=np.array([str(g).encode() for g in gene_names]))
    features.create_dataset("feature_type", data=np.array(["Gene Expression"] * n, dtype="S"))
    features.create_dataset("genome", data=np.array(["synthetic"] * n, dtype="S"))
    features.create_dataset("_all_tag_keys", data=np.array(["genome"], dtype="S"))
    return matrix


def _append(dataset, values):
    start = dataset.shape[0]
    dataset.resize((start + len(values),))
    dataset[start:] = values


def _append_matrix(matrix, block, codes, n_written):
    """Append the rows (barcodes) of a CSR block; returns the number of barcodes written."""
    block.sort_indices()
    nnz_before = matrix["indptr"][-1]
    _append(matrix["barcodes"], codes)
    _append(matrix["data"], block.data.astype(np.int32))
    _append(matrix["indices"], block.indices.astype(np.int64))
    _append(matrix["indptr"], nnz_before + block.indptr[1:].astype(np.int64))
    return n_written + block.shape[0]


def write_fullres_image(out_dir, sample_id, tiles, shape, tile=512):
    """Write ``{out_dir}/{sample_id}_tissue_image.tif``: a tiled, zlib-compressed RGB uint8 TIFF.

    Parameters
    ----------
    out_dir
        The ``outs`` folder (already written by :func:`write_sample`).
    sample_id
        Dataset id (file name prefix).
    tiles
        Iterator of uint8 ``(tile, tile, 3)`` arrays in row-major tile order; edge tiles may be
        smaller (they are padded with zeros) so the image is never held whole in memory.
    shape
        ``(height, width)`` of the image.
    tile
        Tile edge in pixels (a multiple of 16).
    """
    import tifffile

    height, width = (int(s) for s in shape[:2])

    def padded():
        for t in tiles:
            t = np.asarray(t, dtype=np.uint8)
            if t.shape != (tile, tile, 3):
                t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1]), (0, 0)))
            yield t

    path = Path(out_dir) / f"{sample_id}_tissue_image.tif"
    with atomic_path(path) as tmp:
        tifffile.imwrite(
            tmp,
            padded(),
            shape=(height, width, 3),
            dtype=np.uint8,
            tile=(tile, tile),
            photometric="rgb",
            compression="zlib",
            bigtiff=height * width * 3 > 2**31,
        )
    return path
