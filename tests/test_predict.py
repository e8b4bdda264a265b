"""Whole-sample predictions on a real ingested sample: the seamless stitched map and the fold's SpatialData store.

A tiny Hist2ST + Poisson model is trained (on the CPU, a few epochs) on the tiles of the conftest
sample; its predictions are stitched from half-overlapping windows cut from the H&E, and the
overlay store is read back with spatialdata as a user would.
"""

import numpy as np
import pytest
from test_features import TINY_ENCODER
from test_train import make_config

from sparsitytrap import config as stconfig
from sparsitytrap.errors import InputError
from sparsitytrap.features import cache_features
from sparsitytrap.predict import extent, predict, seams, tile_map, window_grid, write_predictions_sdata
from sparsitytrap.stores.predictions import open_overlay, open_predictions
from sparsitytrap.stores.tiles import open_tiles
from sparsitytrap.tile import _full_image, tile_image, tile_sample
from sparsitytrap.training import fit

BINS = 32
STITCH = {"stride_bins": 16, "window": "hann"}


@pytest.fixture(scope="module")
def fold(sdata_zarr, genes_csv, tmp_path_factory):
    """The conftest sample tiled (32-bin tiles), cached, a model trained on it, predicted tiled and stitched."""
    root = tmp_path_factory.mktemp("predict")
    tiles = root / "tiles.zarr"
    tile_sample(sdata_zarr, genes_csv, tiles, tile_bins=BINS, min_tissue_fraction=0.5, dataset_id="T1")
    features = root / "features.zarr"
    cache_features(tiles, TINY_ENCODER, features, device="cpu")
    config = make_config(root, epochs=4, lr=3e-3)
    config["samples"] = {"T1": {}}
    model_cfg = stconfig.model_config(config, "E")
    out = root / "model"
    fit(model_cfg, [tiles], [features], out, encoder_cfg=stconfig.encoder_config(config), fold="test-T1")
    paths = {"tiles": tiles, "features": features, "weights": out / "best.safetensors", "root": root}
    common = dict(weights=paths["weights"], tiles=tiles, features=features, encoder_cfg=stconfig.encoder_config(config))
    predict(model_cfg, out_pred=root / "tiled.zarr", **common)
    predict(model_cfg, out_pred=root / "stitched.zarr", sdata=sdata_zarr, prediction=STITCH, **common)
    overlay = root / "fold.zarr"
    write_predictions_sdata({"E": root / "stitched.zarr"}, tiles, overlay, sdata=sdata_zarr)
    return {**paths, "tiled": root / "tiled.zarr", "stitched": root / "stitched.zarr", "overlay": overlay}


def test_window_grid_covers_every_tile_bin_equally(fold):
    root = open_tiles(fold["tiles"])
    lo, size = extent(root)
    cover = np.zeros(size, dtype=int)
    for a, cols in window_grid(root, 16).items():
        for b in cols:
            r, c = a - lo[0], b - lo[1]
            cover[max(r, 0) : max(r + BINS, 0), max(c, 0) : max(c + BINS, 0)] += 1
    inside = tile_map(root, np.ones((root.n_tiles, BINS, BINS), bool), fill=False, dtype=bool)
    assert (cover[inside] == 4).all()  # (32 / 16) ** 2 windows over every bin of a tile


def test_a_window_on_the_tile_grid_is_cut_like_its_tile(fold, sdata_zarr):
    root = open_tiles(fold["tiles"])
    levels, affine = _full_image(sdata_zarr, root.sample), np.asarray(root.attrs["bin_to_pixel"])
    r0, c0 = root.bin_origin[1]
    np.testing.assert_array_equal(tile_image(levels, affine, r0, c0, BINS, 224), root.images[1])


def test_stitched_map_has_no_seam(fold):
    root = open_tiles(fold["tiles"])
    lo, _ = extent(root)
    mask = tile_map(root, root.mask, fill=False, dtype=bool)
    tiled = tile_map(root, open_predictions(fold["tiled"]).rates[:].astype(np.float32))
    store = open_predictions(fold["stitched"])
    stitched = store.stitched[:].astype(np.float32)
    assert stitched.shape == tiled.shape and store.attrs["stitched"]["origin"] == lo.tolist()
    assert np.isfinite(stitched[:, mask]).all() and (stitched[:, mask] >= 0).all()
    across_t, inside_t = seams(tiled, mask, BINS, lo)
    across_s, inside_s = seams(stitched, mask, BINS, lo)
    assert across_t > 1.5 * inside_t  # the tiled map shows the tile grid ...
    assert across_s < 1.15 * inside_s  # ... the stitched one no more than the variation inside a tile
    # evaluation's `rates` are the tiled ones, untouched by stitching
    np.testing.assert_array_equal(open_predictions(fold["stitched"]).rates[:], open_predictions(fold["tiled"]).rates[:])


def test_stride_of_a_tile_with_a_flat_window_is_the_tiles(fold, sdata_zarr, tmp_path):
    cfg = stconfig.model_config({**make_config(fold["root"]), "samples": {"T1": {}}}, "E")
    out = tmp_path / "p.zarr"
    kwargs = dict(weights=fold["weights"], tiles=fold["tiles"], features=fold["features"], sdata=sdata_zarr)
    predict(cfg, out_pred=out, prediction={"stride_bins": BINS, "window": "flat"}, **kwargs)
    root = open_tiles(fold["tiles"])
    tiled = tile_map(root, open_predictions(fold["tiled"]).rates[:].astype(np.float32))
    np.testing.assert_array_equal(open_predictions(out).stitched[:].astype(np.float32), tiled)
    with pytest.raises(InputError, match="prediction.stride_bins"):
        predict(cfg, out_pred=tmp_path / "bad.zarr", prediction={"stride_bins": BINS + 1}, **kwargs)
    other = {**TINY_ENCODER, "kwargs": {**TINY_ENCODER["kwargs"], "depth": 2}}
    with pytest.raises(InputError, match="re-run features"):  # new windows must be encoded like the cached tiles
        predict(cfg, out_pred=tmp_path / "bad.zarr", prediction=STITCH, encoder_cfg=other, **kwargs)


