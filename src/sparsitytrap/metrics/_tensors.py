"""Small tensor helpers shared by the metrics."""

import numpy as np
import torch

F64 = torch.float64


def _as_tensor(x, dtype=None):
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t if dtype is None else t.to(dtype)
