"""The training loop: epochs of shuffled dihedral views, optimizer steps, validation, early stopping.

:class:`Trainer` holds what the loop changes (weights, optimizer, schedule, RNG, the
early-stopping ``state``); :mod:`.checkpoint` saves and restores exactly those attributes.
"""

import contextlib
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..bins import pool_masked
from ..decoders import to_rate
from ..metrics import PearsonAccumulator
from ..views import DIHEDRAL
from .checkpoint import initial_state
from .data import ResidentTiles, TileDataset, batches, loader


def precision(training, device):
    """(autocast factory, GradScaler or None): bf16/fp16 autocast on CUDA only."""
    name = training.get("precision", "bf16")
    if device.type != "cuda" or name == "fp32":
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if name == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None  # fp16 needs loss scaling
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


#: First epoch of the plateau rule when ``training.plateau_min_epochs`` is not set: the first
#: epoch whose log has a last quarter (4 epochs).
PLATEAU_MIN_EPOCHS = 4


@dataclass(eq=False)
class Trainer:
    """One decoder's optimisation on the training tiles, validated on the held-out blocks.

    Parameters
    ----------
    model, loss, optimizer, scheduler
        Decoder, its loss (``loss.output`` names the decoder's output space), AdamW and its
        per-step schedule.
    t
        The model's ``training`` settings.
    train_set, val_set
        :class:`~.data.TileDataset` of the training samples, or the :class:`~.data.ResidentTiles`
        that :func:`~.data.resident_sets` made of it (same batches, no reads after the first).
    n_genes
        Genes of the tile stores (the decoder's output channels).
    shuffle
        Seeded generator of the tile order and of the dihedral views.
    device
        Torch device.
    encoder, jitter
        Frozen encoder and colour jitter for on-the-fly encoding; None with a feature cache.
    """

    model: torch.nn.Module
    loss: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    t: dict
    train_set: TileDataset | ResidentTiles
    val_set: TileDataset | ResidentTiles
    n_genes: int
    shuffle: torch.Generator
    device: torch.device
    encoder: torch.nn.Module | None = None
    jitter: object = None

    def __post_init__(self):
        self.batch_size, self.accum = int(self.t.get("batch_size", 8)), int(self.t.get("grad_accum", 1))
        # multi-scale GradNorm weights the scales by their gradient norms at the decoder head
        self.gradnorm = bool(getattr(self.loss, "needs_shared_params", False))
        # a slide-scope ranking loss needs each batch's tiles from one slide (data.batches)
        self.by_slide = bool(getattr(self.loss, "batches_by_slide", False))
        self.autocast, self.scaler = precision(self.t, self.device)
        self.state, self.best_model = initial_state(), None  # what the loop changes besides weights

    @property
    def done(self):
        return self.state["epoch"] >= int(self.t["epochs"]) or self.stopped_early

    @property
    def stopped_early(self):
        return self.state.get("stop") is not None

    @property
    def stop_reason(self):
        """Why training ended: ``patience``, ``plateau``, ``cap`` (training.epochs), or None (not yet)."""
        return self.state.get("stop") or ("cap" if self.done else None)

    def epoch(self):
        """Train one epoch, validate, update early stopping and the best weights; the log row."""
        start = time.perf_counter()
        epoch = self.state["epoch"] + 1
        train_loss, lr_first, lr_last = self._train_epoch()
        val = self.validate()
        improved = self._record(val, epoch)
        row = {"epoch": epoch, "train_loss": train_loss, **val, "lr_first": lr_first, "lr_last": lr_last}
        row.update(best=bool(improved), seconds=round(time.perf_counter() - start, 3))
        self.state["log"].append(row)
        self.state["epoch"] = epoch
        self.state["stop"] = self._early_stop()
        return row

    def _record(self, val, epoch):
        """Keep the weights of the lowest validation loss, count the epochs since."""
        improved = val["val_loss"] < self.state["best_val"] or self.best_model is None
        if improved:
            self.state.update(best_val=val["val_loss"], best_epoch=epoch, bad_epochs=0, best_metrics=val)
            self.best_model = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        else:
            self.state["bad_epochs"] += 1
        return improved

    def _early_stop(self):
        """``patience``: that many epochs without a lower validation loss; ``plateau``: from epoch
        ``plateau_min_epochs`` on, the last quarter of the epochs brought less than ``plateau_share``
        of the validation loss's decrease since epoch 1 (:func:`last_quarter_share`); else None.
        """
        t = self.t
        if self.state["bad_epochs"] >= int(t.get("patience", t["epochs"])):
            return "patience"
        share = t.get("plateau_share")
        if share is not None and self.state["epoch"] >= int(t.get("plateau_min_epochs", PLATEAU_MIN_EPOCHS)):
            if last_quarter_share([r["val_loss"] for r in self.state["log"]]) < float(share):  # NaN: no
                return "plateau"
        return None

    def _epoch_keys(self):
        """Shuffled tile order and one random dihedral view per tile, from the seeded generator."""
        n = len(self.train_set)
        order = torch.randperm(n, generator=self.shuffle)
        if self.t.get("augment", {}).get("dihedral", True):
            views = torch.randint(0, len(DIHEDRAL), (n,), generator=self.shuffle)
        else:
            views = torch.zeros(n, dtype=torch.long)
        return [(int(i), int(views[i])) for i in order]

    def _loader(self, dataset, keys, shuffle=None):
        plan = batches(dataset, keys, self.batch_size, self.by_slide, shuffle)
        return loader(dataset, plan, int(self.t.get("num_workers", 0)), self.device)

    def _tokens(self, batch, augment):
        x = batch["x"].to(self.device, non_blocking=True)
        if self.encoder is None:
            return x
        if augment:  # colour jitter per image, drawn from the (checkpointed) global torch RNG
            x = torch.stack([self.jitter(img) for img in x])
        from ..encoder import token_grid

        return token_grid(self.encoder, x)

    def _forward_loss(self, batch, training):
        x = self._tokens(batch, augment=training)
        target = batch["target"].to(self.device, non_blocking=True)
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
        """Mean batch loss, and the learning rates of the epoch's first and last steps."""
        self.model.train()
        loader = self._loader(self.train_set, self._epoch_keys(), shuffle=self.shuffle)
        n_batches = len(loader)
        total, lr_first = 0.0, None
        for j, batch in enumerate(tqdm(loader, total=n_batches, leave=False, desc="train")):
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
        pcc2, pcc8 = PearsonAccumulator(self.n_genes), PearsonAccumulator(self.n_genes)
        total, n = 0.0, 0
        for batch in self._loader(dataset, [(i, 0) for i in range(len(dataset))]):
            out, target, mask, loss = self._forward_loss(batch, training=False)
            total += float(loss) * len(target)
            n += len(target)
            rate = to_rate(out, self.loss.output)
            pcc2.update(rate, target, mask)
            pcc8.update(*pool_masked(rate, target, mask, 4))
        return {
            "val_loss": total / max(1, n),
            "val_pcc_2um": _mean_over_genes(pcc2),
            "val_pcc_8um": _mean_over_genes(pcc8),
        }


def last_quarter_share(val_losses):
    """Share of the validation loss's decrease since epoch 1 that its last quarter of epochs brought.

    The plateau test of a training log: the decrease is that of the running best (lowest so far),
    so a last quarter that only rises brings 0. NaN with under 4 epochs or no decrease at all.
    """
    best = np.minimum.accumulate(np.asarray(val_losses, dtype=float))
    n = len(best)
    if n < 4 or not best[0] > best[-1]:
        return float("nan")
    start = best[n - math.ceil(n / 4) - 1]  # the running best before the last quarter
    return float((start - best[-1]) / (best[0] - best[-1]))


def _mean_over_genes(acc):
    r = np.asarray(acc.compute(), dtype=float)
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")
