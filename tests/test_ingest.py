import json
import shutil
import tarfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile

from sparsitytrap.errors import InputError
from sparsitytrap.ingest import _arrow_returns_memory, ingest, validate_spaceranger

SQ2 = "binned_outputs/square_002um"


def rewrite_parquet(path, edit):
    table = edit(pq.read_table(path))
    pq.write_table(table, path)


def drop_feature_slice(outs):
    (outs / "T1_feature_slice.h5").unlink()


def tar_binned_outputs(outs):
    with tarfile.open(outs / "binned_outputs.tar.gz", "w:gz") as tar:
        tar.add(outs / "binned_outputs", arcname="binned_outputs")
    shutil.rmtree(outs / "binned_outputs")


def remove(rel):
    return lambda outs: (outs / rel).unlink()


def reorder_columns(outs):
    path = outs / SQ2 / "spatial/tissue_positions.parquet"
    rewrite_parquet(
        path,
        lambda t: t.select(
            ["barcode", "array_row", "array_col", "in_tissue", "pxl_row_in_fullres", "pxl_col_in_fullres"]
        ),
    )


def drop_tissue_positions(outs):
    path = outs / SQ2 / "spatial/tissue_positions.parquet"
    rewrite_parquet(path, lambda t: t.filter(pa.compute.not_equal(t["array_row"], pa.scalar(100, pa.int32()))))


def wrong_microns_per_pixel(outs):
    path = outs / SQ2 / "spatial/scalefactors_json.json"
    factors = json.loads(path.read_text())
    factors["microns_per_pixel"] *= 1.5
    path.write_text(json.dumps(factors))


def no_tissue(outs):
    path = outs / SQ2 / "spatial/tissue_positions.parquet"
    rewrite_parquet(path, lambda t: t.set_column(1, "in_tissue", pa.array(np.zeros(len(t), np.int32))))


def small_image(outs):
    tifffile.imwrite(outs / "T1_tissue_image.tif", np.zeros((300, 300, 3), np.uint8), photometric="rgb")


def corrupt_image(outs):
    (outs / "T1_tissue_image.tif").write_bytes(b"II*\x00" + b"\x07" * 4000)


def edit_matrix(edit):
    def breaker(outs):
        import h5py

        with h5py.File(outs / SQ2 / "filtered_feature_bc_matrix.h5", "r+") as f:
            edit(f["matrix"])

    return breaker


