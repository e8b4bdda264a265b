"""Predict a test sample with trained weights: its rate store, and the SpatialData overlay of a fold.

``predictions.zarr``: the rate store of one (model, fold), owned by :mod:`sparsitytrap.stores.predictions`.

``results/predictions/{fold}.zarr`` (:func:`write_predictions_sdata`, rule ``overlay``): a
SpatialData object with one table ``predictions_{model}`` per model (AnnData: the in-tissue
2 um bins of the test tiles x genes, X = predicted rates float32; obs ``array_row``,
``array_col``, ``tile``, ``location_id``, ``region``; obs names are Space Ranger barcodes
``s_002um_{row:05d}_{col:05d}-1``; obsm ``spatial`` = full-resolution pixel (x, y) of the bin
centres), all annotating the shapes ``{sample}_predicted_002um`` (2 um squares in
full-resolution pixels), in the coordinate system named after the sample, like the ingested H&E.
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
    weights, tiles, out_zarr, features=None, encoder_cfg=None, tta=False, batch_size=8, device="auto"
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
    """
    dev = resolve_device(device)
    model, meta = load_model(weights, dev)
    root = open_tiles(tiles)
    n_tiles, genes, side = root.n_tiles, root.genes, root.tile_bins
    if genes != meta["genes"]:
        raise InputError(tiles, "genes differ from those the model was trained on")
    tokens_of = _token_source(root, features, encoder_cfg, n_tiles, int(meta["in_dim"]), dev)
    relative = meta["output"] == "score"
    with atomic_path(out_zarr) as tmp:
        rates = prediction_store.create(tmp, (n_tiles, len(genes), side, side))
        for start in tqdm(range(0, n_tiles, batch_size), desc=f"predict {root.attrs.get('sample')}", unit="batch"):
            idx = np.arange(start, min(start + batch_size, n_tiles))
            x = (lambda v, idx=idx: tokens_of(idx, v)) if tta else tokens_of(idx, 0)
            pred = predict_rates(model, meta["output"], x, tta=tta)
            rates[idx[0] : idx[-1] + 1] = np.clip(pred.cpu().numpy(), 0, FLOAT16_MAX).astype(np.float16)
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
            },
        )


def _token_source(root, features, encoder_cfg, n_tiles, in_dim, device):
    """A function ``(tile indices, view) -> tokens [B, D, h, w]`` on `device`."""
    if features is not None:
        tokens = open_features(features, n_tiles=n_tiles).tokens
        if tokens.shape[2] != in_dim:
            raise InputError(features, f"tokens of width {tokens.shape[2]}, the model was trained on {in_dim}")
        return lambda idx, v: torch.from_numpy(tokens[idx[0] : idx[-1] + 1, v].astype(np.float32)).to(device)
    if encoder_cfg is None:
        raise InputError("features", "give a feature cache or an encoder config")
    from .encoder import build_encoder, token_grid

    encoder = build_encoder({k: v for k, v in encoder_cfg.items() if k != "name"}).to(device)
    images = root.images

    def encode(idx, v):
        batch = torch.from_numpy(images[idx[0] : idx[-1] + 1]).permute(0, 3, 1, 2)
        return token_grid(encoder, apply(batch, v).to(device))

    return encode


def write_predictions_sdata(predictions, tiles, out_zarr):
    """Write every model's predictions of the in-tissue bins of a fold as SpatialData tables over 2 um squares.

    Parameters
    ----------
    predictions
        ``{model: predictions.zarr}`` of one test sample: one table ``predictions_{model}`` each,
        all annotating the same squares.
    tiles
        The tile store they were predicted from (mask, bin origins, ``bin_to_pixel`` affine).
    out_zarr
        ``results/predictions/{fold}.zarr`` (see the module docstring).
    """
    import anndata as ad
    import geopandas as gpd
    import pandas as pd
    import shapely
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    root = open_tiles(tiles)
    mask, origin = root.mask, root.bin_origin[:]
    affine = np.asarray(root.attrs["bin_to_pixel"], dtype=float)
    sample = str(root.sample)
    rows, cols, tile_of = [], [], []
    for t in range(mask.shape[0]):
        i, j = np.nonzero(mask[t])
        rows.append(origin[t, 0] + i)
        cols.append(origin[t, 1] + j)
        tile_of.append(np.full(len(i), t, dtype=np.int32))
    rows, cols, tile_of = (np.concatenate(a) for a in (rows, cols, tile_of))

    centre = _to_pixels(affine, rows, cols)
    offsets = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, 0.5], [0.5, -0.5], [-0.5, -0.5]])
    corners = np.stack([_to_pixels(affine, rows + dr, cols + dc) for dr, dc in offsets], axis=1)  # [N, 5, 2]
    shapes_name = f"{sample}_predicted_002um"
    location_id = np.arange(len(rows))
    gdf = gpd.GeoDataFrame(geometry=shapely.polygons(corners), index=pd.Index(location_id, name="location_id"))
    shapes = ShapesModel.parse(gdf, transformations={sample: Identity()})
    obs = pd.DataFrame(
        {
            "array_row": rows.astype(np.int32),
            "array_col": cols.astype(np.int32),
            "tile": tile_of,
            "location_id": location_id,
            "region": pd.Categorical([shapes_name] * len(rows)),
        },
        index=[f"s_002um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols)],
    )
    tables = {}
    for model, path in predictions.items():
        x, genes = _tissue_rates(path, mask)
        adata = ad.AnnData(X=x, obs=obs.copy(), var=pd.DataFrame(index=genes), obsm={"spatial": centre})
        name = f"predictions_{model}"
        tables[name] = TableModel.parse(adata, region=shapes_name, region_key="region", instance_key="location_id")
    sdata = SpatialData(shapes={shapes_name: shapes}, tables=tables)
    with atomic_path(out_zarr) as tmp:
        sdata.write(str(tmp))


def _tissue_rates(predictions_zarr, mask):
    """[in-tissue bins, G] float32 rates of a predictions store, read one tile at a time."""
    store = open_predictions(predictions_zarr)
    pred = store.rates
    if pred.shape[0] != mask.shape[0]:
        raise InputError(predictions_zarr, f"{pred.shape[0]} tiles, the tile store has {mask.shape[0]}")
    x = []
    for t in range(mask.shape[0]):
        i, j = np.nonzero(mask[t])
        x.append(pred[t][:, i, j].T.astype(np.float32))
    return np.concatenate(x), list(store.genes)


def _to_pixels(affine, rows, cols):
    """(array_row, array_col) -> full-resolution (x, y) pixels through the tile store's affine."""
    rc1 = np.stack([rows, cols, np.ones_like(rows)], axis=1).astype(float)
    return rc1 @ affine.T
