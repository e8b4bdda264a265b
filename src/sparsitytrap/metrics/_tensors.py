"""Small tensor helpers shared by the metrics."""

import numpy as np
import torch

F64 = torch.float64


def _as_tensor(x, dtype=None):
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t if dtype is None else t.to(dtype)


def kernel_array(x):
    """Numpy ``x`` for the compiled kernels: CPU, contiguous, 16-bit floats widened (exactly) to float32."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        x = x.cpu().numpy()
    x = np.asarray(x)
    return np.ascontiguousarray(x.astype(np.float32) if x.dtype == np.float16 else x)
