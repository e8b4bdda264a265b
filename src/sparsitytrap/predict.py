"""Predict a test sample with trained weights: its rate store, and the SpatialData overlay of a fold.

``predictions.zarr``: the rate store of one (model, fold), owned by :mod:`sparsitytrap.stores.predictions`:
``rates`` of the non-overlapping tiles (what evaluation scores) and, given the ingested sample, the
seamless ``stitched`` map: windows of tile size every ``prediction.stride_bins`` bins (the tiles
themselves among them, their rates reused; the others cut from the H&E as the tile stage cuts a
tile and encoded by the same frozen encoder), blended with ``prediction.window``.

``results/predictions/{fold}.zarr`` (:func:`write_predictions_sdata`, rule ``overlay``): a
SpatialData object, all in the coordinate system named after the sample like the ingested H&E:

- ``{sample}_full_image``: the ingested H&E (every pyramid level);
- tables ``predictions_{model}`` (AnnData: the in-tissue 2 um bins of the test tiles x genes, X =
  predicted rates float32, from the stitched map when there is one; obs ``array_row``,
  ``array_col``, ``tile``, ``location_id`` (and ``relabeled_location_id`` when the ingested bins are
  labels): the ingested table's ids of the same bins, ``region``; obs names are Space Ranger
  barcodes ``s_002um_{row:05d}_{col:05d}-1``; obsm ``spatial`` = full-resolution pixel (x, y) of the
  bin centres), all annotating the shapes ``{sample}_predicted_002um`` (2 um squares in
  full-resolution pixels, indexed by ``location_id``);
- images ``predictions_{model}_image``: the same table as a (genes, rows, cols) raster, one pixel per
  bin (``spatialdata.rasterize_bins``), with its affine onto the H&E.
"""

import json
import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from .decoders import build_decoder, to_rate
from .device import resolve_device
from .errors import InputError
from .io import atomic_path
from .stores import manifest
from .stores import predictions as prediction_store
from .stores.features import open_features
from .stores.predictions import open_predictions
from .stores.tiles import open_tiles
from .views import DIHEDRAL, apply, inverse

log = logging.getLogger(__name__)

FLOAT16_MAX = float(np.finfo(np.float16).max)


