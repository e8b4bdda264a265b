import numpy as np
import pandas as pd
import pytest
import zarr

from sparsitytrap.errors import InputError
from sparsitytrap.tile import tile_sample

TILE = 128


@pytest.fixture(scope="module")
def tiles(sdata_zarr, genes_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiles") / "T1.zarr"
    tile_sample(sdata_zarr, genes_csv, out)
    return zarr.open_group(out, mode="r")


def tissue_fraction(sample):
    """Tissue fraction of every tile of the padded 2 um grid (bins outside the array: not tissue)."""
    grid = sample.in_tissue.reshape(sample.n_rows, sample.n_cols)
    grid = np.pad(grid, [(0, -sample.n_rows % TILE), (0, -sample.n_cols % TILE)])
    return grid.reshape(grid.shape[0] // TILE, TILE, grid.shape[1] // TILE, TILE).mean(axis=(1, 3))


def test_store_has_documented_arrays_and_attrs(tiles, genes_csv):
    T = tiles["grid"].shape[0]
    G = len(pd.read_csv(genes_csv))
    expected = {
        "images": ("uint8", (T, 224, 224, 3), (1, 224, 224, 3)),
        "counts": ("int32", (T, G, TILE, TILE), (1, G, TILE, TILE)),
        "mask": ("bool", (T, TILE, TILE), (1, TILE, TILE)),
        "grid": ("int32", (T, 2), None),
        "bin_origin": ("int32", (T, 2), None),
        "pixel_box": ("float64", (T, 4, 2), None),
    }
    for name, (dtype, shape, chunks) in expected.items():
        array = tiles[name]
        assert (str(array.dtype), array.shape) == (dtype, shape), name
        assert chunks is None or array.chunks == chunks, name
    attrs = dict(tiles.attrs)
    assert attrs["genes"] == pd.read_csv(genes_csv)["gene"].tolist()
    assert (attrs["sample"], attrs["tile_bins"], attrs["bin_um"], attrs["image_px"]) == ("T1", TILE, 2.0, 224)
    assert attrs["min_tissue_fraction"] == 0.5 and np.shape(attrs["bin_to_pixel"]) == (2, 3)
    assert np.array_equal(tiles["bin_origin"][:], tiles["grid"][:] * TILE)
    assert len(attrs["grid_shape"]) == 2


def test_counts_round_trip(tiles, hd_sample):
    genes = [hd_sample.gene_names.index(g) for g in tiles.attrs["genes"]]
    source = hd_sample.counts[:, genes].toarray().reshape(hd_sample.n_rows, hd_sample.n_cols, -1)
    source = source * hd_sample.in_tissue.reshape(hd_sample.n_rows, hd_sample.n_cols, 1)  # matrix = tissue bins
    expected = np.zeros(len(genes), dtype=np.int64)
    for r0, c0 in tiles["bin_origin"][:]:
        expected += source[r0 : r0 + TILE, c0 : c0 + TILE].sum(axis=(0, 1))
    counts = tiles["counts"][:]
    assert np.array_equal(counts.sum(axis=(0, 2, 3)), expected)
    # Bin by bin in one tile, and nothing outside the mask.
    r0, c0 = tiles["bin_origin"][0]
    block = source[r0 : r0 + TILE, c0 : c0 + TILE]
    assert np.array_equal(counts[0].transpose(1, 2, 0)[: block.shape[0], : block.shape[1]], block)
    assert not (counts.sum(axis=1) * ~tiles["mask"][:]).any()


def test_mask_follows_in_tissue(tiles, hd_sample):
    grid = np.pad(hd_sample.in_tissue.reshape(hd_sample.n_rows, hd_sample.n_cols), [(0, TILE), (0, TILE)])
    for t, (r0, c0) in enumerate(tiles["bin_origin"][:]):
        assert np.array_equal(tiles["mask"][t], grid[r0 : r0 + TILE, c0 : c0 + TILE])


def test_image_marker_lands_on_its_bin(tiles, hd_sample):
    """A blue disc drawn at a bin's pixel position (rotated, non-aligned pixel grid) maps back to that bin."""
    images, origins = tiles["images"][:].astype(float), tiles["bin_origin"][:]
    for row, col in hd_sample.markers:
        t = np.flatnonzero((origins[:, 0] == row // TILE * TILE) & (origins[:, 1] == col // TILE * TILE))[0]
        blue = np.clip(images[t, ..., 2] - images[t, ..., 0], 0, None)
        assert blue.max() > 100, "marker not visible"
        u, v = (np.indices(blue.shape) * blue).sum(axis=(1, 2)) / blue.sum()
        step = TILE / 224
        assert abs(origins[t, 0] - 0.5 + (u + 0.5) * step - row) < 1.0
        assert abs(origins[t, 1] - 0.5 + (v + 0.5) * step - col) < 1.0
    marker_tiles = {(r // TILE, c // TILE) for r, c in hd_sample.markers}
    for t, (gr, gc) in enumerate(tiles["grid"][:]):
        if (gr, gc) not in marker_tiles:
            assert (images[t, ..., 2] - images[t, ..., 0]).max() < 0, "marker leaked into another tile"


def test_pixel_box_is_the_affine_image_of_the_bin_square(tiles, hd_sample):
    r0, c0 = tiles["bin_origin"][0]
    corner = hd_sample.bin_to_pixel @ np.array([r0 - 0.5, c0 - 0.5, 1.0])
    assert np.allclose(tiles["pixel_box"][0, 0], corner)
    edge = tiles["pixel_box"][0, 1] - tiles["pixel_box"][0, 0]  # along bin columns: 256 um
    assert np.isclose(np.hypot(*edge) * hd_sample.microns_per_pixel, 256.0)


@pytest.mark.parametrize("threshold", [0.05, 0.5, 0.8, 0.95])
def test_threshold_keeps_exactly_the_tissue_tiles(threshold, sdata_zarr, genes_csv, hd_sample, tmp_path):
    out = tmp_path / "t.zarr"
    fraction = tissue_fraction(hd_sample)
    expected = {tuple(rc) for rc in np.argwhere(fraction >= threshold)}
    if not expected:
        with pytest.raises(InputError, match="no tile"):
            tile_sample(sdata_zarr, genes_csv, out, min_tissue_fraction=threshold)
        assert not out.exists()
        return
    n = tile_sample(sdata_zarr, genes_csv, out, min_tissue_fraction=threshold)
    store = zarr.open_group(out, mode="r")
    assert n == len(expected) and {tuple(rc) for rc in store["grid"][:]} == expected
    assert np.allclose([store["mask"][t].mean() for t in range(n)], [fraction[tuple(rc)] for rc in store["grid"][:]])


def test_missing_gene_is_an_input_error(sdata_zarr, tmp_path):
    genes = tmp_path / "genes.csv"
    pd.DataFrame({"gene": ["GENE01", "NOT_A_GENE"]}).to_csv(genes, index=False)
    out = tmp_path / "t.zarr"
    with pytest.raises(InputError, match=r"genes\.csv.*NOT_A_GENE"):
        tile_sample(sdata_zarr, genes, out)
    assert list(tmp_path.iterdir()) == [genes]


def test_same_inputs_same_store(tiles, sdata_zarr, genes_csv, tmp_path):
    out = tmp_path / "again.zarr"
    tile_sample(sdata_zarr, genes_csv, out)
    again = zarr.open_group(out, mode="r")
    for name in ("images", "counts", "mask", "pixel_box"):
        assert np.array_equal(again[name][:], tiles[name][:]), name
