"""Scaling of the diffusion correction: time and peak memory vs number of 2 um bins, beside the dense formulation.

For each N (square capture areas of sqrt(N) x sqrt(N) bins), a patient is simulated and ingested
once (cached in the work folder; the simulator's own gene table, ~300 genes, not the 18,000 of
the `full` preset, which would only lengthen simulate/ingest), then `correct_sample` corrects
50 genes (the seeds' genes) in a fresh subprocess on one torch thread. Reported per N: wall time,
peak RSS of that process (VmHWM), and its RSS right after the imports and before the correction
(torch alone maps ~0.7 GB), so the correction's own memory is the difference. The grid is the
table's bounding box (bins from row/col 0 to the last table bin), slightly under N. The dense
formulation (one N x N float64 cost matrix plus POT's Gibbs kernel, as in the public
implementation) is run where it fits (N <= --dense-max-n: cost matrix and 20 POT iterations for
one gene, measured the same way) and computed as N^2 x 8 bytes per matrix beyond.

    .venv/bin/python bench/diffusion.py [--work DIR] [--max-n 1e6] [--full]

`--full` adds the whole simulated capture area (3250 x 3250 = 10.6 M bins); it takes ~10 min.
Results accumulate in WORK/results.json; the table printed covers every N measured so far.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
FULL = 3250


def _rss_gib(field="VmHWM"):
    """Peak (VmHWM) or current (VmRSS) resident memory of this process, GiB.

    Not getrusage's ru_maxrss: Linux carries it across fork + exec, so a child would report the
    parent's peak (here: the simulator's).
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _sample(work, side):
    """Simulate and ingest a side x side patient once; returns (sdata path, seconds spent)."""
    from sparsitytrap.ingest import ingest
    from sparsitytrap.simulate import simulate_patient

    root = Path(work) / f"S{side}"
    sdata = root / "S.zarr"
    if sdata.is_dir():
        return sdata, None
    t0 = time.perf_counter()
    params = (
        {"preset": "full", "n_genes": None, "seed": 1} if side == FULL else {"seed": 1, "n_rows": side, "n_cols": side}
    )
    params["image_margin_px"] = 80  # ingest needs an image of at least one 256 um tile (100 bins are 200 um)
    simulate_patient(root / "patient", "S", params)
    ingest(root / "patient" / "outs", "S", sdata, bins_as_squares=False)
    return sdata, round(time.perf_counter() - t0, 1)


# ---------------------------------------------------------------- children (one measurement per process)
def child_correct(sdata, out, threads):
    import torch

    from sparsitytrap.diffusion import correct_sample, open_corrected
    from sparsitytrap.simulate import SEED_GENES

    torch.set_num_threads(threads)
    base = _rss_gib("VmRSS")
    t0 = time.perf_counter()
    report = correct_sample(sdata, SEED_GENES, out, settings={"threads": threads})
    wall = time.perf_counter() - t0
    store = open_corrected(out)
    return {
        "wall_s": round(wall, 2),
        "peak_rss_gib": round(_rss_gib(), 3),
        "import_rss_gib": round(base, 3),
        "bins": int(store.grid_shape[0] * store.grid_shape[1]),
        "table_bins": store.n_bins,
        "nnz": int(store.root["data"].shape[0]),
        "diffusion_length_um": round(report["diffusion_length_um"], 3),
        "max_conservation_error": max(
            abs(v) / max(report["observed_mass"][g], 1) for g, v in report["conservation_error"].items()
        ),
    }


def child_dense(sdata, iterations=20):
    """The dense formulation on the same sample, one gene: N x N cost, POT's unbalanced Sinkhorn."""
    import numpy as np
    import ot

    from sparsitytrap.diffusion.inputs import sample_input
    from sparsitytrap.diffusion.sinkhorn import dense_cost

    inp, _, _ = sample_input(sdata, ["ACTB"])
    x = inp.window(0, 0, *inp.shape)[0].astype(np.float64)
    b = x + x.mean()
    base = _rss_gib("VmRSS")
    t0 = time.perf_counter()
    M = dense_cost(inp.shape, inp.tissue, 1 / 18.0, 1.0)
    ot.unbalanced.sinkhorn_unbalanced(
        x.ravel(), b.ravel(), M, 1.0, (float("inf"), 1.0), reg_type="entropy", numItermax=iterations, stopThr=0
    )
    return {
        "wall_s": round(time.perf_counter() - t0, 2),
        "peak_rss_gib": round(_rss_gib(), 3),
        "import_rss_gib": round(base, 3),
        "bins": int(x.size),
        "iterations": iterations,
    }


def run_child(args):
    cmd = [sys.executable, __file__, "--child", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- driver
def measure(work, side, dense_max_n, threads, results):
    n = side * side
    sdata, prep = _sample(work, side)
    row = results.setdefault(str(n), {"side": side})
    if prep is not None:
        row["simulate_ingest_s"] = prep
    row["correct"] = run_child(["correct", str(sdata), str(Path(work) / f"S{side}" / "corrected.zarr"), str(threads)])
    if n <= dense_max_n:
        row["dense"] = run_child(["dense", str(sdata)])
    row["dense_matrix_gib_computed"] = n * n * 8 / GIB
    print(f"N = {n:,}: {json.dumps(row)}", flush=True)


def print_table(results):
    head = (
        "| N (capture area) | grid bins (table bbox) | wall (s) | peak RSS (GiB) | RSS above imports (GiB) "
        "| stored non-zeros | dense N x N float64 (GiB) | dense measured: wall, peak RSS |"
    )
    print("\n" + head)
    print("|" + "---|" * 8)
    for key in sorted(results, key=int):
        row = results[key]
        c = row.get("correct", {})
        d = row.get("dense")
        dense = f"{d['wall_s']} s, {d['peak_rss_gib']:.2f} GiB (20 iterations)" if d and "wall_s" in d else "too large"
        if "wall_s" not in c:
            print(f"| {int(key):,} | | failed: {c.get('error')} | | | | | |")
            continue
        above = c["peak_rss_gib"] - c["import_rss_gib"]
        dense_gib = c["bins"] ** 2 * 8 / GIB
        print(
            f"| {int(key):,} | {c['bins']:,} | {c['wall_s']} | {c['peak_rss_gib']:.2f} | {above:.2f} "
            f"| {c['nnz']:,} | {dense_gib:,.2f} | {dense} |"
        )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "st_diffusion_bench"))
    p.add_argument("--max-n", type=float, default=1e6, help="largest N of the 10^k series")
    p.add_argument("--full", action="store_true", help="also the whole 3250 x 3250 capture area")
    p.add_argument("--dense-max-n", type=float, default=1e4, help="run the dense formulation up to this N")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        kind, *rest = a.child
        out = child_correct(rest[0], rest[1], int(rest[2])) if kind == "correct" else child_dense(rest[0])
        print(json.dumps(out))
        return
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    sides = [round(math.sqrt(10**k)) for k in range(4, 7) if 10**k <= a.max_n] + ([FULL] if a.full else [])
    for side in sides:
        measure(work, side, a.dense_max_n, a.threads, results)
        path.write_text(json.dumps(results, indent=1) + "\n")
    print_table(results)
    print(f"\nresults: {path} (delete the work folder afterwards: it holds the simulated samples)")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