def test_overlay_opens_with_image_raster_and_table(fold):
    import spatialdata

    sdata = spatialdata.read_zarr(fold["overlay"])
    assert set(sdata.images) == {"T1_full_image", "predictions_E_image"}
    assert set(sdata.tables) == {"predictions_E"} and set(sdata.shapes) == {"T1_predicted_002um"}
    for name in ("T1_full_image", "predictions_E_image", "T1_predicted_002um"):
        assert "T1" in spatialdata.transformations.get_transformation(sdata[name], get_all=True)
    table, raster = sdata.tables["predictions_E"], sdata.images["predictions_E_image"]
    assert list(raster.coords["c"].values) == list(table.var_names)
    # the raster holds the table's values at the bins' (row, col), and the table the stitched map
    r, c = table.obs.array_row.to_numpy(), table.obs.array_col.to_numpy()
    values = raster.values[:, r - r.min(), c - c.min()].T
    np.testing.assert_allclose(values, table.X, rtol=1e-6)
    store = open_predictions(fold["stitched"])
    r0, c0 = store.attrs["stitched"]["origin"]
    np.testing.assert_array_equal(table.X, store.stitched[:][:, r - r0, c - c0].T.astype(np.float32))
    assert open_overlay(fold["overlay"]).tables["predictions_E"].shape == table.shape  # manifest verified


def test_overlay_keeps_the_ingested_location_ids(fold, sdata_zarr):
    import spatialdata

    ingested = spatialdata.read_zarr(sdata_zarr, selection=("tables",)).tables["square_002um"].obs
    table = spatialdata.read_zarr(fold["overlay"]).tables["predictions_E"].obs
    key = ["array_row", "array_col"]
    ids = [k for k in ("location_id", "relabeled_location_id") if k in ingested]
    assert "location_id" in ids and all(k in table for k in ids)
    joined = table[[*key, *ids]].merge(ingested[[*key, *ids]], on=key, suffixes=("", "_in"))
    assert len(joined) == len(table)
    for k in ids:  # a join on any of the ingested keys pairs the same bins
        np.testing.assert_array_equal(joined[k].to_numpy(), joined[f"{k}_in"].to_numpy())
    shapes = spatialdata.read_zarr(fold["overlay"]).shapes["T1_predicted_002um"]
    np.testing.assert_array_equal(shapes.index.to_numpy(), table.location_id.to_numpy())


def test_overlay_refuses_a_damaged_store(fold, tmp_path):
    import shutil

    copy = tmp_path / "fold.zarr"
    shutil.copytree(fold["overlay"], copy)
    chunk = next(
        p for p in (copy / "images" / "predictions_E_image").rglob("*") if p.is_file() and p.name != "zarr.json"
    )
    chunk.unlink()
    with pytest.raises(InputError, match="missing"):
        open_overlay(copy)


def test_one_gene_beside_the_he_renders_headless(fold, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from spatialdata.transformations import get_transformation

    sdata = open_overlay(fold["overlay"])
    gene = sdata.tables["predictions_E"].var_names[0]
    he = sdata.images["T1_full_image"]["scale0"]["image"].values.transpose(1, 2, 0)
    raster = sdata.images["predictions_E_image"].sel(c=gene).values
    affine = get_transformation(sdata.images["predictions_E_image"], "T1").to_affine_matrix(("x", "y"), ("x", "y"))
    corners = affine @ np.array([[-0.5, raster.shape[1] - 0.5], [-0.5, raster.shape[0] - 0.5], [1, 1]])
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 4))
    left.imshow(he)
    left.set_title("H&E")
    shown = right.imshow(raster, cmap="magma", vmax=np.percentile(raster[raster > 0], 99))
    right.set_title(f"{gene}, predicted 2 um rate")
    fig.colorbar(shown, ax=right)
    fig.savefig(tmp_path / "gene.png", dpi=60)
    image = plt.imread(tmp_path / "gene.png")
    assert image.shape[0] > 100 and image[..., :3].std() > 0.05  # something was drawn
    # the raster lies on the H&E: its pixel box falls inside the image, in the sample's pixels
    assert (corners[:2].min(1) > -5).all() and (corners[0].max() < he.shape[1]) and (corners[1].max() < he.shape[0])


def test_stitching_with_tta_encodes_every_view_of_the_new_windows(fold, sdata_zarr, tmp_path):
    cfg = stconfig.model_config({**make_config(fold["root"]), "samples": {"T1": {}}}, "E")
    out = tmp_path / "tta.zarr"
    predict(cfg, weights=fold["weights"], tiles=fold["tiles"], features=fold["features"], out_pred=out,
            encoder_cfg=TINY_ENCODER, tta=True, sdata=sdata_zarr, prediction=STITCH)  # fmt: skip
    root = open_tiles(fold["tiles"])
    lo, _ = extent(root)
    mask = tile_map(root, root.mask, fill=False, dtype=bool)
    store = open_predictions(out)
    assert store.attrs["tta"] is True
    stitched = store.stitched[:].astype(np.float32)
    assert np.isfinite(stitched[:, mask]).all()
    across, inside = seams(stitched, mask, BINS, lo)
    assert across < 1.15 * inside
    # the views' average differs from the identity view's map
    assert not np.allclose(stitched[:, mask], open_predictions(fold["stitched"]).stitched[:][:, mask], rtol=1e-3)
