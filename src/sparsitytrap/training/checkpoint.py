"""``checkpoint.pt``: everything a killed job needs to end with the numbers of an uninterrupted one.

Rewritten atomically after every epoch, read with ``weights_only=True`` (tensors, numbers,
strings, lists and dicts only):

``signature``
    The model's settings, the fold, the training data's description (not the paths) and a digest
    of the package's source: a checkpoint with another signature is not resumed, so a job rerun
    after an edit of the code (``--forcerun``: Snakemake sees the scripts, not the package)
    trains afresh instead of rewriting the old run's outputs.
``state``
    Epochs done, early-stopping state (best validation loss, its epoch and metrics, epochs
    without improvement, stopped early) and the log rows.
``model``, ``best_model``
    Current weights and those of the best epoch so far (None before epoch 1).
``optimizer``, ``scheduler``, ``scaler``
    AdamW, the learning-rate schedule, the fp16 loss scaler (``{}`` without one).
``loss``
    Loss parameters and extra state: NB dispersions, GradNorm weights and initial losses.
``rng``
    Python, numpy, torch (CPU and CUDA) global generators, the tile shuffler and the loss's
    own generators (STRank's pair partners).
"""

import functools
import hashlib
import json
import logging
import math
import random
from pathlib import Path

import numpy as np
import torch

from ..config import SERVING_KEYS
from ..io import atomic_path

log = logging.getLogger(__name__)

NAME = "checkpoint.pt"
PACKAGE = Path(__file__).resolve().parents[1]  # the source tree whose digest signs a checkpoint


def initial_state():
    """Early-stopping state and log rows before epoch 1."""
    return {
        "epoch": 0,
        "best_val": math.inf,
        "best_epoch": 0,
        "bad_epochs": 0,
        "stop": None,
        "log": [],
    }


@functools.cache
def code_digest(root=PACKAGE):
    """Digest of every module under `root`, the package by default (a few ms): which code wrote a checkpoint."""
    h = hashlib.blake2s(digest_size=8)
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def signature(model_cfg, fold, info):
    """What must match for a checkpoint to be resumed: settings, data (not the paths) and code."""
    training = {k: v for k, v in model_cfg.get("training", {}).items() if k not in SERVING_KEYS}
    model = {**model_cfg, "training": training}
    content = {"model": model, "fold": fold, "info": info, "code": code_digest()}
    return json.dumps(content, sort_keys=True, default=str)


def save(out_dir, trainer, sig):
    """Write `trainer`'s whole state (see the module docstring) to ``out_dir/checkpoint.pt``."""
    content = {
        "signature": sig,
        "state": trainer.state,
        "model": trainer.model.state_dict(),
        "best_model": trainer.best_model,
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "loss": trainer.loss.state_dict(),  # NB dispersions, GradNorm weights (extra state)
        "scaler": trainer.scaler.state_dict() if trainer.scaler else {},
        "rng": _rng_state(_generators(trainer)),
    }
    with atomic_path(out_dir / NAME) as tmp:
        torch.save(content, tmp)


def restore(out_dir, trainer, sig):
    """Load ``out_dir/checkpoint.pt`` into `trainer` when it was written by this same job."""
    path = out_dir / NAME
    if not path.is_file():
        return False
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged checkpoint means starting afresh
        log.warning("ignoring unreadable %s (%s)", path, err)
        return False
    if ck.get("signature") != sig:
        log.warning("ignoring %s: written by a different configuration, data or code", path)
        return False
    trainer.model.load_state_dict(ck["model"])
    trainer.best_model = ck["best_model"]
    trainer.optimizer.load_state_dict(ck["optimizer"])
    trainer.scheduler.load_state_dict(ck["scheduler"])
    trainer.loss.load_state_dict(ck["loss"])
    if trainer.scaler and ck["scaler"]:
        trainer.scaler.load_state_dict(ck["scaler"])
    trainer.state = ck["state"]
    _set_rng_state(ck["rng"], _generators(trainer))
    log.info("resumed %s after epoch %d", path, trainer.state["epoch"])
    return True


def _generators(trainer):
    """The tile shuffler, then the generators inside the loss (STRank's pair partners)."""
    in_loss = [
        m.generator for m in trainer.loss.modules() if isinstance(getattr(m, "generator", None), torch.Generator)
    ]
    return [trainer.shuffle, *in_loss]


def _rng_state(generators):
    """All RNG states as tensors, ints and lists, so the checkpoint loads with weights_only."""
    key, mt, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "key": key,
            "state": torch.from_numpy(mt.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
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
