"""The H&E image of a patient: where the bin grid lies in it, and its tiled rendering.

The bin grid sits in the image rotated, offset and at a non-integer pixel size, as on a real
slide, so a pipeline cannot rely on pixels lining up with bins. The full-resolution image is
rendered one tile at a time (never held whole); a reduced mosaic kept on the way gives the
hires and lowres images.
"""

import math

import numpy as np

from . import morphology


def pixel_frame(params):
    """Where the bin grid lies in the full-resolution image: rotated, offset, non-integer scale.

    Pixel (i, j) has its centre at (x, y) = (j, i); a point u (um, capture-area frame) is at
    pixel rot @ u / microns_per_pixel + offset.

    Parameters
    ----------
    params
        Resolved parameters.

    Returns
    -------
    A
        2x3 affine, (x, y) = A @ (array_row, array_col, 1), the pixel of a bin centre.
    rot, offset
        Rotation matrix and pixel offset (x, y).
    shape
        (height, width) of the image.
    """
    b, mpp = params["bin_um"], params["microns_per_pixel"]
    th = math.radians(params["rotation_deg"])
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    w, h = params["n_cols"] * b, params["n_rows"] * b
    corners = rot @ np.array([[0, w, 0, w], [0, 0, h, h]]) / mpp
    offset = params["image_margin_px"] - corners.min(axis=1) + np.asarray(params["pixel_jitter"])
    shape = tuple(int(v) for v in np.ceil(corners.max(axis=1) + offset + params["image_margin_px"])[::-1])
    # (x, y) = rot @ (u_x, u_y) / mpp + offset, with u = ((col + 0.5) b, (row + 0.5) b)
    lin = rot @ np.array([[0.0, b], [b, 0.0]]) / mpp  # columns: d/d row, d/d col
    A = np.column_stack([lin, lin @ np.array([0.5, 0.5]) + offset])
    return A, rot, offset, shape


def _render_tiles(tissue, params, rot, offset, shape, seed, mosaic, factor):
    """Yield the H&E tiles in row-major order; keep a `factor`-times smaller copy in `mosaic`."""
    tile, mpp = params["tile_px"], params["microns_per_pixel"]
    height, width = shape
    for ty in range(0, height, tile):
        for tx in range(0, width, tile):
            th, tw = min(tile, height - ty), min(tile, width - tx)
            # Pixel (i, j) has its centre at (x, y) = (j, i) px; um = rot^T (px - offset) * mpp.
            grid = morphology.Grid(
                rot.T @ (np.array([tx, ty]) - offset) * mpp, rot.T[:, 1] * mpp, rot.T[:, 0] * mpp, th, tw
            )
            rgb = tissue.render(grid, np.random.default_rng([seed, 2, ty, tx]))
            small = rgb[: th - th % factor, : tw - tw % factor].reshape(th // factor, factor, tw // factor, factor, 3)
            mosaic[ty // factor : ty // factor + small.shape[0], tx // factor : tx // factor + small.shape[2]] = (
                small.mean(axis=(1, 3))
            )
            yield rgb


def _downscale(mosaic, shape, max_px):
    """The image scaled so that its longer side is max_px (never enlarged), from its mosaic."""
    from PIL import Image

    s = min(1.0, max_px / max(shape))
    size = (max(1, round(shape[1] * s)), max(1, round(shape[0] * s)))
    return np.asarray(Image.fromarray(mosaic).resize(size, Image.Resampling.LANCZOS))


def write_he(stage, sample_id, tissue, params, rot, offset, shape):
    """Render the full-resolution H&E into `stage` tile by tile.

    Returns
    -------
    tif
        Path of the tiled TIFF (Space Ranger naming) in `stage`.
    hires, lowres
        RGB uint8 images whose longer side is `hires_max_px` / `lowres_max_px`.
    """
    from ..spaceranger import write_fullres_image

    factor = _mosaic_factor(shape, params)
    mosaic = np.zeros((shape[0] // factor, shape[1] // factor, 3), np.uint8)
    tiles = _render_tiles(tissue, params, rot, offset, shape, params["seed"], mosaic, factor)
    tif = write_fullres_image(stage, sample_id, tiles, shape, tile=params["tile_px"])
    return tif, _downscale(mosaic, shape, params["hires_max_px"]), _downscale(mosaic, shape, params["lowres_max_px"])


def _mosaic_factor(shape, params):
    """Largest power of two that divides the tile and still leaves the mosaic at least hires_max_px."""
    factor = 1
    while factor * 2 <= max(shape) / params["hires_max_px"] and params["tile_px"] % (factor * 2) == 0:
        factor *= 2
    return factor
