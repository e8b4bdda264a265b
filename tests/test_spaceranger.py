import json

import h5py
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import tifffile
from conftest import image_tiles, make_sample

from sparsitytrap import spaceranger


def bin_dir(sample, b):
    return sample.outs / "binned_outputs" / f"square_{b:03d}um"


def dense_grid(sample):
    return sample.counts.toarray().reshape(sample.n_rows, sample.n_cols, -1)


def pool(grid, k):
    """Sum-pool the first two axes in k x k blocks (padding the edges with zeros)."""
    pr, pc = -grid.shape[0] % k, -grid.shape[1] % k
    grid = np.pad(grid, [(0, pr), (0, pc)] + [(0, 0)] * (grid.ndim - 2))
    return grid.reshape(grid.shape[0] // k, k, grid.shape[1] // k, k, *grid.shape[2:]).sum(axis=(1, 3))


def test_barcodes_format():
    codes = spaceranger.barcodes(8, [3, 12345], [1021, 0])
    assert codes.tolist() == [b"s_008um_00003_01021-1", b"s_008um_12345_00000-1"]


def test_layout_and_metadata(hd_sample):
    outs = hd_sample.outs
    with h5py.File(outs / f"{hd_sample.sample_id}_feature_slice.h5") as f:
        layout = json.loads(json.loads(f.attrs["metadata_json"])["hd_layout_json"])
    assert layout["file_format"] == "1.0"
    for b in (2, 8, 16):
        spatial = bin_dir(hd_sample, b) / "spatial"
        positions = pd.read_parquet(spatial / "tissue_positions.parquet")
        assert list(positions.columns) == spaceranger.POSITION_COLUMNS
        k = b // 2
        assert len(positions) == -(-hd_sample.n_rows // k) * -(-hd_sample.n_cols // k)  # every bin of the grid
        factors = json.loads((spatial / "scalefactors_json.json").read_text())
        assert factors["bin_size_um"] == b
        assert np.isclose(factors["bin_size_um"] / factors["spot_diameter_fullres"], factors["microns_per_pixel"])
        assert np.isclose(factors["tissue_hires_scalef"], 1 / 8, rtol=0.01)
        assert (spatial / "tissue_hires_image.png").is_file() and (spatial / "tissue_lowres_image.png").is_file()
    assert (outs / "spatial" / "scalefactors_json.json").is_file()


def test_2um_matrix_holds_tissue_bins_and_their_counts(hd_sample):
    adata = sc.read_10x_h5(bin_dir(hd_sample, 2) / "filtered_feature_bc_matrix.h5")
    tissue = np.flatnonzero(hd_sample.in_tissue)
    rows, cols = np.divmod(tissue, hd_sample.n_cols)
    assert adata.obs_names.tolist() == spaceranger.barcodes(2, rows, cols).astype(str).tolist()
    assert adata.var_names.tolist() == hd_sample.gene_names
    assert np.array_equal(adata.X.toarray(), hd_sample.counts[tissue].toarray())


@pytest.mark.parametrize("b", [8, 16])
def test_coarse_bins_are_sum_pooled(hd_sample, b):
    k = b // 2
    pooled = pool(dense_grid(hd_sample), k)
    tissue = pool(hd_sample.in_tissue.reshape(hd_sample.n_rows, hd_sample.n_cols).astype(int), k) > 0
    positions = pd.read_parquet(bin_dir(hd_sample, b) / "spatial" / "tissue_positions.parquet")
    grid_tissue = np.zeros_like(tissue)
    grid_tissue[positions["array_row"], positions["array_col"]] = positions["in_tissue"] > 0
    assert np.array_equal(grid_tissue, tissue)

    adata = sc.read_10x_h5(bin_dir(hd_sample, b) / "filtered_feature_bc_matrix.h5")
    pos = positions.set_index("barcode").loc[adata.obs_names]
    assert np.array_equal(adata.X.toarray(), pooled[pos["array_row"], pos["array_col"]])
    assert adata.n_obs == tissue.sum()

    # A coarse bin centre is the mean of its children's centres (checked on a full block).
    A = hd_sample.bin_to_pixel
    r, c = 3, 5
    child_r, child_c = np.meshgrid(np.arange(k * r, k * r + k), np.arange(k * c, k * c + k))
    x, y = A @ np.stack([child_r.ravel(), child_c.ravel(), np.ones(k * k)])
    row = positions[(positions["array_row"] == r) & (positions["array_col"] == c)].iloc[0]
    assert np.isclose(row["pxl_col_in_fullres"], x.mean()) and np.isclose(row["pxl_row_in_fullres"], y.mean())


def test_fit_bin_to_pixel_recovers_the_affine(hd_sample):
    positions = pd.read_parquet(bin_dir(hd_sample, 2) / "spatial" / "tissue_positions.parquet")
    A = spaceranger.fit_bin_to_pixel(
        positions["array_row"],
        positions["array_col"],
        positions["pxl_row_in_fullres"],
        positions["pxl_col_in_fullres"],
    )
    assert np.allclose(A, hd_sample.bin_to_pixel, atol=1e-8)
    with pytest.raises(ValueError, match="degenerate"):
        spaceranger.fit_bin_to_pixel([0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 1, 2])


def test_fullres_image_is_tiled_compressed_and_exact(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(700, 530, 3), dtype=np.uint8)  # edge tiles are partial
    path = spaceranger.write_fullres_image(tmp_path, "S", image_tiles(image, 256), image.shape[:2], tile=256)
    assert path == tmp_path / "S_tissue_image.tif"
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.tilewidth == 256 and page.compression != 1
        assert np.array_equal(tif.asarray(), image)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S_tissue_image.tif"]


def test_failed_write_leaves_nothing(tmp_path, hd_sample):
    with pytest.raises(TypeError):
        spaceranger.write_sample(
            tmp_path / "outs",
            "X",
            counts=hd_sample.counts,
            gene_ids=hd_sample.gene_names,
            gene_names=hd_sample.gene_names,
            n_rows=hd_sample.n_rows,
            n_cols=hd_sample.n_cols,
            in_tissue=hd_sample.in_tissue,
            bin_to_pixel=hd_sample.bin_to_pixel,
            microns_per_pixel=hd_sample.microns_per_pixel,
            fullres_shape=hd_sample.fullres_shape,
            hires_image=np.zeros((10, 10, 5), np.uint8),  # PIL cannot write 5 channels
            lowres_image=np.zeros((4, 4, 3), np.uint8),
        )
    assert list(tmp_path.iterdir()) == []


def test_same_inputs_same_files(tmp_path):
    a = make_sample(tmp_path / "a" / "outs", n_rows=40, n_cols=30, n_genes=3)
    b = make_sample(tmp_path / "b" / "outs", n_rows=40, n_cols=30, n_genes=3)
    for rel in (
        "binned_outputs/square_008um/spatial/tissue_positions.parquet",
        "binned_outputs/square_002um/spatial/scalefactors_json.json",
    ):
        assert (a.outs / rel).read_bytes() == (b.outs / rel).read_bytes()
    ha, hb = (sc.read_10x_h5(s.outs / "binned_outputs/square_016um/filtered_feature_bc_matrix.h5") for s in (a, b))
    assert np.array_equal(ha.X.toarray(), hb.X.toarray()) and list(ha.obs_names) == list(hb.obs_names)
