"""One (model, fold) training job: decoder on frozen-encoder tokens, validated on held-out blocks.

Files written in ``out_dir`` (all atomically):

``checkpoint.pt``
    Rewritten after every epoch: model, optimizer, scheduler, loss (and GradNorm) state, RNG
    states, early-stopping state, best weights so far and the log rows. Read with
    ``weights_only=True``. A job killed mid-training and started again continues from its last
    completed epoch and ends with the same numbers (on the CPU) as an uninterrupted run.
``log.csv``
    One row per epoch: epoch, train_loss, val_loss, val_pcc_2um, val_pcc_8um, lr_first,
    lr_last, best, seconds.
``best.safetensors``
    Weights of the epoch with the lowest validation loss, with the metadata needed to rebuild
    the decoder (see :func:`sparsitytrap.predict.load_model`).
``metrics_val.json``
    Best epoch and its validation metrics, epochs run, early stop, the training/validation
    tiles. Written last by :func:`fit`: its presence marks a finished training.
``predictions.zarr``, ``predictions_sdata.zarr``
    Written by :func:`train` after :func:`fit` (see :mod:`sparsitytrap.predict`).

The test patient is never opened here: :func:`fit` receives only the training samples' paths;
:func:`train` hands the test sample to :mod:`sparsitytrap.predict` once training is over.
"""

import contextlib
import json
import logging
import math
import random
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import zarr
from tqdm.auto import tqdm

from . import config as stconfig
from .decoders import build_decoder, count_parameters, to_rate
from .errors import InputError
from .device import resolve_device
from .stores.features import open_features
from .stores.tiles import open_tiles
from .views import DIHEDRAL, apply
from .folds import fold_split, validation_split
from .io import atomic_path, write_csv, write_json
from .losses import build_loss
from .bins import pool_masked
from .metrics import PearsonAccumulator

log = logging.getLogger(__name__)

LOG_COLUMNS = ["epoch", "train_loss", "val_loss", "val_pcc_2um", "val_pcc_8um", "lr_first", "lr_last", "best", "seconds"]


# ---------------------------------------------------------------------------------------------
# entry points


def train(config, model_name, fold, out_dir, resume=True, tiles=None, features=None, max_epochs_this_run=None, on_epoch_end=None):
    """Train one model on one fold, then predict the fold's test sample.

    Parameters
    ----------
    config
        The validated config (``sparsitytrap.config.load``).
    model_name
        A key of ``config["models"]``.
    fold
        Fold name, ``test-{sample}``.
    out_dir
        ``results/models/{model}/{fold}``; see the module docstring for its files.
    resume
        Continue from ``out_dir/checkpoint.pt`` when it belongs to the same job.
    tiles, features
        Optional ``{sample: path}`` overrides of ``{results}/tiles/{sample}.zarr`` and
        ``{results}/features/{encoder}/{sample}.zarr``.
    max_epochs_this_run
        Stop (as if killed) after this many epochs of this call; a later call resumes.
    on_epoch_end
        Optional ``callback(epoch, row)`` after each epoch's checkpoint (progress, tests).

    Returns
    -------
    dict
        ``{"finished": bool, "out_dir": str, "files": [names written], **metrics_val}``.
    """
    from .predict import predict

    spec = stconfig.model_config(config, model_name)
    train_ids, test_id = fold_split(list(config["samples"]), config.get("folds", "loo"), fold)
    tiles, features = _sample_paths(config, tiles, features)
    enc_cfg = stconfig.encoder_config(config)
    result = fit(
        spec,
        [tiles[s] for s in train_ids],
        [features[s] for s in train_ids],
        out_dir,
        encoder_cfg=enc_cfg,
        fold=fold,
        resume=resume,
        max_epochs_this_run=max_epochs_this_run,
        on_epoch_end=on_epoch_end,
    )
    if not result["finished"]:
        return result
    out_dir = Path(out_dir)
    predict(
        spec,
        weights=out_dir / "best.safetensors",
        tiles=tiles[test_id],
        features=None if _on_the_fly(spec) else features[test_id],
        out_pred=out_dir / "predictions.zarr",
        out_sdata=out_dir / "predictions_sdata.zarr",
        encoder_cfg=enc_cfg,
    )
    result["files"] += ["predictions.zarr", "predictions_sdata.zarr"]
    return result


