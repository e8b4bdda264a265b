"""One training job: set-up in seeded order, epochs checkpointed one by one, the final outputs."""

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..decoders import build_decoder, count_parameters
from ..device import resolve_device
from ..errors import InputError
from ..io import atomic_path, write_csv, write_json
from ..losses import MultiScaleLoss, build_loss
from . import checkpoint
from .data import encodes_on_the_fly, resident_sets, split_samples
from .loop import Trainer, last_quarter_share
from .schedule import build_optimizer, determinism, seed_everything

log = logging.getLogger(__name__)

#: How the finished job's log line says what ended it (:attr:`.loop.Trainer.stop_reason`).
STOPPED = {
    "patience": "stopped early (patience)",
    "plateau": "stopped at the plateau",
    "cap": "reached training.epochs",
}

LOG_COLUMNS = [
    "epoch",
    "train_loss",
    "val_loss",
    "val_pcc_2um",
    "val_pcc_8um",
    "lr_first",
    "lr_last",
    "best",
    "seconds",
]


def fit(
    model_cfg,
    tiles,
    features,
    out_dir,
    encoder_cfg=None,
    fold=None,
    resume=True,
    max_epochs_this_run=None,
    on_epoch_end=None,
):
    """Train a decoder on the training samples' tiles; validate on held-out blocks of them.

    Parameters
    ----------
    model_cfg
        A resolved model (``sparsitytrap.config.model_config``): ``name``, ``decoder``,
        ``decoder_kwargs``, ``loss``, ``training``; optional ``genes``, the fold's genes among the
        tile stores' (default all of them).
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
    resume
        Continue from ``out_dir/checkpoint.pt`` when it belongs to the same job.
    max_epochs_this_run
        Stop (as if killed) after this many epochs of this call; a later call resumes.
    on_epoch_end
        Optional ``callback(epoch, row)`` after each epoch's checkpoint (progress, tests).

    Returns
    -------
    dict
        ``finished`` (False when stopped by `max_epochs_this_run`), ``out_dir``, ``files`` and,
        when finished, the content of metrics_val.json.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(model_cfg["training"].get("device", "auto"))
    with determinism(device):
        job = _build(model_cfg, tiles, features, out_dir, encoder_cfg, fold, device)
        if resume:
            checkpoint.restore(out_dir, job.trainer, job.signature)
        if not _run(job, max_epochs_this_run, on_epoch_end):
            return {"finished": False, "out_dir": str(out_dir), "files": [checkpoint.NAME, "log.csv"]}
        metrics = _finish(job)
    files = [checkpoint.NAME, "log.csv", "best.safetensors", "metrics_val.json"]
    return {"finished": True, "out_dir": str(out_dir), "files": files, **metrics}


@dataclass
class _Job:
    """What the outputs need beside the trainer: settings, data description, checkpoint signature."""

    cfg: dict
    fold: str
    out_dir: Path
    info: dict
    decoder_kwargs: dict
    trainer: Trainer
    signature: str


# ---------------------------------------------------------------------------------------------
# set-up: every random draw (initial weights, split, shuffler) follows the seed, in this order


def _build(model_cfg, tiles, features, out_dir, encoder_cfg, fold, device):
    t = model_cfg["training"]
    seed = int(t.get("seed", 0))
    seed_everything(seed)
    shuffle = torch.Generator().manual_seed(seed)
    on_the_fly = encodes_on_the_fly(model_cfg)
    train_set, val_set, info = split_samples(
        tiles,
        features,
        t.get("val_fraction", 0.2),
        t.get("val_block_tiles", 2),
        seed,
        on_the_fly,
        genes=model_cfg.get("genes"),  # the fold's own selection (genes.samples: training)
    )
    encoder = jitter = None
    if on_the_fly:
        encoder, jitter = _build_encoder(encoder_cfg, device)
        info["dim"] = encoder.dim
    loss, model, decoder_kwargs = _build_model(model_cfg, info, device)
    # resident before the statistics, so a resident job reads its tiles once
    train_set, val_set = resident_sets(t, train_set, val_set, device)
    mean, std, gene_mean = training_statistics(train_set, encoder)
    model.token_norm.mean.copy_(mean)
    model.token_norm.std.copy_(std)
    start_head_at(model.head, gene_mean, t.get("head_start", "gene_mean"))
    params = list(model.parameters()) + [p for p in loss.parameters() if p.requires_grad]  # + NB dispersions
    optimizer, scheduler = build_optimizer(params, t, len(train_set))
    n_genes = len(info["genes"])
    trainer = Trainer(
        model, loss, optimizer, scheduler, t, train_set, val_set, n_genes, shuffle, device, encoder, jitter
    )
    log.info(
        "model %s fold %s: %d train / %d val tiles, %d decoder parameters, device %s",
        model_cfg.get("name"),
        fold,
        len(train_set),
        len(val_set),
        count_parameters(model),
        device,
    )
    return _Job(model_cfg, fold, out_dir, info, decoder_kwargs, trainer, checkpoint.signature(model_cfg, fold, info))


def _build_encoder(encoder_cfg, device):
    from torchvision.transforms import ColorJitter

    from ..encoder import build_encoder

    if encoder_cfg is None:
        raise InputError("training.augment.color_jitter", "on-the-fly encoding needs the encoder config")
    encoder = build_encoder({k: v for k, v in encoder_cfg.items() if k != "name"}).to(device)
    return encoder, ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02)


def _build_model(model_cfg, info, device):
    """Loss first: it names the decoder output it needs (log-rate, softplus rate, score)."""
    n_genes = len(info["genes"])
    loss = build_loss(model_cfg["loss"], n_genes=n_genes, where=f"models.{model_cfg.get('name')}.loss")
    loss = at_train_um(loss, model_cfg["training"]).to(device)
    # the decoder's output side follows the tile stores (128 bins of 2 um by default)
    decoder_kwargs = {**model_cfg.get("decoder_kwargs", {}), "out_size": info["tile_bins"]}
    model = build_decoder(model_cfg["decoder"], info["dim"], n_genes, loss.output, **decoder_kwargs).to(device)
    return loss, model, decoder_kwargs


@torch.no_grad()
def training_statistics(dataset, encoder=None):
    """What the decoder starts from, from the training tiles only (identity view, never validation or test).

    Returns the per-channel mean and std of the tokens (the input standardisation) and each gene's
    mean count per in-tissue bin (the head's starting bias). float64 sums, so the result does not
    depend on the tile order. `encoder` encodes the images when there is no feature cache (colour jitter).
    """
    from ..encoder import token_grid

    total = squares = counts = 0.0
    n = bins = 0
    for i in range(len(dataset)):
        item = dataset[(i, 0)]
        x = token_grid(encoder, item["x"][None])[0] if encoder is not None else item["x"]
        flat = x.flatten(1).double()  # [D, h*w]
        total, squares, n = total + flat.sum(1), squares + flat.square().sum(1), n + flat.shape[1]
        mask = item["mask"].double()
        counts, bins = counts + (item["target"].double() * mask).sum((1, 2)), bins + float(mask.sum())
    mean = total / n
    std = (squares / n - mean.square()).clamp(min=0).sqrt()
    gene_mean = counts / max(bins, 1.0)
    return mean.float(), std.clamp(min=1e-6).float(), gene_mean  # a constant channel stays finite


#: Lowest starting rate per bin: a gene never seen in the training tissue starts finite.
MIN_START_RATE = 1e-4


@torch.no_grad()
def start_head_at(head, gene_mean, how="gene_mean"):
    """Start each gene's output at its training mean (``training.head_start: gene_mean``), or at the
    decoder's constant bias (``constant``). Rates span orders of magnitude between genes; from a
    constant start the first epochs only learn each gene's level. A ranking score has no level.
    """
    if how == "constant" or head.output == "score":
        return
    if how != "gene_mean":
        raise InputError("training.head_start", f"{how!r} is not one of gene_mean, constant")
    rate = gene_mean.clamp(min=MIN_START_RATE)
    # log-rate for the likelihood losses; softplus's inverse log(expm1(r)) for the MSE rate
    bias = rate.log() if head.output == "log_rate" else torch.expm1(rate).log()
    head.conv.bias.copy_(bias.to(head.conv.bias))


def at_train_um(loss, training):
    """The loss on sum-pooled predictions and targets at ``training.train_um`` (2, the default: as is).

    The multi-scale loss's pooling at one scale with weight 1: its detached floor (the loss of a
    perfect prediction at that bin size) shifts the value, not the gradient.
    """
    k = int(training.get("train_um", 2)) // 2  # 2 um bins per side of a training bin
    if k == 1:
        return loss
    return MultiScaleLoss(loss, scales=(k,), balance="fixed")  # keeps the base's slide batching too


# ---------------------------------------------------------------------------------------------
# epochs


def _run(job, max_epochs_this_run, on_epoch_end):
    """Train until the epoch budget or early stopping; False if stopped by the run limit."""
    trainer, name = job.trainer, job.cfg.get("name")
    writer = _tensorboard(job)
    bar = tqdm(total=int(trainer.t["epochs"]), initial=trainer.state["epoch"], desc=f"{name} {job.fold}", unit="epoch")
    ran = 0
    try:
        while not trainer.done:
            if max_epochs_this_run is not None and ran >= max_epochs_this_run:
                return False
            row = trainer.epoch()
            ran += 1
            checkpoint.save(job.out_dir, trainer, job.signature)
            _write_log(job)
            if writer:
                for k in ("train_loss", "val_loss", "val_pcc_2um", "val_pcc_8um", "lr_last"):
                    writer.add_scalar(k, row[k], row["epoch"])
            bar.update(1)
            bar.set_postfix(
                train=f"{row['train_loss']:.4g}", val=f"{row['val_loss']:.4g}", pcc=f"{row['val_pcc_2um']:.3f}"
            )
            if on_epoch_end:
                on_epoch_end(row["epoch"], row)
    finally:
        bar.close()
        if writer:
            writer.close()
    return True


def _tensorboard(job):
    if not job.trainer.t.get("tensorboard", False):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("training.tensorboard is on but tensorboard is not installed: skipped")
        return None
    return SummaryWriter(str(job.out_dir / "tensorboard"))


def _write_log(job):
    write_csv(pd.DataFrame(job.trainer.state["log"], columns=LOG_COLUMNS), job.out_dir / "log.csv")


# ---------------------------------------------------------------------------------------------
# outputs


def _finish(job):
    """Write best.safetensors and metrics_val.json (last: it marks a finished training)."""
    trainer, state = job.trainer, job.trainer.state
    meta = _write_best(job)
    log_rows = state["log"]
    metrics = {
        "model": meta["model"],
        "fold": meta["fold"],
        "best_epoch": state["best_epoch"],
        **{k: _finite(v) for k, v in state.get("best_metrics", {}).items()},
        "epochs_run": len(log_rows),
        "stopped_early": trainer.stopped_early,
        "stop": trainer.stop_reason,
        "last_quarter_share": _finite(last_quarter_share([r["val_loss"] for r in log_rows])),
        "seconds_per_epoch": float(np.mean([r["seconds"] for r in log_rows])) if log_rows else None,
        "train_tiles": len(trainer.train_set),
        "val_tiles": len(trainer.val_set),
        "samples": job.info["samples"],
    }
    _write_log(job)  # again: a resumed finished job may have lost it
    write_json(metrics, job.out_dir / "metrics_val.json")
    log.info(
        "model %s fold %s: %s after epoch %d, best epoch %d (validation loss %.5g); last quarter of the epochs "
        "brought %s of the decrease since epoch 1",
        meta["model"],
        meta["fold"],
        STOPPED[trainer.stop_reason],
        len(log_rows),
        state["best_epoch"],
        state["best_val"],
        "n/a" if metrics["last_quarter_share"] is None else f"{metrics['last_quarter_share']:.1%}",
    )
    return metrics


def _write_best(job):
    """best.safetensors: the best epoch's weights and what :func:`~sparsitytrap.predict.load_model` needs."""
    from safetensors.torch import save_file

    trainer = job.trainer
    best = trainer.best_model if trainer.best_model is not None else trainer.model.state_dict()
    meta = {
        "model": str(job.cfg.get("name")),
        "fold": str(job.fold),
        "decoder": job.cfg["decoder"],
        "decoder_kwargs": json.dumps(job.decoder_kwargs, sort_keys=True),
        "output": trainer.loss.output,
        "in_dim": str(job.info["dim"]),
        "genes": json.dumps(job.info["genes"]),
        "best_epoch": str(trainer.state["best_epoch"]),
    }
    with atomic_path(job.out_dir / "best.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in best.items()}, str(tmp), metadata=meta)
    return meta


def _finite(v):
    """JSON has no NaN: None instead."""
    return None if isinstance(v, float) and not math.isfinite(v) else v
