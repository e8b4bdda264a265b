"""Training on tiny real data (tile stores + a tiny real timm encoder's feature cache), on the CPU.

The tests call what the workflow's rules call, with the same arguments: ``train`` ->
:func:`sparsitytrap.training.fit`, ``predict`` -> :func:`sparsitytrap.predict.predict`,
``overlay`` -> :func:`sparsitytrap.predict.write_predictions_sdata` (see workflow/rules/train.smk).
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from safetensors.torch import load_file
from test_features import TINY_ENCODER, write_tile_store

from sparsitytrap import config as stconfig
from sparsitytrap.errors import InputError
from sparsitytrap.features import cache_features
from sparsitytrap.predict import load_model, predict, write_predictions_sdata
from sparsitytrap.training import LOG_COLUMNS, checkpoint, fit, lr_factor, split_samples
from sparsitytrap.training.loop import last_quarter_share

TILES = {"P1": 4, "P2": 4, "P3": 3}
BINS = 32  # tiles of 32 x 32 bins keep the CPU tests fast; one test runs the real 128
STABLE = [c for c in LOG_COLUMNS if c != "seconds"]  # everything but wall time


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three samples: tile stores and their feature caches in the `results` layout."""
    results = tmp_path_factory.mktemp("results")
    for i, (sid, n) in enumerate(TILES.items()):
        tiles = write_tile_store(
            results / "tiles" / f"{sid}.zarr", n_tiles=n, n_genes=4, seed=i, sample=sid, grid_cols=4, tile_bins=BINS
        )
        cache_features(tiles, TINY_ENCODER, results / "features" / "tiny" / f"{sid}.zarr", device="cpu")
    return results


def make_config(results, **training):
    t = {
        "epochs": 3,
        "batch_size": 2,
        "grad_accum": 1,
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "warmup_epochs": 1,
        "patience": 5,
        "clip_grad_norm": 1.0,
        "seed": 0,
        "val_fraction": 0.25,
        "val_block_tiles": 2,
        "augment": {"dihedral": True, "color_jitter": False},
        "device": "cpu",
        "precision": "bf16",
        "num_workers": 0,
    }
    t.update(training)
    return {
        "results": str(results),
        "samples": {sid: {"simulate": {"seed": i}} for i, sid in enumerate(TILES)},
        "encoder": "tiny",
        "encoders": {"tiny": {k: v for k, v in TINY_ENCODER.items() if k != "name"}},
        "training": t,
        "decoders": {
            "hist2st": {
                "hidden": 16,
                "n_transformer_layers": 1,
                "n_heads": 2,
                "ff_dim": 32,
                "n_graph_layers": 1,
                "k": 4,
                "dropout": 0.1,
            },
            "img2st": {"width": 16},
        },
        "models": {
            "E": {"decoder": "hist2st", "loss": {"name": "poisson"}},
            "D": {"decoder": "hist2st", "loss": {"name": "mse"}},
            "G": {"decoder": "img2st", "loss": {"name": "mse"}},
            "V7": {
                "decoder": "hist2st",
                "loss": {
                    "name": "multiscale",
                    "base": "poisson",
                    "scales": [1, 2, 4, 8],
                    "balance": "gradnorm",
                    "alpha": 1.5,
                },
            },
            "S": {"decoder": "hist2st", "loss": {"name": "strank_list", "list_scope": "tile"}},
        },
        "folds": "loo",
    }


def sample_paths(config, tiles=None, features=None):
    """``{sample: path}`` of tile stores and feature caches: the workflow's layout, then overrides."""
    results = Path(config["results"])
    layout_tiles = {s: results / "tiles" / f"{s}.zarr" for s in config["samples"]}
    layout_features = {s: results / "features" / config["encoder"] / f"{s}.zarr" for s in config["samples"]}
    return {**layout_tiles, **(tiles or {})}, {**layout_features, **(features or {})}


