"""Tensors or arrays in, the same kind out: the metrics compute in numpy and never import torch.

An evaluation job reads zarr into numpy and imports no torch (about 1 s of every job); training
validates with torch tensors, possibly on a GPU, which are copied to the CPU here.
"""

import sys

import numpy as np


def is_tensor(x):
    """Whether ``x`` is a torch tensor (without importing torch: a tensor means it is imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def kernel_array(x):
    """Numpy ``x`` for the compiled kernels: CPU, contiguous, 16-bit floats widened (exactly) to float32."""
    if is_tensor(x):
        x = x.detach()
        if x.is_floating_point() and x.element_size() == 2:  # float16, bfloat16: numpy has no bfloat16
            x = x.float()
        x = x.cpu().numpy()
    x = np.asarray(x)
    return np.ascontiguousarray(x.astype(np.float32) if x.dtype == np.float16 else x)


def like(x, out):
    """Numpy ``out`` as a tensor on ``x``'s device when ``x`` is a tensor, else as it is."""
    if not is_tensor(x):
        return out
    return sys.modules["torch"].from_numpy(out).to(x.device)
