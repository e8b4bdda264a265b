"""A store that lost or changed a chunk after it was written is refused, naming the store and the array."""

import numpy as np
import pytest
from test_evaluate import smooth_rates, write_pred, write_tiles
from test_features import write_tile_store

from sparsitytrap.errors import InputError
from sparsitytrap.evaluate import evaluate
from sparsitytrap.stores import manifest
from sparsitytrap.stores.features import open_features
from sparsitytrap.stores.predictions import open_predictions
from sparsitytrap.stores.tiles import open_tiles


def first_chunk(store, array):
    return sorted(p for p in (store / array / "c").rglob("*") if p.is_file())[0]


def damage(store, array, how):
    chunk = first_chunk(store, array)
    if how == "deleted":
        chunk.unlink()
    elif how == "truncated":
        chunk.write_bytes(chunk.read_bytes()[:-7])
    else:  # same size, other bytes
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))


@pytest.fixture
def evaluation(tmp_path):
    rng = np.random.default_rng(0)
    grid = np.array([(r, c) for r in range(2) for c in range(2)])
    rates = smooth_rates(rng, len(grid))
    tiles = write_tiles(tmp_path / "tiles.zarr", rng.poisson(rates), np.ones((len(grid), 32, 32), bool), grid)
    return tiles, write_pred(tmp_path / "pred.zarr", rates)


@pytest.mark.parametrize("how", ["deleted", "truncated", "altered"])
@pytest.mark.parametrize("array", ["counts", "mask"])
def test_a_damaged_tile_store_stops_the_evaluation(evaluation, tmp_path, how, array):
    tiles, pred = evaluation
    damage(tiles, array, how)
    with pytest.raises(InputError, match=rf"tiles.zarr \(array '{array}'\)"):
        evaluate(pred, tiles, tmp_path / "eval", bootstrap=0)
    assert not (tmp_path / "eval" / "summary.json").exists()


@pytest.mark.parametrize("how", ["deleted", "truncated", "altered"])
def test_every_store_kind_is_checked(evaluation, tmp_path, how):
    from sparsitytrap.stores import features as feature_store

    _, pred = evaluation
    damage(pred, "rates", how)
    with pytest.raises(InputError, match=r"pred.zarr \(array 'rates'\)"):
        open_predictions(pred)
    feats = tmp_path / "features.zarr"
    tokens = feature_store.create(feats, 2, (8, 4, 2, 2))
    tokens[:] = np.ones(tokens.shape, np.float16)
    feature_store.finish(feats, {"name": "demo"}, tokens, "S")
    open_features(feats)
    manifest._VERIFIED.clear()  # a store is checked once per process: a new job sees the damage
    damage(feats, "tokens", how)
    with pytest.raises(InputError, match=r"features.zarr \(array 'tokens'\)"):
        open_features(feats)


def test_an_intact_store_passes_and_one_without_manifest_is_refused(tmp_path):
    store = write_tile_store(tmp_path / "t.zarr")
    assert open_tiles(store).n_tiles == 3
    (store / manifest.NAME).unlink()
    with pytest.raises(InputError, match="no manifest.json"):
        open_tiles(store)
    manifest.write(store)
    (store / "counts" / "c" / "9").mkdir()
    (store / "counts" / "c" / "9" / "0").write_bytes(b"x")
    with pytest.raises(InputError, match="not in the manifest"):
        open_tiles(store)