def run_train(config, model, fold, out, tiles=None, features=None, **kwargs):
    """The `train` rule: its inputs are the fold's training samples only (`train_inputs`)."""
    train_ids, _ = stconfig.fold_samples(config, fold)
    tiles, features = sample_paths(config, tiles, features)
    return fit(
        stconfig.model_config(config, model),
        [tiles[s] for s in train_ids],
        [features[s] for s in train_ids],
        out,
        encoder_cfg=stconfig.encoder_config(config),
        fold=fold,
        **kwargs,
    )


def run_predict(config, model, fold, out, tiles=None, features=None):
    """The `predict` rule: the test sample's tile store and feature cache -> predictions.zarr."""
    _, test = stconfig.fold_samples(config, fold)
    tiles, features = sample_paths(config, tiles, features)
    predict(
        stconfig.model_config(config, model),
        weights=out / "best.safetensors",
        tiles=tiles[test],
        features=features[test],
        out_pred=out / "predictions.zarr",
        encoder_cfg=stconfig.encoder_config(config),
    )
    return out / "predictions.zarr"


def run_overlay(config, fold, preds, out_zarr):
    """The `overlay` rule: every model's predictions of one fold in one SpatialData store."""
    _, test = stconfig.fold_samples(config, fold)
    tiles, _ = sample_paths(config)
    write_predictions_sdata(preds, tiles[test], out_zarr)
    return out_zarr


def read_log(out):
    return pd.read_csv(out / "log.csv")


