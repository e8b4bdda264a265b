"""Small tensor helpers shared by the metrics."""

import numpy as np
import torch

F64 = torch.float64


def _tissue_values(x, mask):
    """Gather ``x [T, G, H, W]`` at tissue bins: a compact ``[G, n_tissue]`` tensor (tiles in order)."""
    # per tile index_select on flat indices: a boolean index over the transposed tensor (a copy
    # of the whole batch first) is several times slower
    t, g = x.shape[:2]
    flat = x.reshape(t, g, -1)
    return torch.cat([flat[i].index_select(1, mask[i].reshape(-1).nonzero().squeeze(1)) for i in range(t)], dim=1)


def _as_tensor(x, dtype=None):
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t if dtype is None else t.to(dtype)
