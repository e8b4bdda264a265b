"""Compile the metric kernels: ``python -m sparsitytrap.metrics`` (``make install`` runs it).

Scores a tiny batch of each kind the workflow scores (evaluation: float16 predictions, float64
true rates or int32 half-counts against int32 counts; training validation: float32 rates and
counts) by numba's JIT, which compiles every kernel for the types it meets into numba's cache
(about 15 s, once per checkout) and records those types. Then builds the kernels for them ahead
of time (:mod:`.compiled`, about 10 s) and checks, in a fresh process, that the built module gives
the same numbers without importing numba. A failed build or check leaves the JIT kernels in use.
"""

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import GeneMetrics, PearsonAccumulator, average_ranks, compiled, ssim_images

KINDS = ((np.float16, np.int32), (np.float64, np.int32), (np.int32, np.int32), (np.float32, np.float32))
#: The most the ahead-of-time kernels may differ from the JIT ones (sums in other vector lanes).
TOLERANCE = 1e-12


def exercise(seed=0):
    """Every kind of batch through the metrics once; returns their numbers ``{name: array}``."""
    rng = np.random.default_rng(seed)
    mask = rng.random((2, 16, 16)) < 0.8
    out = {}
    for pred_dtype, count_dtype in KINDS:
        pred = rng.gamma(1.0, 1.0, (2, 3, 16, 16)).astype(pred_dtype)
        counts = rng.poisson(1.0, (2, 3, 16, 16)).astype(count_dtype)
        metrics = GeneMetrics(3, keep_sums=True)
        metrics.update(pred, counts, mask)
        kind = f"{np.dtype(pred_dtype).name}_{np.dtype(count_dtype).name}"
        out[kind] = metrics.table().drop(columns="gene").to_numpy(float)
        pooled = PearsonAccumulator(3)
        pooled.update(pred, counts, mask)
        out[f"{kind}_pooled_pcc"] = pooled.compute()
    out["ranks"] = average_ranks(rng.poisson(0.3, (3, 40)).astype(np.float64))
    a, b = rng.random((2, 2, 16, 16))
    out["ssim_images"] = ssim_images(a, b)
    return out


def compile_kernels(seed=0):
    """Run :func:`exercise` (compiling or loading each kernel); returns the seconds it took."""
    start = time.perf_counter()
    exercise(seed)
    return time.perf_counter() - start


_CHECK = """
import sys
import numpy as np
from sparsitytrap.metrics.__main__ import exercise
out = exercise()
if "numba" in sys.modules:
    sys.exit("the module was not used: numba was imported")
np.savez(sys.argv[1], **out)
"""


def check(reference):
    """Max abs difference of :func:`exercise` run by the ahead-of-time module (fresh process) from ``reference``."""
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run([sys.executable, "-c", _CHECK, f"{tmp}/out.npz"], capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"the check failed (exit {res.returncode}): {res.stderr.strip()[-300:]}")
        got = np.load(f"{tmp}/out.npz")
        diffs = []
        for name, ref in reference.items():
            if not np.array_equal(np.isnan(got[name]), np.isnan(ref)):
                raise RuntimeError(f"the check failed: NaN where the JIT kernels have none in {name}")
            diffs.append(np.nanmax(np.abs(got[name] - ref), initial=0.0))
    return max(diffs)


def build_ahead_of_time(calls, reference):
    """Build the module for ``calls``, check it and remove older builds; returns (path, max diff)."""
    out_dir = Path(compiled.__file__).parent
    path = compiled.build(calls, out_dir)
    try:
        diff = check(reference)
        if diff > TOLERANCE:
            raise RuntimeError(f"the check failed: numbers differ from the JIT kernels' by {diff:.1e}")
    except Exception:
        path.unlink()
        raise
    for old in out_dir.glob("_aot_*"):
        if old != path:
            old.unlink()
    return path, diff


def main():
    start = time.perf_counter()
    with compiled.recording() as calls:
        reference = exercise()
    print(f"metric kernels compiled into numba's cache (or loaded from it) in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    try:
        path, diff = build_ahead_of_time(calls, reference)
    except Exception as e:  # a missing compiler or a CPU it cannot check: the JIT kernels are as right
        print(f"metric kernels not compiled ahead of time ({type(e).__name__}: {e}); jobs use numba's JIT kernels")
        return
    print(f"{len(calls)} metric kernels compiled ahead of time into {path.name} in "
          f"{time.perf_counter() - start:.1f} s (max |difference| from the JIT kernels {diff:.1e})")  # fmt: skip


if __name__ == "__main__":
    main()