def assert_same_weights(a, b):
    wa, wb = load_file(str(a / "best.safetensors")), load_file(str(b / "best.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def straight_run(cohort, tmp_path_factory):
    """Model E on fold test-P3 as the workflow runs it: train, then predict, then the overlay."""
    results = tmp_path_factory.mktemp("straight")
    out = results / "models" / "E" / "test-P3"
    config = make_config(cohort)
    result = run_train(config, "E", "test-P3", out)
    written = sorted(p.name for p in out.iterdir())
    pred = run_predict(config, "E", "test-P3", out)
    overlay = run_overlay(config, "test-P3", {"E": pred}, results / "predictions" / "test-P3.zarr")
    return out, {**result, "written": written}, overlay


def test_outputs_and_first_epoch_lr(straight_run):
    out, result, overlay = straight_run
    assert result["finished"] and result["epochs_run"] == 3
    for name in ("checkpoint.pt", "log.csv", "best.safetensors", "metrics_val.json", "predictions.zarr"):
        assert (out / name).exists(), name
    assert overlay.is_dir()
    assert sorted(result["files"]) == result["written"]  # nothing else, no temporaries
    assert sorted(p.name for p in out.iterdir()) == sorted([*result["files"], "predictions.zarr"])
    log = read_log(out)
    assert list(log.columns) == LOG_COLUMNS and list(log.epoch) == [1, 2, 3]
    assert np.isfinite(log[["train_loss", "val_loss", "val_pcc_2um", "val_pcc_8um"]].to_numpy()).all()
    # P1 and P2 train: 4 tiles each, one 2x2 validation block of 2 tiles each -> 2 training
    # tiles each, batches of 2: 2 optimizer steps per epoch, warm-up over the first 2 steps.
    assert log.lr_first[0] == pytest.approx(1e-3 / 2)  # the first step already learns
    assert log.lr_last[0] == pytest.approx(1e-3)
    assert 0 < log.lr_last[2] < log.lr_first[1]  # cosine decay, still > 0 at the end
    metrics = json.loads((out / "metrics_val.json").read_text())
    best = log.val_loss.idxmin()
    assert metrics["best_epoch"] == log.epoch[best]
    assert metrics["val_loss"] == pytest.approx(log.val_loss[best])
    assert metrics["train_tiles"] == 4 and metrics["val_tiles"] == 4
    assert metrics["stop"] == "cap" and not metrics["stopped_early"]
    assert set(metrics["samples"]) == {"P1", "P2"}  # the test sample is not among them


def test_lr_schedule():
    assert lr_factor(0, 4, 20) == pytest.approx(0.25)
    assert lr_factor(3, 4, 20) == pytest.approx(1.0)
    assert lr_factor(4, 4, 20) == pytest.approx(1.0)
    assert 0 < lr_factor(19, 4, 20) < 0.02
    assert lr_factor(0, 0, 20) == pytest.approx(1.0)


def test_same_seed_same_run(cohort, straight_run, tmp_path):
    out, _, _ = straight_run
    again = tmp_path / "E" / "test-P3"
    run_train(make_config(cohort), "E", "test-P3", again)
    run_predict(make_config(cohort), "E", "test-P3", again)
    pd.testing.assert_frame_equal(read_log(out)[STABLE], read_log(again)[STABLE])
    assert_same_weights(out, again)
    a = zarr.open_group(str(out / "predictions.zarr"), mode="r")["rates"][:]
    b = zarr.open_group(str(again / "predictions.zarr"), mode="r")["rates"][:]
    assert np.array_equal(a, b)
    # another seed gives another run (the test can fail)
    other = tmp_path / "seed1"
    run_train(make_config(cohort, seed=1, epochs=1), "E", "test-P3", other)
    assert read_log(out).train_loss[0] != read_log(other).train_loss[0]


class Killed(Exception):
    pass


def test_resume_after_a_kill_gives_identical_results(cohort, straight_run, tmp_path):
    out, _, _ = straight_run
    resumed = tmp_path / "E" / "test-P3"

    def kill_after_epoch_1(epoch, row):
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        run_train(make_config(cohort), "E", "test-P3", resumed, on_epoch_end=kill_after_epoch_1)
    assert len(read_log(resumed)) == 1 and not (resumed / "best.safetensors").exists()
    # a second interruption, by the run limit, then the end
    partial = run_train(make_config(cohort), "E", "test-P3", resumed, max_epochs_this_run=1)
    assert not partial["finished"] and len(read_log(resumed)) == 2
    run_train(make_config(cohort), "E", "test-P3", resumed)
    pd.testing.assert_frame_equal(read_log(out)[STABLE], read_log(resumed)[STABLE])
    assert_same_weights(out, resumed)
    ck = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert ck["state"]["epoch"] == 3


@pytest.mark.parametrize("model", ["V7", "P"])
def test_resume_restores_gradnorm_and_loss_generators(cohort, tmp_path, model):
    # V7: GradNorm weights, initial losses and their Adam state; P: STRank pair partners' generator
    config = make_config(cohort, epochs=2)
    config["models"]["P"] = {"decoder": "hist2st", "loss": {"name": "strank_pair"}}
    run_train(config, model, "test-P3", tmp_path / "straight")
    run_train(config, model, "test-P3", tmp_path / "resumed", max_epochs_this_run=1)
    run_train(config, model, "test-P3", tmp_path / "resumed")
    pd.testing.assert_frame_equal(read_log(tmp_path / "straight")[STABLE], read_log(tmp_path / "resumed")[STABLE])
    assert_same_weights(tmp_path / "straight", tmp_path / "resumed")
    if model == "V7":
        ck = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
        weights = ck["loss"]["_extra_state"]["weights"]
        assert weights.sum() == pytest.approx(4.0) and not torch.allclose(weights, torch.ones(4))  # they moved


def test_checkpoint_of_another_config_is_not_resumed(cohort, tmp_path):
    out = tmp_path / "run"
    run_train(make_config(cohort, epochs=1), "E", "test-P3", out, max_epochs_this_run=1)
    result = run_train(make_config(cohort, epochs=2, lr=5e-4), "E", "test-P3", out)
    assert result["epochs_run"] == 2 and read_log(out).lr_first[0] == pytest.approx(5e-4 / 2)


def test_checkpoint_of_other_code_is_not_resumed(cohort, tmp_path, monkeypatch):
    # a forced rerun after an edit of the package trains afresh; the same code resumes
    out = tmp_path / "run"
    config = make_config(cohort, epochs=2)
    run_train(config, "E", "test-P3", out, max_epochs_this_run=1)
    monkeypatch.setattr(checkpoint, "code_digest", lambda: "edited")
    run_train(config, "E", "test-P3", out, max_epochs_this_run=1)
    assert len(read_log(out)) == 1  # started afresh: one epoch, not the second
    (out / "log.csv").write_text("stale")
    run_train(config, "E", "test-P3", out)
    assert list(read_log(out).epoch) == [1, 2]  # resumed after epoch 1: the log rows come from the checkpoint


def test_code_digest_reads_every_module(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    digest = checkpoint.code_digest.__wrapped__
    before = digest(tmp_path)
    (tmp_path / "notes.txt").write_text("not code")
    assert digest(tmp_path) == before
    (tmp_path / "sub" / "b.py").write_text("y = 3\n")
    assert digest(tmp_path) != before
    assert len(checkpoint.code_digest()) == 16  # the package's own


def test_test_sample_is_never_read(cohort, tmp_path):
    missing = {"P3": tmp_path / "nowhere" / "P3.zarr"}
    out = tmp_path / "run"
    config = make_config(cohort, epochs=1)
    # training finishes without the test sample; only the prediction step asks for it
    run_train(config, "E", "test-P3", out, tiles=missing, features=missing)
    assert (out / "best.safetensors").exists() and (out / "metrics_val.json").exists()
    with pytest.raises(InputError, match="nowhere"):
        run_predict(config, "E", "test-P3", out, tiles=missing, features=missing)
    train_set, val_set, _ = split_samples(
        [cohort / "tiles" / "P1.zarr"], [cohort / "features" / "tiny" / "P1.zarr"], 0.25, 2, 0
    )
    assert all("P3" not in p for p in train_set.paths + val_set.paths)


def test_early_stopping_stops(cohort, tmp_path):
    # lr 0: the validation loss never improves after epoch 1, patience 2 -> 3 epochs of 10
    out = tmp_path / "run"
    result = run_train(make_config(cohort, epochs=10, patience=2, lr=0.0), "E", "test-P3", out)
    assert result["stopped_early"] and result["epochs_run"] == 3 and result["best_epoch"] == 1
    assert result["stop"] == "patience"
    assert list(read_log(out).best) == [True, False, False]


def test_last_quarter_share_reads_the_running_best():
    # 4 epochs: the last quarter is epoch 4; a rise counts as no decrease
    assert last_quarter_share([4.0, 3.0, 2.0, 1.9]) == pytest.approx(0.1 / 2.1)
    assert last_quarter_share([4.0, 3.0, 2.0, 2.5]) == 0.0
    # 8 epochs: the last quarter is epochs 7-8, measured from the best up to epoch 6
    assert last_quarter_share([8.0, 6.0, 5.0, 4.0, 3.5, 3.0, 2.5, 2.0]) == pytest.approx(1.0 / 6.0)
    assert np.isnan(last_quarter_share([1.0, 2.0, 3.0, 4.0])) and np.isnan(last_quarter_share([3.0, 2.0, 1.0]))


def test_plateau_rule_stops_at_the_first_flat_quarter(cohort, tmp_path):
    # patience as long as the cap: only the plateau rule can end the run before epoch 12
    out = tmp_path / "run"
    config = make_config(cohort, epochs=12, patience=12, plateau_share=0.3, plateau_min_epochs=5)
    result = run_train(config, "E", "test-P3", out)
    losses = list(read_log(out).val_loss)
    shares = [last_quarter_share(losses[:n]) for n in range(5, len(losses) + 1)]
    assert result["stop"] == "plateau" and result["stopped_early"] and 5 <= len(losses) < 12
    assert shares[-1] < 0.3 and not any(s < 0.3 for s in shares[:-1])  # the first epoch it held
    assert result["last_quarter_share"] == pytest.approx(shares[-1])


def test_predictions_follow_the_tile_store(straight_run, cohort):
    out, _, _ = straight_run
    pred = zarr.open_group(str(out / "predictions.zarr"), mode="r")
    rates = pred["rates"]
    tiles = zarr.open_group(str(cohort / "tiles" / "P3.zarr"), mode="r")
    assert rates.shape == (3, 4, BINS, BINS) and rates.dtype == np.float16 and rates.chunks == (1, 4, BINS, BINS)
    assert (
        pred.attrs["genes"] == tiles.attrs["genes"] and pred.attrs["fold"] == "test-P3" and pred.attrs["sample"] == "P3"
    )
    model, meta = load_model(out / "best.safetensors")
    tokens = zarr.open_group(str(cohort / "features" / "tiny" / "P3.zarr"), mode="r")["tokens"]
    with torch.no_grad():
        for t in (2, 0):  # tile t of the store, identity view
            direct = torch.exp(model(torch.from_numpy(tokens[t : t + 1, 0].astype(np.float32)))).numpy()[0]
            np.testing.assert_allclose(rates[t].astype(np.float32), direct, rtol=2e-3, atol=1e-5)


def test_predictions_with_tta_average_the_eight_views(straight_run, cohort, tmp_path):
    from sparsitytrap.predict import write_predictions
    from sparsitytrap.views import inverse

    out, _, _ = straight_run
    feats = cohort / "features" / "tiny" / "P3.zarr"
    write_predictions(
        out / "best.safetensors",
        cohort / "tiles" / "P3.zarr",
        tmp_path / "tta.zarr",
        features=feats,
        tta=True,
        device="cpu",
    )
    pred = zarr.open_group(str(tmp_path / "tta.zarr"), mode="r")
    assert pred.attrs["tta"] is True
    model, _ = load_model(out / "best.safetensors")
    tokens = zarr.open_group(str(feats), mode="r")["tokens"]
    with torch.no_grad():
        views = [inverse(torch.exp(model(torch.from_numpy(tokens[1:2, v].astype(np.float32)))), v) for v in range(8)]
    expected = torch.stack(views).mean(0)[0].numpy()
    np.testing.assert_allclose(pred["rates"][1].astype(np.float32), expected, rtol=2e-3, atol=1e-5)


def test_predictions_sdata_overlays_the_bins(straight_run, cohort):
    import spatialdata

    out, _, overlay = straight_run
    sdata = spatialdata.read_zarr(overlay)
    table = sdata.tables["predictions_E"]
    tiles = zarr.open_group(str(cohort / "tiles" / "P3.zarr"), mode="r")
    mask, origin = tiles["mask"][:], tiles["bin_origin"][:]
    rates = zarr.open_group(str(out / "predictions.zarr"), mode="r")["rates"][:]
    assert table.shape == (mask.sum(), 4) and list(table.var_names) == tiles.attrs["genes"]
    row = table.obs.iloc[-1]
    t, i, j = (
        int(row.tile),
        int(row.array_row) - origin[int(row.tile), 0],
        int(row.array_col) - origin[int(row.tile), 1],
    )
    assert mask[t, i, j]
    np.testing.assert_array_equal(table.X[-1], rates[t, :, i, j].astype(np.float32))
    x, y = table.obsm["spatial"][-1]
    assert (x, y) == (row.array_col * 4.0 + 2.0, row.array_row * 4.0 + 2.0)  # the store's bin_to_pixel
    shapes = sdata.shapes["P3_predicted_002um"]
    assert len(shapes) == len(table) and "P3" in spatialdata.transformations.get_transformation(shapes, get_all=True)
    assert shapes.geometry.iloc[-1].area == pytest.approx(16.0)  # a 2 um square is 4 x 4 px here
    assert shapes.geometry.iloc[-1].centroid.x == pytest.approx(x)


def test_one_overlay_holds_every_model_of_a_fold(straight_run, cohort, tmp_path):
    import spatialdata

    out, _, overlay = straight_run
    pred = out / "predictions.zarr"
    run_overlay(make_config(cohort), "test-P3", {"m1": pred, "m2": pred}, tmp_path / "fold.zarr")
    sdata = spatialdata.read_zarr(tmp_path / "fold.zarr")
    single = spatialdata.read_zarr(overlay).tables["predictions_E"]
    assert sorted(sdata.tables) == ["predictions_m1", "predictions_m2"]
    for table in sdata.tables.values():
        np.testing.assert_array_equal(table.X, single.X)
        assert list(table.obs_names) == list(single.obs_names)


@pytest.fixture(scope="module")
def two_tiles(tmp_path_factory):
    """P1 with two tiles of the real size, 128 x 128 bins, and P2 (one tile) to predict."""
    root = tmp_path_factory.mktemp("two_tiles")
    tiles, features = {}, {}
    for i, (sid, n) in enumerate({"P1": 2, "P2": 1}.items()):
        tiles[sid] = write_tile_store(root / f"{sid}.zarr", n_tiles=n, n_genes=4, seed=5 + i, sample=sid, grid_cols=2)
        features[sid] = root / f"{sid}_features.zarr"
        cache_features(tiles[sid], TINY_ENCODER, features[sid], device="cpu")
    return tiles, features


@pytest.mark.parametrize("model", ["E", "D", "G", "V7", "S"])
def test_each_loss_family_trains(cohort, two_tiles, tmp_path, model):
    # two tiles of P1 (one trains, one validates) for 2 epochs; test sample P2
    config = make_config(cohort, epochs=2)
    config["samples"] = {"P1": {}, "P2": {}}
    out = tmp_path / model
    result = run_train(config, model, "test-P2", out, tiles=two_tiles[0], features=two_tiles[1])
    assert result["epochs_run"] == 2 and result["train_tiles"] == 1 and result["val_tiles"] == 1
    log = read_log(out)
    assert np.isfinite(log[["train_loss", "val_loss"]].to_numpy()).all()
    pred = zarr.open_group(str(run_predict(config, model, "test-P2", out, *two_tiles)), mode="r")
    rates = pred["rates"][:]
    assert rates.shape == (1, 4, 128, 128) and np.isfinite(rates).all() and (rates >= 0).all()
    assert pred.attrs["relative"] == (model == "S")


def test_color_jitter_encodes_on_the_fly(cohort, tmp_path):
    config = make_config(cohort, epochs=1, augment={"dihedral": True, "color_jitter": True})
    out = tmp_path / "run"
    # no feature cache of the training samples: the frozen encoder runs in the loop
    nowhere = {sid: tmp_path / "no_features" / f"{sid}.zarr" for sid in ("P1", "P2")}
    result = run_train(config, "E", "test-P3", out, features=nowhere)
    assert result["finished"] and np.isfinite(read_log(out).train_loss).all()
    again = tmp_path / "again"
    run_train(config, "E", "test-P3", again, features=nowhere)
    pd.testing.assert_frame_equal(read_log(out)[STABLE], read_log(again)[STABLE])
    # the predict rule reads the test sample's cache (no jitter at prediction): the same rates
    # as encoding its images on the fly, up to the cache's float16 tokens
    cached = zarr.open_group(str(run_predict(config, "E", "test-P3", out)), mode="r")["rates"][:]
    tiles, _ = sample_paths(config)
    predict(
        stconfig.model_config(config, "E"),
        weights=out / "best.safetensors",
        tiles=tiles["P3"],
        features=None,
        out_pred=tmp_path / "on_the_fly.zarr",
        encoder_cfg=stconfig.encoder_config(config),
    )
    on_the_fly = zarr.open_group(str(tmp_path / "on_the_fly.zarr"), mode="r")["rates"][:]
    np.testing.assert_allclose(on_the_fly.astype(np.float32), cached.astype(np.float32), rtol=1e-2, atol=1e-4)


def test_bad_inputs(cohort, tmp_path):
    config = make_config(cohort)
    with pytest.raises(InputError, match="fold"):
        run_train(config, "E", "test-P9", tmp_path / "x")
    with pytest.raises(InputError, match="P1.zarr"):
        run_train(config, "E", "test-P3", tmp_path / "y", features={"P1": tmp_path / "P1.zarr"})
    spec, tiles = stconfig.model_config(config, "E"), [cohort / "tiles" / "P1.zarr"]
    with pytest.raises(InputError, match="features: 0 feature caches for 1 tile stores"):
        fit(spec, tiles, [], tmp_path / "z")
    with pytest.raises(InputError, match="tiles: no training samples"):
        fit(spec, [], [], tmp_path / "z")


def test_train_um_8_is_the_loss_of_the_pooled_maps():
    from sparsitytrap.losses import build_loss
    from sparsitytrap.training.job import at_train_um

    rate, g = 0.3, torch.Generator().manual_seed(0)
    y = torch.poisson(torch.full((2, 3, 16, 16), rate), generator=g)
    mask = torch.ones(2, 16, 16, dtype=torch.bool)
    mask[0, :, :4] = False  # a column of 8 um bins outside the tissue
    mask[1, 5, 6] = False  # one 2 um bin: its 8 um bin is tissue with 15 bins of it
    out = torch.full_like(y, np.log(rate))  # a constant-rate field
    poisson = build_loss({"name": "poisson"})
    assert at_train_um(poisson, {"train_um": 2}) is poisson
    pooled = at_train_um(poisson, {"train_um": 8})
    # by hand: 8 um = 4 x 4 bins of 2 um; rates and counts summed over the tissue bins of each
    m = mask.numpy()[:, None].astype(float)
    r = (rate * m).reshape(2, 1, 4, 4, 4, 4).sum((3, 5))
    counts = (y.numpy() * m).reshape(2, 3, 4, 4, 4, 4).sum((3, 5))
    tissue = np.broadcast_to(r > 0, counts.shape)
    r = np.broadcast_to(r, counts.shape)[tissue]
    counts = counts[tissue]
    floor = counts - np.where(counts > 0, counts * np.log(np.maximum(counts, 1)), 0)  # perfect prediction
    expected = np.mean(r - counts * np.log(r)) - np.mean(floor)
    assert float(pooled(out, y, mask)) == pytest.approx(expected, rel=1e-5)
    assert float(pooled(out, y, mask)) != pytest.approx(float(poisson(out, y, mask)) - float(poisson.floor(y, mask)))


def test_train_um_is_checked_at_plan_time(monkeypatch):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    base = stconfig.read_yaml(root / "config.yaml")
    ok = json.loads(json.dumps(base))
    ok["models"]["E_hist2st_poisson"]["training"] = {"train_um": 16}
    assert stconfig.model_config(stconfig.validate(ok), "E_hist2st_poisson")["training"]["train_um"] == 16
    odd = json.loads(json.dumps(ok))
    odd["tiles"]["tile_bins"] = 100  # 16 um = 8 bins of 2 um, and 8 does not divide 100
    with pytest.raises(InputError, match=r"models\.E_hist2st_poisson\.training\.train_um: 16 um bins"):
        stconfig.validate(odd)
    shared = json.loads(json.dumps(base))
    shared["tiles"]["tile_bins"], shared["training"]["train_um"] = 36, 16
    with pytest.raises(InputError, match=r"config.yaml: training\.train_um"):
        stconfig.validate(shared)


def test_a_fold_trains_on_its_own_genes_in_its_order(cohort, tmp_path):
    """Leak-free selection: the tile stores hold the union of the folds' genes; a fold trains on its own."""
    from sparsitytrap.stores.tiles import open_tiles

    config = make_config(cohort, epochs=1)
    store = open_tiles(cohort / "tiles" / "P1.zarr")
    chosen = [store.genes[3], store.genes[1]]
    tiles = [cohort / "tiles" / s for s in ("P1.zarr", "P2.zarr")]
    feats = [cohort / "features" / "tiny" / s for s in ("P1.zarr", "P2.zarr")]
    train_set, _, info = split_samples(tiles, feats, 0.25, 2, 0, genes=chosen)
    assert info["genes"] == chosen
    slide, t = train_set.items[0]  # items run in sample order: the first is a tile of P1
    assert slide == 0
    np.testing.assert_array_equal(train_set[(0, 0)]["target"].numpy(), store.counts[t][[3, 1]])
    result = fit({**stconfig.model_config(config, "E"), "genes": chosen}, tiles, feats, tmp_path / "run")
    assert result["finished"]
    assert json.loads(load_file_meta(tmp_path / "run" / "best.safetensors")["genes"]) == chosen
    with pytest.raises(InputError, match="fold's genes are not in the tile store, e.g. 'NOPE'"):
        split_samples(tiles, feats, 0.25, 2, 0, genes=["NOPE"])


def load_file_meta(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_decoder_input_is_standardised_with_the_training_tokens(straight_run, cohort):
    out, _, _ = straight_run
    weights = load_file(str(out / "best.safetensors"))
    tiles = [cohort / "tiles" / f"{s}.zarr" for s in ("P1", "P2")]
    features = [cohort / "features" / "tiny" / f"{s}.zarr" for s in ("P1", "P2")]
    train_set, val_set, _ = split_samples(tiles, features, 0.25, 2, 0)  # make_config's split

    def tokens(dataset):  # [D, tokens of every tile], identity view
        grids = [dataset[(i, 0)]["x"].numpy() for i in range(len(dataset))]
        return np.concatenate([g.reshape(g.shape[0], -1) for g in grids], axis=1)

    train = tokens(train_set).astype(np.float64)
    np.testing.assert_allclose(weights["token_norm.mean"].numpy(), train.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weights["token_norm.std"].numpy(), train.std(1), rtol=1e-4, atol=1e-6)
    with_val = np.concatenate([train, tokens(val_set)], axis=1)  # validation tiles would move the statistics
    assert not np.allclose(weights["token_norm.mean"].numpy(), with_val.mean(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model,how", [("E", "gene_mean"), ("D", "gene_mean"), ("E", "constant")])
def test_each_gene_starts_at_its_training_mean(cohort, tmp_path, model, how):
    from sparsitytrap.training.job import _build

    config = make_config(cohort, head_start=how)
    tiles = [cohort / "tiles" / f"{s}.zarr" for s in ("P1", "P2")]
    features = [cohort / "features" / "tiny" / f"{s}.zarr" for s in ("P1", "P2")]
    job = _build(stconfig.model_config(config, model), tiles, features, tmp_path, None, "test-P3", torch.device("cpu"))
    head = job.trainer.model.head
    # the training tiles' mean count per in-tissue bin, straight from the stores (never validation tiles)
    counts = masks = 0.0
    train_set, _, _ = split_samples(tiles, features, 0.25, 2, 0)  # make_config's split
    for _, path, _, idx in train_set.sources:
        root = zarr.open_group(str(path), mode="r")
        m = root["mask"][:][idx].astype(np.float64)[:, None]
        counts, masks = counts + (root["counts"][:][idx] * m).sum((0, 2, 3)), masks + m.sum()
    mean = counts / masks
    bias = head.conv.bias.detach().double().numpy()
    if how == "constant":
        assert np.all(bias == -3.0)
    elif head.output == "log_rate":
        np.testing.assert_allclose(np.exp(bias), np.maximum(mean, 1e-4), rtol=1e-5)
    else:  # softplus rate (MSE)
        np.testing.assert_allclose(np.log1p(np.exp(bias)), np.maximum(mean, 1e-4), rtol=1e-5)


def test_head_start_is_checked(cohort, tmp_path):
    from sparsitytrap.training.job import _build

    config = make_config(cohort, head_start="median")
    tiles = [cohort / "tiles" / f"{s}.zarr" for s in ("P1", "P2")]
    features = [cohort / "features" / "tiny" / f"{s}.zarr" for s in ("P1", "P2")]
    with pytest.raises(InputError, match="training.head_start: 'median' is not one of gene_mean, constant"):
        _build(stconfig.model_config(config, "E"), tiles, features, tmp_path, None, "test-P3", torch.device("cpu"))
