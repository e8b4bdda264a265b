"""The 2 um bin grid at coarser bin sizes: count-conserving sum-pooling and tissue-mask pooling.

One implementation for training (multi-scale losses), evaluation (PCC at 4 and 8 um) and
figures. ``sum_pool`` is ``avg_pool2d(x, k) * k * k``: differentiable for the losses, and exact
for counts and float16 rates in float64 (k is a power of two and the window sums are exact).
"""

import torch
import torch.nn.functional as F


def sum_pool(x, k):
    """Sum over non-overlapping ``k x k`` blocks of the last two axes of a tensor ``[..., H, W]``.

    Integer tensors are pooled in float64. ``H`` and ``W`` must be divisible by ``k``.
    """
    if k == 1:
        return x
    if not x.is_floating_point():
        x = x.to(torch.float64)
    *lead, h, w = x.shape
    pooled = F.avg_pool2d(x.reshape(-1, 1, h, w), k) * (k * k)
    return pooled.reshape(*lead, h // k, w // k)


def pool_mask(mask, k):
    """Tissue mask ``[..., H, W]`` at k x coarser bins: a coarse bin is tissue if any of its bins is."""
    if k == 1:
        return mask
    *lead, h, w = mask.shape
    return mask.reshape(*lead, h // k, k, w // k, k).any(dim=-1).any(dim=-2)


def pool_masked(pred, target, mask, k):
    """Mask prediction and target ``[T, G, H, W]`` by tissue ``[T, H, W]``, sum-pool both, pool the mask."""
    m = mask[:, None].to(pred.dtype)
    return sum_pool(pred * m, k), sum_pool(target * m, k), pool_mask(mask, k)