def _sample_paths(config, tiles, features):
    """``{sample: path}`` of tile stores and feature caches: the results layout, then overrides."""
    results = Path(config.get("results", "results"))
    default_tiles = {s: results / "tiles" / f"{s}.zarr" for s in config["samples"]}
    default_features = {s: results / "features" / config["encoder"] / f"{s}.zarr" for s in config["samples"]}
    tiles = {s: Path(p) for s, p in {**default_tiles, **(tiles or {})}.items()}
    features = {s: Path(p) for s, p in {**default_features, **(features or {})}.items()}
    return tiles, features


def _on_the_fly(spec):
    """Colour jitter changes the image, so its tokens cannot come from the cache."""
    return bool(spec["training"].get("augment", {}).get("color_jitter", False))


def fit(model_cfg, tiles, features, out_dir, encoder_cfg=None, fold=None, resume=True, max_epochs_this_run=None, on_epoch_end=None):
    """Train a decoder on the training samples' tiles; validate on held-out blocks of them.

    Parameters
    ----------
    model_cfg
        A resolved model (``sparsitytrap.config.model_config``): ``name``, ``decoder``,
        ``decoder_kwargs``, ``loss``, ``training``.
    tiles
        Tile stores of the training samples (never the test sample's).
    features
        Their feature caches, same order (ignored, may be None, with colour jitter: tokens are
        then computed on the fly by the frozen encoder of `encoder_cfg`).
    out_dir
        Output folder: checkpoint.pt, log.csv, best.safetensors, metrics_val.json.
    encoder_cfg
        Encoder settings (``sparsitytrap.config.encoder_config``); needed for colour jitter.
    fold
        Fold name, recorded in the outputs.
    resume, max_epochs_this_run, on_epoch_end
        See :func:`train`.

    Returns
    -------
    dict
        ``finished`` (False when stopped by `max_epochs_this_run`), ``files`` and, when
        finished, the content of metrics_val.json.
    """
    t = model_cfg["training"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(t.get("device", "auto"))
    with _determinism(device):
        job = _Job(model_cfg, tiles, features, out_dir, encoder_cfg, fold, device)
        if resume:
            job.load_checkpoint()
        finished = job.run(max_epochs_this_run, on_epoch_end)
        if not finished:
            return {"finished": False, "out_dir": str(out_dir), "files": ["checkpoint.pt", "log.csv"]}
        metrics = job.finish()
    files = ["checkpoint.pt", "log.csv", "best.safetensors", "metrics_val.json"]
    return {"finished": True, "out_dir": str(out_dir), "files": files, **metrics}


# ---------------------------------------------------------------------------------------------
# schedule, seeds, determinism


def lr_factor(step, warmup_steps, total_steps):
    """Linear warm-up then cosine, per optimizer step; never 0 at the first step.

    Warm-up starts at ``1 / warmup_steps`` of the base rate (the seeds started at 0, wasting
    their first epoch); the cosine ends just above 0 at the last step.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def seed_everything(seed):
    """Seed python, numpy and torch (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _determinism(device):
    """Deterministic algorithms on the CPU for the duration of a job (restored afterwards)."""
    before = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
        # filling every new buffer with NaN costs time and changes no result of correct code
        torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def _rng_state(generators):
    """All RNG states as tensors, ints and lists, so the checkpoint loads with weights_only."""
    key, mt, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"key": key, "state": torch.from_numpy(mt.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "generators": [g.get_state() for g in generators],
    }


def _set_rng_state(state, generators):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["key"], n["state"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    for g, g_state in zip(generators, state["generators"], strict=True):
        g.set_state(g_state)


# ---------------------------------------------------------------------------------------------
# data


class TileDataset(torch.utils.data.Dataset):
    """Training or validation tiles of the training samples, read tile by tile from zarr.

    An item key is ``(i, v)``: tile i of this set under dihedral view v. Tokens come from the
    cache (view v precomputed) or, for on-the-fly encoding, the image is transformed by v; the
    target and mask are transformed by the same v, so the augmentation is exact.

    Parameters
    ----------
    sources
        ``[(slide index, tile store path, feature cache path or None, tile indices)]``.
    """

    def __init__(self, sources):
        self.sources = sources
        self.items = [(s, int(t)) for s, (_, _, _, idx) in enumerate(sources) for t in idx]
        self._open = {}

    @property
    def paths(self):
        """Every store this dataset reads (for checks that the test sample is not among them)."""
        return [str(p) for _, tiles, feats, _ in self.sources for p in (tiles, feats) if p is not None]

    def __len__(self):
        return len(self.items)

    def _stores(self, s):
        # opened lazily, once per process (DataLoader workers open their own)
        if s not in self._open:
            _, tiles, feats, _ = self.sources[s]
            root = open_tiles(tiles)
            tokens = open_features(feats).tokens if feats is not None else None
            self._open[s] = (root, tokens)
        return self._open[s]

    def __getitem__(self, key):
        i, v = key
        s, t = self.items[i]
        root, tokens = self._stores(s)
        item = {
            "counts": torch.from_numpy(apply(root.counts[t].astype(np.float32), v)),
            "mask": torch.from_numpy(apply(root.mask[t], v)),
            "slide": torch.tensor(self.sources[s][0]),
        }
        if tokens is not None:
            item["x"] = torch.from_numpy(tokens[t, v].astype(np.float32))
        else:
            item["x"] = torch.from_numpy(apply(root.images[t].transpose(2, 0, 1), v))  # uint8 [3, H, W]
        return item


def split_samples(tiles, features, val_fraction, block_tiles, seed, on_the_fly=False):
    """Open the training samples, check them, and split each into training and validation tiles.

    Returns
    -------
    train_set, val_set, info
        Two :class:`TileDataset` and a dict (genes, dim, grid, tile counts per sample).
    """
    features = [None] * len(tiles) if features is None else list(features)
    if len(tiles) != len(features):
        raise InputError("features", f"{len(features)} feature caches for {len(tiles)} tile stores")
    if not tiles:
        raise InputError("tiles", "no training samples")
    train_src, val_src, info = [], [], {"samples": {}}
    for s, (tpath, fpath) in enumerate(zip(tiles, features)):
        root = open_tiles(tpath)
        genes = root.genes
        if info.setdefault("genes", genes) != genes:
            raise InputError(tpath, "genes differ from the first training sample's (same genes.csv needed)")
        n, side = root.n_tiles, root.tile_bins
        if info.setdefault("tile_bins", side) != side:
            raise InputError(tpath, "tile size differs from the first training sample's")
        if on_the_fly:
            fpath = None
            info.setdefault("dim", None)
        elif fpath is None:
            raise InputError(tpath, "no feature cache given for this tile store")
        else:
            feats = open_features(fpath, n_tiles=n)
            dim, grid = feats.dim, feats.grid
            if info.setdefault("dim", dim) != dim or info.setdefault("grid", grid) != grid:
                raise InputError(fpath, "token width or grid differs from the first training sample's")
        sample = root.sample or Path(tpath).stem
        sample_seed = (seed + zlib.crc32(str(sample).encode())) % 2**31  # same split in every fold
        is_val = validation_split(root.grid[:], val_fraction, block_tiles, sample_seed)
        train_src.append((s, tpath, fpath, np.flatnonzero(~is_val)))
        val_src.append((s, tpath, fpath, np.flatnonzero(is_val)))
        info["samples"][str(sample)] = {"tiles": n, "train": int((~is_val).sum()), "val": int(is_val.sum())}
    train_set, val_set = TileDataset(train_src), TileDataset(val_src)
    if len(val_set) == 0:
        raise InputError("training.val_fraction", "no validation tile: every training sample has fewer than 2 tiles")
    return train_set, val_set, info


# ---------------------------------------------------------------------------------------------
# the job


class _Job:
    """State of one training run; every piece of it goes into the checkpoint."""

    def __init__(self, model_cfg, tiles, features, out_dir, encoder_cfg, fold, device):
        self.cfg, self.t, self.out_dir, self.device, self.fold = model_cfg, model_cfg["training"], out_dir, device, fold
        seed = int(self.t.get("seed", 0))
        seed_everything(seed)
        self.shuffle = torch.Generator().manual_seed(seed)
        self.train_set, self.val_set, self.info = split_samples(
            tiles, features, self.t.get("val_fraction", 0.2), self.t.get("val_block_tiles", 2), seed, _on_the_fly(model_cfg)
        )
        self.encoder = self.jitter = None
        if _on_the_fly(model_cfg):
            self.encoder, self.jitter = self._build_encoder(encoder_cfg)
            self.info["dim"] = self.encoder.dim
        self._build_model()
        self._build_optimizer()
        self.autocast, self.scaler = self._precision()
        self.state = {"epoch": 0, "best_val": math.inf, "best_epoch": 0, "bad_epochs": 0, "stopped_early": False, "log": []}
        self.best_model = None
        # what must match for a checkpoint to be resumed: settings and data (not the paths)
        self.signature = json.dumps({"model": model_cfg, "fold": fold, "info": self.info}, sort_keys=True, default=str)
        log.info(
            "model %s fold %s: %d train / %d val tiles, %d decoder parameters, device %s",
            model_cfg.get("name"), fold, len(self.train_set), len(self.val_set), count_parameters(self.model), device,
        )

    # -- set-up ---------------------------------------------------------------------------

    def _build_encoder(self, encoder_cfg):
        from torchvision.transforms import ColorJitter

        from .encoder import build_encoder

        if encoder_cfg is None:
            raise InputError("training.augment.color_jitter", "on-the-fly encoding needs the encoder config")
        encoder = build_encoder({k: v for k, v in encoder_cfg.items() if k != "name"}).to(self.device)
        return encoder, ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02)

    def _build_model(self):
        """Loss first: it names the decoder output it needs (log-rate, softplus rate, score)."""
        n_genes = len(self.info["genes"])
        self.loss = build_loss(self.cfg["loss"], n_genes=n_genes, where=f"models.{self.cfg.get('name')}.loss").to(self.device)
        self.output = self.loss.output
        # the decoder's output side follows the tile stores (128 bins of 2 um by default)
        self.decoder_kwargs = {**self.cfg.get("decoder_kwargs", {}), "out_size": self.info["tile_bins"]}
        decoder = build_decoder(self.cfg["decoder"], self.info["dim"], n_genes, self.output, **self.decoder_kwargs)
        self.model = decoder.to(self.device)
        # multi-scale GradNorm weights the scales by their gradient norms at the decoder head
        self.gradnorm = bool(getattr(self.loss, "needs_shared_params", False))

    def _build_optimizer(self):
        """AdamW on decoder + loss parameters (NB dispersions); warm-up then cosine per step."""
        t = self.t
        params = list(self.model.parameters()) + [p for p in self.loss.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=float(t["lr"]), weight_decay=float(t.get("weight_decay", 0.0)))
        self.batch_size, self.accum = int(t.get("batch_size", 8)), int(t.get("grad_accum", 1))
        steps_per_epoch = math.ceil(math.ceil(len(self.train_set) / self.batch_size) / self.accum)
        total = steps_per_epoch * int(t["epochs"])
        warmup = math.ceil(float(t.get("warmup_epochs", 0)) * steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, warmup, total))

    def _precision(self):
        precision = self.t.get("precision", "bf16")
        if self.device.type != "cuda" or precision == "fp32":
            return contextlib.nullcontext, None
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None  # fp16 needs loss scaling
        return (lambda: torch.autocast("cuda", dtype=dtype)), scaler

    # -- checkpoint -----------------------------------------------------------------------

    def _checkpoint(self):
        return {
            "signature": self.signature,
            "state": self.state,
            "model": self.model.state_dict(),
            "best_model": self.best_model,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loss": self.loss.state_dict(),  # NB dispersions, GradNorm weights (extra state)
            "scaler": self.scaler.state_dict() if self.scaler else {},
            "rng": _rng_state([self.shuffle, *self._loss_generators()]),
        }

    def _loss_generators(self):
        """Generators inside the loss (STRank's pair partners): their states are checkpointed too."""
        return [m.generator for m in self.loss.modules() if isinstance(getattr(m, "generator", None), torch.Generator)]

    def save_checkpoint(self):
        with atomic_path(self.out_dir / "checkpoint.pt") as tmp:
            torch.save(self._checkpoint(), tmp)

    def load_checkpoint(self):
        """Resume from checkpoint.pt when it was written by this same job (config, data)."""
        path = self.out_dir / "checkpoint.pt"
        if not path.is_file():
            return False
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - a damaged checkpoint means starting afresh
            log.warning("ignoring unreadable %s (%s)", path, err)
            return False
        if ck.get("signature") != self.signature:
            log.warning("ignoring %s: written by a different configuration or data", path)
            return False
        self.model.load_state_dict(ck["model"])
        self.best_model = ck["best_model"]
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.loss.load_state_dict(ck["loss"])
        if self.scaler and ck["scaler"]:
            self.scaler.load_state_dict(ck["scaler"])
        self.state = ck["state"]
        _set_rng_state(ck["rng"], [self.shuffle, *self._loss_generators()])
        log.info("resumed %s after epoch %d", path, self.state["epoch"])
        return True

    # -- loop -------------------------------------------------------------------------------

    def run(self, max_epochs_this_run=None, on_epoch_end=None):
        """Train until the epoch budget or early stopping; False if stopped by the run limit."""
        epochs = int(self.t["epochs"])
        patience = int(self.t.get("patience", epochs))
        writer = self._tensorboard()
        bar = tqdm(total=epochs, initial=self.state["epoch"], desc=f"{self.cfg.get('name')} {self.fold}", unit="epoch")
        ran = 0
        try:
            while self.state["epoch"] < epochs and not self.state["stopped_early"]:
                if max_epochs_this_run is not None and ran >= max_epochs_this_run:
                    return False
                row = self._epoch(patience)
                ran += 1
                self.save_checkpoint()
                self.write_log()
                if writer:
                    for k in ("train_loss", "val_loss", "val_pcc_2um", "val_pcc_8um", "lr_last"):
                        writer.add_scalar(k, row[k], row["epoch"])
                bar.update(1)
                bar.set_postfix(train=f"{row['train_loss']:.4g}", val=f"{row['val_loss']:.4g}", pcc=f"{row['val_pcc_2um']:.3f}")
                if on_epoch_end:
                    on_epoch_end(row["epoch"], row)
        finally:
            bar.close()
            if writer:
                writer.close()
        return True

    def write_log(self):
        write_csv(pd.DataFrame(self.state["log"], columns=LOG_COLUMNS), self.out_dir / "log.csv")

    def _tensorboard(self):
        if not self.t.get("tensorboard", False):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("training.tensorboard is on but tensorboard is not installed: skipped")
            return None
        return SummaryWriter(str(self.out_dir / "tensorboard"))

    def _epoch(self, patience):
        start = time.perf_counter()
        epoch = self.state["epoch"] + 1
        train_loss, lr_first, lr_last = self._train_epoch()
        val = self.validate()
        improved = val["val_loss"] < self.state["best_val"] or self.best_model is None
        if improved:
            self.state.update(best_val=val["val_loss"], best_epoch=epoch, bad_epochs=0, best_metrics=val)
            self.best_model = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        else:
            self.state["bad_epochs"] += 1
            self.state["stopped_early"] = self.state["bad_epochs"] >= patience
        row = {"epoch": epoch, "train_loss": train_loss, **val, "lr_first": lr_first, "lr_last": lr_last}
        row.update(best=bool(improved), seconds=round(time.perf_counter() - start, 3))
        self.state["log"].append(row)
        self.state["epoch"] = epoch
        return row

    def _epoch_keys(self):
        """Shuffled tile order and one random dihedral view per tile, from the seeded generator."""
        n = len(self.train_set)
        order = torch.randperm(n, generator=self.shuffle)
        if self.t.get("augment", {}).get("dihedral", True):
            views = torch.randint(0, len(DIHEDRAL), (n,), generator=self.shuffle)
        else:
            views = torch.zeros(n, dtype=torch.long)
        return [(int(i), int(views[i])) for i in order]

    def _loader(self, dataset, keys):
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=keys,
            num_workers=int(self.t.get("num_workers", 0)),
            generator=torch.Generator().manual_seed(0),  # keeps the DataLoader off the global RNG
            pin_memory=self.device.type == "cuda",
        )

    def _tokens(self, batch, augment):
        x = batch["x"].to(self.device, non_blocking=True)
        if self.encoder is None:
            return x
        if augment:  # colour jitter per image, drawn from the (checkpointed) global torch RNG
            x = torch.stack([self.jitter(img) for img in x])
        from .encoder import token_grid

        return token_grid(self.encoder, x)

    def _forward_loss(self, batch, training):
        x = self._tokens(batch, augment=training)
        target = batch["counts"].to(self.device, non_blocking=True)
        mask = batch["mask"].to(self.device, non_blocking=True)
        slide = batch["slide"].to(self.device)
        with self.autocast():
            out = self.model(x)
        out = out.float()  # losses in float32 whatever the autocast
        if not self.gradnorm:
            return out, target, mask, self.loss(out, target, mask, slide=slide)
        per_scale = self.loss.per_scale(out, target, mask, slide)
        if training:  # GradNorm moves its weights from this batch's gradients at the head
            return out, target, mask, self.loss.combine(per_scale, self.model.shared_parameters())
        # validation: the scales' plain sum, comparable from epoch to epoch as the weights move
        return out, target, mask, per_scale.sum()

    def _train_epoch(self):
        self.model.train()
        keys = self._epoch_keys()
        n_batches = math.ceil(len(keys) / self.batch_size)
        total, lr_first = 0.0, None
        for j, batch in enumerate(tqdm(self._loader(self.train_set, keys), total=n_batches, leave=False, desc="train")):
            group = min(self.accum, n_batches - (j // self.accum) * self.accum)  # last group may be short
            _, _, _, loss = self._forward_loss(batch, training=True)
            self._backward(loss / group)
            total += float(loss.detach())
            if (j + 1) % self.accum == 0 or j == n_batches - 1:
                lr_first = self.optimizer.param_groups[0]["lr"] if lr_first is None else lr_first
                self._step()
        return total / max(1, n_batches), float(lr_first), float(self._last_step_lr)

    def _backward(self, loss):
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def _step(self):
        clip = self.t.get("clip_grad_norm")
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(clip))
        self._last_step_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def validate(self, dataset=None):
        """Validation loss and per-gene Pearson (mean over genes) at 2 and 8 um, identity view."""
        dataset = dataset or self.val_set
        self.model.eval()
        n_genes = len(self.info["genes"])
        pcc2, pcc8 = PearsonAccumulator(n_genes), PearsonAccumulator(n_genes)
        total, n = 0.0, 0
        for batch in self._loader(dataset, [(i, 0) for i in range(len(dataset))]):
            out, target, mask, loss = self._forward_loss(batch, training=False)
            total += float(loss) * len(target)
            n += len(target)
            rate = to_rate(out, self.output)
            pcc2.update(rate, target, mask)
            pcc8.update(*pool_masked(rate, target, mask, 4))
        return {"val_loss": total / max(1, n), "val_pcc_2um": _mean_over_genes(pcc2), "val_pcc_8um": _mean_over_genes(pcc8)}

    # -- end --------------------------------------------------------------------------------

    def finish(self):
        """Write best.safetensors and metrics_val.json (last: it marks a finished training)."""
        from safetensors.torch import save_file

        best = self.best_model if self.best_model is not None else self.model.state_dict()
        meta = {
            "model": str(self.cfg.get("name")),
            "fold": str(self.fold),
            "decoder": self.cfg["decoder"],
            "decoder_kwargs": json.dumps(self.decoder_kwargs, sort_keys=True),
            "output": self.output,
            "in_dim": str(self.info["dim"]),
            "genes": json.dumps(self.info["genes"]),
            "best_epoch": str(self.state["best_epoch"]),
        }
        with atomic_path(self.out_dir / "best.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in best.items()}, str(tmp), metadata=meta)
        log_rows = self.state["log"]
        metrics = {
            "model": meta["model"],
            "fold": meta["fold"],
            "best_epoch": self.state["best_epoch"],
            **{k: _finite(v) for k, v in self.state.get("best_metrics", {}).items()},
            "epochs_run": len(log_rows),
            "stopped_early": bool(self.state["stopped_early"]),
            "seconds_per_epoch": float(np.mean([r["seconds"] for r in log_rows])) if log_rows else None,
            "train_tiles": len(self.train_set),
            "val_tiles": len(self.val_set),
            "samples": self.info["samples"],
        }
        self.write_log()  # again: a resumed finished job may have lost it
        write_json(metrics, self.out_dir / "metrics_val.json")
        return metrics


def _mean_over_genes(acc):
    r = np.asarray(acc.compute(), dtype=float)
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")


def _finite(v):
    """JSON has no NaN: None instead."""
    return None if isinstance(v, float) and not math.isfinite(v) else v