def negative_count(m):
    data = m["data"][:]
    data[len(data) // 2] = -3
    m["data"][:] = data


def empty_matrix(m):
    for name in ("data", "indices"):
        dtype = m[name].dtype
        del m[name]
        m.create_dataset(name, data=np.zeros(0, dtype))
    m["indptr"][:] = 0


def duplicate_positions(outs):
    path = outs / SQ2 / "spatial/tissue_positions.parquet"
    rewrite_parquet(path, lambda t: pa.concat_tables([t, t.filter(pa.compute.greater(t["in_tissue"], 0)).slice(0, 3)]))


def truncated_image(outs):
    """A copy that stopped early: the file's last tenth is missing."""
    path = outs / "T1_tissue_image.tif"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 9 // 10])


BAD = {
    "no feature slice": (drop_feature_slice, "T1_feature_slice.h5", "missing"),
    "tar.gz": (tar_binned_outputs, "binned_outputs.tar.gz", "tar -xzf"),
    "no matrix": (remove(f"{SQ2}/filtered_feature_bc_matrix.h5"), "filtered_feature_bc_matrix.h5", "missing"),
    "no positions": (
        remove(f"{SQ2}/spatial/tissue_positions.parquet"),
        "tissue_positions.parquet",
        "missing",
    ),
    "no scalefactors": (remove(f"{SQ2}/spatial/scalefactors_json.json"), "scalefactors_json.json", "missing"),
    "column order": (
        reorder_columns,
        "tissue_positions.parquet",
        "'barcode', 'in_tissue', 'array_row', 'array_col'",
    ),
    "missing barcodes": (drop_tissue_positions, "filtered_feature_bc_matrix.h5", "barcodes are not in"),
    "microns per pixel": (wrong_microns_per_pixel, "scalefactors_json.json", "microns_per_pixel"),
    "no tissue": (no_tissue, "tissue_positions.parquet", "no bin is in tissue"),
    "small image": (small_image, "T1_tissue_image.tif", "smaller than one 256 um tile"),
    "corrupt image": (corrupt_image, "T1_tissue_image.tif", "cannot decode"),
    "truncated image": (truncated_image, "T1_tissue_image.tif", "cannot decode"),
    "negative counts": (edit_matrix(negative_count), "filtered_feature_bc_matrix.h5", "negative counts"),
    "empty matrix": (edit_matrix(empty_matrix), "filtered_feature_bc_matrix.h5", "holds no counts"),
    "duplicated barcodes": (duplicate_positions, "tissue_positions.parquet", "listed more than once"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_names_file_and_fault_and_writes_nothing(case, hd_sample, tmp_path):
    breaker, file_name, fault = BAD[case]
    outs = tmp_path / "outs"
    shutil.copytree(hd_sample.outs, outs)
    breaker(outs)
    with pytest.raises(InputError) as err:
        validate_spaceranger(outs, "T1")
    message = str(err.value)
    assert file_name in message and fault in message and "\n" not in message
    out_zarr = tmp_path / "results" / "T1.zarr"
    with pytest.raises(InputError):
        ingest(outs, "T1", out_zarr)
    assert not out_zarr.parent.exists() or list(out_zarr.parent.iterdir()) == []


def test_missing_barcodes_are_counted(hd_sample, tmp_path):
    outs = tmp_path / "outs"
    shutil.copytree(hd_sample.outs, outs)
    drop_tissue_positions(outs)
    grid = hd_sample.in_tissue.reshape(hd_sample.n_rows, hd_sample.n_cols)
    with pytest.raises(InputError, match=rf"{grid[100].sum()} barcodes .* e\.g\. 's_002um_00100_"):
        validate_spaceranger(outs, "T1")


def test_unprefixed_feature_slice_is_accepted(hd_sample, tmp_path):
    outs = tmp_path / "outs"
    shutil.copytree(hd_sample.outs, outs)
    (outs / "T1_feature_slice.h5").rename(outs / "feature_slice.h5")
    assert validate_spaceranger(outs, "T1") == outs / "T1_tissue_image.tif"


def test_the_dataset_id_is_inferred_from_the_single_feature_slice(hd_sample, tmp_path, capsys):
    from sparsitytrap import cli

    outs = tmp_path / "outs"
    shutil.copytree(hd_sample.outs, outs)
    assert validate_spaceranger(outs, None) == outs / "T1_tissue_image.tif"
    assert cli.main(["validate", str(outs)]) == 0 and "looks like a valid" in capsys.readouterr().out
    shutil.copy(outs / "T1_feature_slice.h5", outs / "T2_feature_slice.h5")
    with pytest.raises(InputError, match="several feature slices"):
        validate_spaceranger(outs, None)


def test_good_sample_round_trips(hd_sample, sdata_zarr):
    import spatialdata

    sdata = spatialdata.read_zarr(sdata_zarr, selection=("tables", "images"))
    assert {"T1_full_image", "T1_hires_image", "T1_lowres_image"} <= set(sdata.images)
    assert set(sdata.tables) == {"square_002um"}  # the only table the workflow reads (ingest.BIN_UM)
    table = sdata.tables["square_002um"]
    assert table.n_obs == hd_sample.in_tissue.sum()
    assert (table.obs["in_tissue"] == 1).all()
    bins = table.obs["array_row"].to_numpy() * hd_sample.n_cols + table.obs["array_col"].to_numpy()
    expected = hd_sample.counts[bins].toarray()
    genes = pd.Index(table.var_names).get_indexer(hd_sample.gene_names)
    assert np.array_equal(table.X[:, genes].toarray(), expected)
    x, y = hd_sample.bin_to_pixel @ np.stack([table.obs["array_row"], table.obs["array_col"], np.ones(len(bins))])
    assert np.allclose(table.obsm["spatial"], np.column_stack([x, y]))
    full = sdata.images["T1_full_image"]["scale0"]["image"]
    assert full.shape == (3, *hd_sample.fullres_shape)


def test_bins_are_a_labels_raster_the_tables_annotate(hd_sample, sdata_zarr):
    """Default `ingest.bins: labels`: no per-bin shapes; each table annotates its bin size's raster,
    whose pixel at (array_row, array_col) holds that bin's instance id, placed on the H&E."""
    import spatialdata
    from spatialdata.transformations import get_transformation

    sdata = spatialdata.read_zarr(sdata_zarr)
    assert not sdata.shapes
    table = sdata.tables["square_002um"]
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == "T1_square_002um_labels" and attrs["region"] in sdata.labels
    labels = sdata.labels[attrs["region"]]
    raster = np.asarray(labels)  # spans the table's bins: its pixel (0, 0) is the first row and column
    rows, cols = table.obs["array_row"].to_numpy(), table.obs["array_col"].to_numpy()
    y, x = rows - rows.min(), cols - cols.min()
    np.testing.assert_array_equal(raster[y, x], table.obs[attrs["instance_key"]].to_numpy())
    # spatialdata-io maps pixel index (x, y) to the bin's centre in the H&E (obsm spatial)
    affine = get_transformation(labels, to_coordinate_system="T1").to_affine_matrix(("x", "y"), ("x", "y"))
    xy = affine @ np.stack([x, y, np.ones(len(rows))])
    np.testing.assert_allclose(xy[:2].T, table.obsm["spatial"], atol=1e-6)


def test_arrow_pool_is_swapped_only_while_ingesting():
    """Arrow allocates from a pool that returns freed memory during ingestion, and from its default after."""
    before = pa.default_memory_pool().backend_name
    with _arrow_returns_memory():
        assert pa.default_memory_pool().backend_name in ("jemalloc", "system")
        assert pa.array(np.arange(1000)).sum().as_py() == 499500
    assert pa.default_memory_pool().backend_name == before
