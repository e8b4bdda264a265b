"""Learning-rate schedule, optimizer, seeds and determinism of a training job."""

import contextlib
import math
import random

import numpy as np
import torch


def lr_factor(step, warmup_steps, total_steps):
    """Linear warm-up then cosine, per optimizer step; never 0 at the first step.

    Warm-up starts at ``1 / warmup_steps`` of the base rate (the seeds started at 0, wasting
    their first epoch); the cosine ends just above 0 at the last step.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_optimizer(params, training, n_train_tiles):
    """AdamW with warm-up then cosine stepped per optimizer step (not per batch: grad_accum)."""
    optimizer = torch.optim.AdamW(
        params, lr=float(training["lr"]), weight_decay=float(training.get("weight_decay", 0.0))
    )
    batches = math.ceil(n_train_tiles / int(training.get("batch_size", 8)))
    steps_per_epoch = math.ceil(batches / int(training.get("grad_accum", 1)))
    total = steps_per_epoch * int(training["epochs"])
    warmup = math.ceil(float(training.get("warmup_epochs", 0)) * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total))
    return optimizer, scheduler


def seed_everything(seed):
    """Seed python, numpy and torch (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def determinism(device):
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
