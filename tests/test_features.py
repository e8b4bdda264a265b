import numpy as np
import pytest
import torch
import zarr

from sparsitytrap.encoder import build_encoder, token_grid
from sparsitytrap.errors import InputError
from sparsitytrap.features import cache_features
from sparsitytrap.stores import manifest
from sparsitytrap.views import DIHEDRAL, apply, inverse

# A tiny real timm ViT (random weights): 14 x 14 tokens of width 32.
TINY_ENCODER = {
    "name": "tiny",
    "arch": "vit_tiny_patch16_224",
    "kwargs": {"img_size": 224, "depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 0},
    "weights": None,
}


def write_tile_store(path, n_tiles=3, n_genes=4, seed=0, sample="S", grid_cols=3, tile_bins=128):
    """A tiny tile store in the documented format; images carry the structure of the counts.

    Each tile has a smooth random field; gene g's rate is ``exp(a_g * field + b_g)`` and the
    image's red channel is the field, so an encoder + decoder can learn something.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:tile_bins, 0:tile_bins] / tile_bins
    fields = []
    for _ in range(n_tiles):
        f = np.zeros((tile_bins, tile_bins))
        for _ in range(3):
            cy, cx, s = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.3)
            f += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s**2))
        fields.append(f / f.max())
    fields = np.stack(fields)
    a, b = rng.uniform(1, 3, n_genes), rng.uniform(-3, -1, n_genes)
    rate = np.exp(a[None, :, None, None] * fields[:, None] + b[None, :, None, None])
    counts = rng.poisson(rate).astype(np.int32)
    mask = np.ones((n_tiles, tile_bins, tile_bins), dtype=bool)
    mask[:, :, : tile_bins // 8] = False  # a strip of background
    counts *= mask[:, None]
    idx = (np.arange(224) * tile_bins) // 224  # image rows/cols follow bin rows/cols
    red = (255 * fields[:, idx][:, :, idx]).astype(np.uint8)
    images = np.stack([red, 255 - red // 2, rng.integers(0, 60, red.shape, dtype=np.uint8)], axis=-1)
    grid = np.array([(t // grid_cols, t % grid_cols) for t in range(n_tiles)], dtype=np.int32)
    origin = (grid * tile_bins).astype(np.int32)
    affine = [[0.0, 4.0, 2.0], [4.0, 0.0, 2.0]]  # (row, col, 1) -> (x, y): 4 px per 2 um bin
    corners = np.array([[0, 0], [0, 1], [1, 1], [1, 0]]) * tile_bins
    rc = origin[:, None, :] + corners[None]
    box = np.stack([rc[..., 1] * 4.0 + 2.0, rc[..., 0] * 4.0 + 2.0], axis=-1)

    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.create_array("images", data=images, chunks=(1, 224, 224, 3))
    root.create_array("counts", data=counts, chunks=(1, n_genes, tile_bins, tile_bins))
    root.create_array("mask", data=mask, chunks=(1, tile_bins, tile_bins))
    root.create_array("grid", data=grid)
    root.create_array("bin_origin", data=origin)
    root.create_array("pixel_box", data=box)
    root.attrs.update(
        {
            "sample": sample,
            "genes": [f"G{g}" for g in range(n_genes)],
            "tile_bins": tile_bins,
            "bin_um": 2.0,
            "image_px": 224,
            "min_tissue_fraction": 0.5,
            "bin_to_pixel": affine,
            "grid_shape": [int(grid[:, 0].max()) + 1, grid_cols],
        }
    )
    manifest.write(path)  # as every store the workflow writes
    return path


@pytest.mark.parametrize("v", range(8))
def test_apply_inverse_round_trip(v):
    x = np.arange(2 * 5 * 5).reshape(2, 5, 5)
    assert np.array_equal(inverse(apply(x, v), v), x)
    t = torch.from_numpy(x)
    assert torch.equal(inverse(apply(t, v), v), t)
    assert np.array_equal(apply(t, v).numpy(), apply(x, v))  # numpy and torch agree
    # an HWC image transformed on axes (0, 1) matches its CHW form on the last two axes
    hwc = np.random.default_rng(v).integers(0, 255, (5, 5, 3))
    assert np.array_equal(apply(hwc, v, axes=(0, 1)), apply(hwc.transpose(2, 0, 1), v).transpose(1, 2, 0))


def test_the_eight_views_are_the_dihedral_group():
    x = np.arange(16).reshape(4, 4)
    views = {apply(x, v).tobytes() for v in range(8)}
    assert len(views) == 8 and len(DIHEDRAL) == 8
    assert np.array_equal(apply(x, 0), x)
    assert np.array_equal(apply(x, 4), x[:, ::-1])  # view 4 = horizontal flip
    with pytest.raises(InputError, match="view"):
        apply(x, 8)


def test_cached_tokens_equal_direct_encoding(tmp_path):
    tiles = write_tile_store(tmp_path / "S.zarr", n_tiles=3)
    out = tmp_path / "features" / "S.zarr"
    cache_features(tiles, TINY_ENCODER, out, batch_size=2, device="cpu")
    root = zarr.open_group(str(out), mode="r")
    tokens = root["tokens"]
    assert tokens.shape == (3, 8, 32, 14, 14) and tokens.dtype == np.float16
    assert tokens.chunks == (1, 1, 32, 14, 14)
    assert root.attrs["encoder"] == "tiny" and root.attrs["dim"] == 32 and root.attrs["grid"] == [14, 14]
    assert [p.name for p in out.parent.iterdir()] == ["S.zarr"]  # no temporary left

    encoder = build_encoder({k: v for k, v in TINY_ENCODER.items() if k != "name"})
    images = torch.from_numpy(zarr.open_group(str(tiles), mode="r")["images"][:]).permute(0, 3, 1, 2)
    for v in range(8):
        direct = token_grid(encoder, apply(images, v)).numpy()
        np.testing.assert_allclose(tokens[:, v].astype(np.float32), direct, rtol=2e-3, atol=2e-3)
    # the views differ (the encoder is not blind to the transform)
    assert not np.allclose(tokens[0, 0], tokens[0, 1], atol=1e-2)


def test_cache_is_deterministic_and_checks_input(tmp_path):
    tiles = write_tile_store(tmp_path / "S.zarr", n_tiles=2)
    cache_features(tiles, TINY_ENCODER, tmp_path / "a.zarr", device="cpu")
    cache_features(tiles, TINY_ENCODER, tmp_path / "b.zarr", device="cpu")
    a = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")["tokens"][:]
    b = zarr.open_group(str(tmp_path / "b.zarr"), mode="r")["tokens"][:]
    assert np.array_equal(a, b)
    with pytest.raises(InputError, match="missing.zarr"):
        cache_features(tmp_path / "missing.zarr", TINY_ENCODER, tmp_path / "c.zarr", device="cpu")
    assert not (tmp_path / "c.zarr").exists()
