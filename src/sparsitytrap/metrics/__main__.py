"""Compile the metric kernels into numba's cache: ``python -m sparsitytrap.metrics`` (``make install`` runs it).

Scores a tiny batch of each kind the workflow scores, so that every kernel is compiled for the
dtypes it meets there (about 15 s, once per checkout; afterwards a job loads them in about 0.1 s):
evaluation (float16 predictions, float64 true rates or int32 half-counts against int32 counts)
and training validation (float32 rates and counts).
"""

import time

import numpy as np

from . import GeneMetrics, PearsonAccumulator

KINDS = ((np.float16, np.int32), (np.float64, np.int32), (np.int32, np.int32), (np.float32, np.float32))


def compile_kernels(seed=0):
    """Run each kind of batch through the metrics once; returns the seconds it took."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    mask = rng.random((2, 16, 16)) < 0.8
    for pred_dtype, count_dtype in KINDS:
        pred = rng.gamma(1.0, 1.0, (2, 3, 16, 16)).astype(pred_dtype)
        counts = rng.poisson(1.0, (2, 3, 16, 16)).astype(count_dtype)
        metrics = GeneMetrics(3, keep_sums=True)
        metrics.update(pred, counts, mask)
        metrics.table()
        PearsonAccumulator(3).update(pred, counts, mask)
    return time.perf_counter() - start


if __name__ == "__main__":
    print(f"metric kernels compiled (or loaded from numba's cache) in {compile_kernels():.1f} s")
