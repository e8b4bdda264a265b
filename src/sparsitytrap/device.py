"""Which torch device a job runs on."""

import torch

from .errors import InputError


def resolve_device(device="auto"):
    """``"auto"`` -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise InputError("training.device", f"must be auto, cpu or cuda, got {device!r}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError("training.device", "cuda was asked for but no GPU is visible")
    return torch.device(device)