def load_model(weights, device="cpu"):
    """Rebuild a decoder from ``best.safetensors`` and its metadata.

    Parameters
    ----------
    weights
        Path to a ``best.safetensors`` written by :func:`sparsitytrap.training.fit`.
    device
        Torch device.

    Returns
    -------
    model, meta
        The decoder in eval mode and the metadata dict (``decoder``, ``decoder_kwargs``,
        ``output``, ``in_dim``, ``genes`` parsed from JSON, ``model``, ``fold``).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = dict(f.metadata() or {})
        state = load_file(str(weights), device="cpu")
    except Exception as err:  # noqa: BLE001 - any unreadable file is an input fault
        raise InputError(weights, f"cannot read weights: {err}".replace("\n", " ")) from None
    missing = {"decoder", "decoder_kwargs", "output", "in_dim", "genes"} - set(meta)
    if missing:
        raise InputError(weights, f"metadata lacks {sorted(missing)} (not written by sparsitytrap train)")
    meta["decoder_kwargs"] = json.loads(meta["decoder_kwargs"])
    meta["genes"] = json.loads(meta["genes"])
    model = build_decoder(
        meta["decoder"], int(meta["in_dim"]), len(meta["genes"]), meta["output"], **meta["decoder_kwargs"]
    )
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def predict(
    model_cfg=None,
    weights=None,
    tiles=None,
    features=None,
    out_pred=None,
    encoder_cfg=None,
    tta=None,
    batch_size=None,
    device=None,
    sdata=None,
    prediction=None,
):
    """Write ``predictions.zarr`` of one test sample, with the model's prediction settings.

    The SpatialData overlay of a fold is a separate step (:func:`write_predictions_sdata`, the
    workflow's ``overlay`` rule), written once for every model of the fold.

    Parameters
    ----------
    model_cfg
        Resolved model (``sparsitytrap.config.model_config``), for its ``training`` keys
        ``predict_tta``, ``batch_size``, ``device``; may be None.
    weights
        ``best.safetensors``.
    tiles
        The test sample's tile store.
    features
        Its feature cache; None to encode the images on the fly with `encoder_cfg`.
    out_pred
        Output path, ``predictions.zarr``.
    encoder_cfg
        Encoder settings, for on-the-fly encoding.
    tta, batch_size, device
        Override the model's ``predict_tta`` (average over the 8 dihedral views), batch size and
        device.
    sdata
        The ingested test sample (its H&E): with it, the overlapping windows of `prediction` are
        cut, encoded and blended into the seamless ``stitched`` map; None: tiles only.
    prediction
        The config's ``prediction:`` section (``stride_bins``, ``window``); None: its defaults.
    """
    t = (model_cfg or {}).get("training", {})
    tta = bool(t.get("predict_tta", False) if tta is None else tta)
    batch_size = int(batch_size or t.get("batch_size", 8))
    write_predictions(
        weights,
        tiles,
        out_pred,
        features=features,
        encoder_cfg=encoder_cfg,
        tta=tta,
        batch_size=batch_size,
        device=device or t.get("device", "auto"),
        sdata=sdata,
        prediction=prediction,
    )


@torch.no_grad()
def predict_rates(model, output, x, tta=False):
    """Rates ``[B, G, H, W]`` of a batch of token grids (or of tokens per view with TTA).

    Parameters
    ----------
    model
        Decoder in eval mode.
    output
        Its output space (``to_rate``).
    x
        ``[B, D, h, w]`` tokens of the identity view, or, with `tta`, a callable ``x(v)``
        returning the tokens of view v.
    tta
        Average the rates of the 8 views, each transformed back to the tile's frame.
    """
    if not tta:
        return to_rate(model(x).float(), output)
    rates = [inverse(to_rate(model(x(v)).float(), output), v) for v in range(len(DIHEDRAL))]
    return torch.stack(rates).mean(0)


def write_predictions(
    weights,
    tiles,
    out_zarr,
    features=None,
    encoder_cfg=None,
    tta=False,
    batch_size=8,
    device="auto",
    sdata=None,
    prediction=None,
):
    """Predict every tile of a tile store and write the float16 rate store.

    Parameters
    ----------
    weights
        ``best.safetensors``.
    tiles
        Tile store of the sample to predict.
    out_zarr
        ``predictions.zarr`` (see the module docstring).
    features
        Feature cache of the sample; None: encode images on the fly with `encoder_cfg`.
    encoder_cfg
        Encoder settings for on-the-fly encoding.
    tta
        Average over the 8 dihedral views.
    batch_size
        Tiles per forward.
    device
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    sdata, prediction
        See :func:`predict`: the ingested sample for the ``stitched`` map, and its settings.
    """
    dev = resolve_device(device)
    model, meta = load_model(weights, dev)
    root = open_tiles(tiles)
    # the model's genes: its fold's selection, all among the tile store's (the folds' union)
    n_tiles, genes, side = root.n_tiles, meta["genes"], root.tile_bins
    missing = [g for g in genes if g not in set(root.genes)]
    if missing:
        raise InputError(tiles, f"{len(missing)} genes the model was trained on are not in it, e.g. {missing[0]!r}")
    tokens_of = _token_source(root, features, encoder_cfg, n_tiles, int(meta["in_dim"]), dev)
    relative = meta["output"] == "score"
    with atomic_path(out_zarr) as tmp:
        rates = prediction_store.create(tmp, (n_tiles, len(genes), side, side))
        for start in tqdm(range(0, n_tiles, batch_size), desc=f"predict {root.attrs.get('sample')}", unit="batch"):
            idx = np.arange(start, min(start + batch_size, n_tiles))
            x = (lambda v, idx=idx: tokens_of(idx, v)) if tta else tokens_of(idx, 0)
            pred = predict_rates(model, meta["output"], x, tta=tta)
            rates[idx[0] : idx[-1] + 1] = np.clip(pred.cpu().numpy(), 0, FLOAT16_MAX).astype(np.float16)
        stitched = {}
        if sdata is not None:
            settings = prediction_settings(prediction, side)
            _same_encoder(features, encoder_cfg)
            windows = window_grid(root, settings["stride_bins"])
            rows_of = _window_rates(root, rates, windows, sdata, (model, meta), encoder_cfg, tta, batch_size, dev)
            stitched = stitch(tmp, root, rows_of, settings, len(genes))
        prediction_store.finish(
            tmp,
            {
                "model": meta.get("model"),
                "fold": meta.get("fold"),
                "sample": root.sample,
                "genes": genes,
                "output": meta["output"],
                "tta": bool(tta),
                "relative": relative,
                "note": "exp(score) of a ranking model: relative scores, not expected counts"
                if relative
                else "expected counts per 2 um bin",
                **stitched,
            },
        )


def prediction_settings(prediction, tile_bins):
    """The ``prediction:`` section with its schema defaults, checked against the tile size."""
    from .config import defaults

    settings = {**defaults("prediction"), **(prediction or {})}
    stride = settings["stride_bins"]
    if not isinstance(stride, int) or not 1 <= stride <= tile_bins:
        raise InputError(
            "prediction.stride_bins", f"must be an integer in [1, {tile_bins}] (tile_bins), got {stride!r}"
        )
    if settings["window"] not in WINDOWS:
        raise InputError("prediction.window", f"unknown window {settings['window']!r} (known: {sorted(WINDOWS)})")
    return settings


#: Blending weights along one window edge of n bins. Hann sampled at bin centres never reaches 0 (every
#: bin keeps a weight) and its shifts by n/2 sum to 1, so half-overlapping windows blend without a ripple.
WINDOWS = {
    "hann": lambda n: np.sin(np.pi * (np.arange(n) + 0.5) / n) ** 2,
    "flat": lambda n: np.ones(n),
}


def extent(root):
    """(array_row, array_col) of the first bin and the (rows, cols) of the box holding every tile."""
    origin = root.bin_origin[:].astype(np.int64)
    lo = origin.min(0)
    return lo, origin.max(0) + root.tile_bins - lo


def window_grid(root, stride):
    """``{window row origin: [window col origins]}``: the windows at `stride` that overlap a tile.

    The grid starts ``tile_bins - stride`` bins before the first tile, so every bin of a tile lies
    in the same number of windows (the border bins too).
    """
    side = root.tile_bins
    lo, size = extent(root)
    kept = {tuple(g) for g in (root.bin_origin[:] // side).tolist()}

    def touches(a, b):
        return any((i, j) in kept for i in range(a // side, (a + side - 1) // side + 1)
                   for j in range(b // side, (b + side - 1) // side + 1))  # fmt: skip

    starts = [np.arange(lo[k] - side + stride, lo[k] + size[k], stride) for k in (0, 1)]
    return {int(a): [int(b) for b in starts[1] if touches(a, b)] for a in starts[0]}


def _window_rates(root, rates, windows, sdata, model_meta, encoder_cfg, tta, batch_size, device):
    """Yield ``(row origin, {col origin: rates [G, side, side] float32})`` window row by window row.

    A window on the tile grid is a tile: its rates are those just predicted. Any other window is cut
    from the H&E exactly as the tile stage cuts a tile, and encoded by the same frozen encoder, its
    tokens rounded to float16 like the feature cache's.
    """
    from .tile import _full_image, tile_image

    model, meta = model_meta
    side, px = root.tile_bins, int(root.images.shape[1])
    tile_at = {tuple(o): t for t, o in enumerate(root.bin_origin[:].tolist())}
    levels, affine = _full_image(sdata, root.sample), np.asarray(root.attrs["bin_to_pixel"], dtype=float)
    encoder = None
    for a, cols in tqdm(windows.items(), desc=f"stitch {root.sample}", unit="row"):
        out = {b: rates[tile_at[a, b]].astype(np.float32) for b in cols if (a, b) in tile_at}
        new = [b for b in cols if (a, b) not in tile_at]
        for start in range(0, len(new), batch_size):
            chunk = new[start : start + batch_size]
            images = torch.from_numpy(np.stack([tile_image(levels, affine, a, b, side, px) for b in chunk]))
            encoder = enc = encoder or _encoder(encoder_cfg, device)
            x = (lambda v, im=images, enc=enc: _encode(enc, im, v, device)) if tta else _encode(enc, images, 0, device)
            pred = predict_rates(model, meta["output"], x, tta=tta).cpu().numpy()
            out.update(zip(chunk, pred, strict=True))
        yield a, out


def _same_encoder(features, encoder_cfg):
    """Refuse to blend windows encoded by another encoder than the one of the tiles' feature cache."""
    if features is None or encoder_cfg is None:
        return
    cached = open_features(features).attrs.get("encoder_config")
    if json.dumps(cached, sort_keys=True) != json.dumps(dict(encoder_cfg), sort_keys=True):
        raise InputError(
            features, f"encoded with {cached}, not the config's encoder {dict(encoder_cfg)}: re-run features"
        )


def _encoder(encoder_cfg, device):
    if encoder_cfg is None:
        raise InputError("encoder", "encoding images needs the encoder config (encoders.<name>)")
    from .encoder import build_encoder

    return build_encoder({k: v for k, v in encoder_cfg.items() if k != "name"}).to(device)


def _encode(encoder, images, view, device, cache_precision=True):
    """Tokens of view `view` of uint8 images [B, H, W, 3]; rounded to float16 as the feature cache stores them."""
    from .encoder import token_grid

    tokens = token_grid(encoder, apply(images.permute(0, 3, 1, 2), view).to(device))
    return tokens.half().float() if cache_precision else tokens


def stitch(tmp, root, rows_of, settings, n_genes):
    """Blend the windows of `rows_of` into the ``stitched`` [n_genes, rows, cols] map of a predictions store.

    Window rows come in ascending order, so once a row of windows is added the `stride` bin rows above
    the next one are final: only one window-high band of the map is held in memory.

    Returns
    -------
    dict
        ``{"stitched": {...}}``, the attributes describing the map.
    """
    side, stride = root.tile_bins, settings["stride_bins"]
    lo, (height, width) = extent(root)
    edge = WINDOWS[settings["window"]](side)
    weight = np.outer(edge, edge).astype(np.float32)
    out = prediction_store.create_stitched(tmp, (n_genes, height, width), side)
    acc = np.zeros((n_genes, side, width + 2 * side), dtype=np.float32)  # cols from lo[1] - side
    wsum = np.zeros(acc.shape[1:], dtype=np.float32)
    n_windows, a = 0, None
    for a, windows in rows_of:
        for b, rate in windows.items():
            j = b - lo[1] + side
            acc[:, :, j : j + side] += weight * rate
            wsum[:, j : j + side] += weight
        n_windows += len(windows)
        _flush(out, acc[:, :stride], wsum[:stride], a - lo[0], side, width)
        acc, wsum = np.roll(acc, -stride, axis=1), np.roll(wsum, -stride, axis=0)
        acc[:, -stride:], wsum[-stride:] = 0, 0
    if a is not None and stride < side:
        _flush(out, acc[:, : side - stride], wsum[: side - stride], a + stride - lo[0], side, width)
    return {
        "stitched": {
            "origin": [int(v) for v in lo],
            "stride_bins": int(stride),
            "window": settings["window"],
            "windows": int(n_windows),
        }
    }


def _flush(out, acc, wsum, row, side, width):
    """Write the finished band of rows starting at map row `row` (clipped to the map); NaN where no window."""
    r0, r1 = max(row, 0), min(row + acc.shape[1], out.shape[1])
    if r1 <= r0:
        return
    band = slice(r0 - row, r1 - row)
    w = wsum[band, side : side + width]
    with np.errstate(invalid="ignore", divide="ignore"):
        value = np.where(w > 0, acc[:, band, side : side + width] / w, np.nan)
    out[:, r0:r1, :] = np.clip(value, 0, FLOAT16_MAX).astype(np.float16)


def tile_map(root, tiles_array, fill=np.nan, dtype=np.float32):
    """Tile-shaped ``[T, ..., side, side]`` values laid out on the map of :func:`extent` (``[..., rows, cols]``)."""
    side = root.tile_bins
    lo, size = extent(root)
    out = np.full((*tiles_array.shape[1:-2], *size), fill, dtype=dtype)
    for t, (r0, c0) in enumerate(root.bin_origin[:].tolist()):
        out[..., r0 - lo[0] : r0 - lo[0] + side, c0 - lo[1] : c0 - lo[1] + side] = tiles_array[t]
    return out


def seams(rate_map, mask, tile_bins, origin):
    """Mean |difference| of the rates of neighbouring in-tissue bins: across tile borders, and inside tiles.

    Parameters
    ----------
    rate_map
        ``[G, rows, cols]`` 2 um rates (tiles laid out with :func:`tile_map`, or the stitched map).
    mask
        ``[rows, cols]`` in-tissue bins.
    tile_bins, origin
        Tile edge, and (array_row, array_col) of the map's first bin (tile borders where
        ``(origin + index) % tile_bins == 0``).

    Returns
    -------
    (float, float)
        Across borders, inside tiles; a seam shows as the first above the second.
    """
    across, inside = [], []
    for axis in (1, 2):
        n = rate_map.shape[axis]
        diff = np.abs(np.diff(rate_map, axis=axis))  # pair (k - 1, k) at index k - 1
        both = np.logical_and(*(np.take(mask, range(s, n - 1 + s), axis=axis - 1) for s in (0, 1)))
        border = ((origin[axis - 1] + np.arange(1, n)) % tile_bins) == 0
        shape = [1, 1, 1]
        shape[axis] = n - 1
        border = np.broadcast_to(border.reshape(shape), diff.shape)
        valid = both[None] & np.isfinite(diff)
        across.append(diff[valid & border])
        inside.append(diff[valid & ~border])
    return float(np.concatenate(across).mean()), float(np.concatenate(inside).mean())


def _token_source(root, features, encoder_cfg, n_tiles, in_dim, device):
    """A function ``(tile indices, view) -> tokens [B, D, h, w]`` on `device`."""
    if features is not None:
        tokens = open_features(features, n_tiles=n_tiles).tokens
        if tokens.shape[2] != in_dim:
            raise InputError(features, f"tokens of width {tokens.shape[2]}, the model was trained on {in_dim}")
        return lambda idx, v: torch.from_numpy(tokens[idx[0] : idx[-1] + 1, v].astype(np.float32)).to(device)
    if encoder_cfg is None:
        raise InputError("features", "give a feature cache or an encoder config")
    encoder, images = _encoder(encoder_cfg, device), root.images

    def encode(idx, v):
        return _encode(encoder, torch.from_numpy(images[idx[0] : idx[-1] + 1]), v, device, cache_precision=False)

    return encode


def write_predictions_sdata(predictions, tiles, out_zarr, sdata=None):
    """Write every model's predictions of a fold as one SpatialData store: tables, rasters and the H&E.

    Parameters
    ----------
    predictions
        ``{model: predictions.zarr}`` of one test sample: one table ``predictions_{model}`` each,
        all annotating the same squares, and its raster ``predictions_{model}_image``.
    tiles
        The tile store they were predicted from (mask, bin origins, ``bin_to_pixel`` affine).
    out_zarr
        ``results/predictions/{fold}.zarr`` (see the module docstring).
    sdata
        The ingested test sample: its H&E goes into the store and its ``location_id`` of every bin
        is kept. None: no image, and ``location_id`` numbers the bins of this store only.
    """
    import geopandas as gpd
    import pandas as pd
    import shapely
    from spatialdata import SpatialData, rasterize_bins
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    root = open_tiles(tiles)
    rows, cols, tile_of = _tissue_bins(root)
    affine = np.asarray(root.attrs["bin_to_pixel"], dtype=float)
    sample = str(root.sample)
    if sdata is None:
        log.warning("no ingested store given: location_id numbers this store's bins, join on array_row/array_col")
        ids = {"location_id": np.arange(len(rows))}
    else:
        ids = _ingested_ids(sdata, rows, cols)
    location_id = ids["location_id"]
    offsets = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, 0.5], [0.5, -0.5], [-0.5, -0.5]])
    corners = np.stack([_to_pixels(affine, rows + dr, cols + dc) for dr, dc in offsets], axis=1)  # [N, 5, 2]
    shapes_name = f"{sample}_predicted_002um"
    gdf = gpd.GeoDataFrame(geometry=shapely.polygons(corners), index=pd.Index(location_id, name="location_id"))
    shapes = ShapesModel.parse(gdf, transformations={sample: Identity()})
    obs = pd.DataFrame(
        {
            "array_row": rows.astype(np.int32),
            "array_col": cols.astype(np.int32),
            "tile": tile_of,
            **ids,
            "region": pd.Categorical([shapes_name] * len(rows)),
        },
        index=[f"s_002um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols)],
    )
    tables = {
        f"predictions_{model}": _table(path, root, (rows, cols, tile_of), obs, _to_pixels(affine, rows, cols))
        for model, path in predictions.items()
    }
    images = {} if sdata is None else _he_image(sdata, sample)
    out = SpatialData(images=images, shapes={shapes_name: shapes}, tables=tables)
    for name, table in tables.items():  # one pixel per 2 um bin, its affine to the sample's pixels from the squares
        raster = rasterize_bins(out, shapes_name, name, col_key="array_col", row_key="array_row")
        # spatialdata 0.7.3 declares the lazy raster uint32 whatever X holds: written as is, rates become 0
        raster.data = raster.data.astype(table.X.dtype)
        out.images[f"{name}_image"] = raster
    with atomic_path(out_zarr) as tmp:
        out.write(str(tmp))
        manifest.write(tmp)


def _tissue_bins(root):
    """(array_row, array_col, tile) of the in-tissue bins of a tile store, tile by tile."""
    mask, origin = root.mask, root.bin_origin[:]
    rows, cols, tile_of = [], [], []
    for t in range(mask.shape[0]):
        i, j = np.nonzero(mask[t])
        rows.append(origin[t, 0] + i)
        cols.append(origin[t, 1] + j)
        tile_of.append(np.full(len(i), t, dtype=np.int32))
    return tuple(np.concatenate(a) for a in (rows, cols, tile_of))


def _table(path, root, bins, obs, centre):
    """One model's table: the stitched map at the bins when the store has one, else its tile rates."""
    import anndata as ad
    import pandas as pd
    from spatialdata.models import TableModel

    store = open_predictions(path)
    if store.rates.shape[0] != root.n_tiles or store.rates.shape[2:] != (root.tile_bins, root.tile_bins):
        raise InputError(path, f"its tiles differ from the tile store's ({root.n_tiles} of {root.tile_bins} bins)")
    rows, cols, tile_of = bins
    if store.stitched is not None:
        r0, c0 = store.attrs["stitched"]["origin"]
        x = _gather(store.stitched, rows - r0, cols - c0)
    else:
        x = _tissue_rates(store, root.mask, tile_of, rows - root.bin_origin[:][tile_of, 0],
                          cols - root.bin_origin[:][tile_of, 1])  # fmt: skip
    adata = ad.AnnData(X=x, obs=obs.copy(), var=pd.DataFrame(index=list(store.genes)), obsm={"spatial": centre})
    return TableModel.parse(adata, region=obs["region"].iloc[0], region_key="region", instance_key="location_id")


def _gather(stitched, i, j):
    """[bins, G] float32 values of a [G, rows, cols] map at (i, j), read one tile-high band at a time."""
    out = np.empty((len(i), stitched.shape[0]), dtype=np.float32)
    band = stitched.chunks[1]
    for r0 in range(0, stitched.shape[1], band):
        sel = np.flatnonzero((i >= r0) & (i < r0 + band))
        if sel.size:
            out[sel] = stitched[:, r0 : r0 + band][:, i[sel] - r0, j[sel]].T.astype(np.float32)
    return out


def _tissue_rates(store, mask, tile_of, i, j):
    """[in-tissue bins, G] float32 tile rates, read one tile at a time."""
    x = np.empty((len(tile_of), store.rates.shape[1]), dtype=np.float32)
    for t in range(mask.shape[0]):
        sel = np.flatnonzero(tile_of == t)
        x[sel] = store.rates[t][:, i[sel], j[sel]].T.astype(np.float32)
    return x


#: Id columns of the ingested 2 um table kept per bin: ``location_id`` (spatialdata-io's) and, when the
#: bins are a labels raster, ``relabeled_location_id`` (the label value), so a join on either pairs the same bins.
INGESTED_IDS = ("location_id", "relabeled_location_id")


def _ingested_ids(sdata_zarr, rows, cols):
    """``{column: ids}`` of the ingested 2 um table at the bins (rows, cols), for the id columns it has."""
    import anndata as ad

    from .tile import _open_table

    obs = _open_table(sdata_zarr)["obs"]
    if "location_id" not in obs:
        raise InputError(sdata_zarr, "the 2 um table has no obs 'location_id'")
    r, c = (np.asarray(ad.io.read_elem(obs[k])).astype(np.int64) for k in ("array_row", "array_col"))
    width = int(max(c.max(), cols.max())) + 1
    key = r * width + c
    order = np.argsort(key)
    want = rows.astype(np.int64) * width + cols
    pos = np.minimum(np.searchsorted(key[order], want), len(key) - 1)
    found = key[order][pos] == want
    if not found.all():
        k = int(np.flatnonzero(~found)[0])
        raise InputError(sdata_zarr, f"no 2 um bin at array_row {rows[k]}, array_col {cols[k]} of the tile store")
    return {k: np.asarray(ad.io.read_elem(obs[k])).astype(np.int64)[order][pos] for k in INGESTED_IDS if k in obs}


def _he_image(sdata_zarr, sample):
    """``{name: element}`` of the ingested full-resolution H&E, read lazily (written chunk by chunk)."""
    import spatialdata

    manifest.verify(sdata_zarr)
    name = f"{sample}_full_image"
    images = spatialdata.read_zarr(str(sdata_zarr), selection=("images",)).images
    if name not in images:
        raise InputError(sdata_zarr, f"no image {name!r} (found {sorted(images)})")
    return {name: images[name]}


def _to_pixels(affine, rows, cols):
    """(array_row, array_col) -> full-resolution (x, y) pixels through the tile store's affine."""
    rc1 = np.stack([rows, cols, np.ones_like(rows)], axis=1).astype(float)
    return rc1 @ affine.T
