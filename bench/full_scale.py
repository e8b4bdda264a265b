"""Full-scale benchmark of the data stages: simulate -> ingest -> select genes -> tile.

One simulated Visium HD capture area with the ``full`` preset (3250 x 3250 = 10.6 M 2 um bins,
18,000 genes), each stage run in its own subprocess under ``/usr/bin/time`` so that peak RSS and
wall time are per stage. A watchdog polls the machine's memory and kills a stage that would take
it above ``--mem-limit-gib`` (the stage is then reported as killed, not hidden).

    .venv/bin/python bench/full_scale.py [--work DIR (default: $TMPDIR/st_full)] [--stages simulate ingest genes tile]

``--side N`` simulates an N x N bin capture area instead (e.g. 1150 or 1625: an eighth or a
quarter of the area), to check that a stage's peak grows linearly with the bins.

Stages read the previous stage's output from the work folder, so a run can be resumed with
``--stages``. Results accumulate in ``WORK/results.json``; the table printed at the end covers
every stage measured so far. Logs of each stage are in ``WORK/<stage>.log``.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("simulate", "ingest", "genes", "tile")
GIB = 1024**3


def paths(work, sample):
    work = Path(work)
    return {
        "patient": work / "simulated" / sample,
        "outs": work / "simulated" / sample / "outs",
        "sdata": work / f"{sample}.sdata.zarr",
        "genes": work / "genes.csv",
        "tiles": work / f"{sample}.tiles.zarr",
    }


def du_gib(path):
    path = Path(path)
    if not path.exists():
        return None
    files = [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file())
    return sum(p.stat().st_size for p in files) / GIB


# ---------------------------------------------------------------- stages (run in the child)
def stage_simulate(a, p):
    import h5py

    from sparsitytrap.simulate import simulate_patient

    size = {"n_rows": a.side, "n_cols": a.side} if a.side else {}
    simulate_patient(p["patient"], a.sample, {"preset": a.preset, "seed": a.seed, **size})
    derived = json.loads((p["patient"] / "params.json").read_text())["derived"]
    params = json.loads((p["patient"] / "params.json").read_text())["params"]
    with h5py.File(p["outs"] / "binned_outputs" / "square_002um" / "filtered_feature_bc_matrix.h5") as f:
        nnz = int(f["matrix/indptr"][-1])
    return {
        "bins": params["n_rows"] * params["n_cols"],
        "genes": derived["n_genes"],
        "in_tissue_bins": derived["n_in_tissue_bins"],
        "nnz": nnz,
        "umis_per_in_tissue_bin": round(derived["umis_per_in_tissue_bin"], 2),
        "zero_fraction_in_tissue": round(derived["zero_fraction_in_tissue"], 4),
        "fullres_shape": derived["fullres_shape"],
        "disk_gib": round(du_gib(p["patient"]), 2),
    }


def stage_ingest(a, p):
    import anndata as ad
    import zarr

    from sparsitytrap.ingest import ingest

    ingest(p["outs"], a.sample, p["sdata"], bins=a.bins)
    table = zarr.open_group(p["sdata"] / "tables" / "square_002um", mode="r")
    X = ad.io.sparse_dataset(table["X"])
    in_tissue = ad.io.read_elem(table["obs"]["in_tissue"])
    return {
        "bins": int(X.shape[0]),
        "genes": int(X.shape[1]),
        "nnz": int(table["X"]["indptr"][-1]),
        "in_tissue_bins": int((in_tissue > 0).sum()),
        "bin_shapes": a.bins,
        "disk_gib": round(du_gib(p["sdata"]), 2),
    }


def stage_genes(a, p):
    from sparsitytrap.genes import select_genes

    table = select_genes(
        [p["sdata"]],
        p["genes"],
        method="variance",
        n_genes=a.n_genes,
        categories=ROOT / "resources" / "gene_categories.tsv",
        panel=None,
    )
    return {"genes": len(table), "top5": list(table["gene"][:5])}


def stage_tile(a, p):
    from sparsitytrap.tile import tile_sample

    n = tile_sample(
        p["sdata"],
        p["genes"],
        p["tiles"],
        tile_bins=128,
        image_px=224,
        min_tissue_fraction=0.5,
        dataset_id=a.sample,
    )
    return {"kept_tiles": n, "disk_gib": round(du_gib(p["tiles"]), 2)}


def run_child(a):
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    p = paths(a.work, a.sample)
    stats = globals()[f"stage_{a.child}"](a, p)
    (Path(a.work) / f"stats_{a.child}.json").write_text(json.dumps(stats, indent=1))


# ---------------------------------------------------------------- driver
def mem_used_gib():
    """Machine memory in use (MemTotal - MemAvailable), GiB."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    return (info["MemTotal"] - info["MemAvailable"]) / GIB


def run_stage(a, stage):
    work = Path(a.work)
    timefile = work / f"time_{stage}.txt"
    stats_file = work / f"stats_{stage}.json"
    stats_file.unlink(missing_ok=True)
    cmd = [
        "/usr/bin/time",
        "-f",
        "%e %M",
        "-o",
        str(timefile),
        sys.executable,
        __file__,
        "--child",
        stage,
        "--work",
        str(work),
        "--sample",
        a.sample,
        "--seed",
        str(a.seed),
        "--preset",
        a.preset,
        "--n-genes",
        str(a.n_genes),
        "--bins",
        a.bins,
        "--side",
        str(a.side),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    print(f"[{time.strftime('%H:%M:%S')}] {stage}: started (log {work / (stage + '.log')})", flush=True)
    base = mem_used_gib()
    peak_machine, killed = base, False
    with open(work / f"{stage}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        while proc.poll() is None:
            used = mem_used_gib()
            peak_machine = max(peak_machine, used)
            if used > a.mem_limit_gib:
                killed = True
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: only this stage's processes
                proc.wait()
                break
            time.sleep(1.0)
    row = {
        "stage": stage,
        "rc": proc.returncode,
        "killed": killed,
        "machine_peak_gib": round(peak_machine, 2),
        "machine_before_gib": round(base, 2),
    }
    if timefile.exists() and not killed:
        last = timefile.read_text().strip().splitlines()[-1].split()
        row["wall_s"], row["peak_rss_gib"] = float(last[0]), int(last[1]) * 1024 / GIB
    if stats_file.exists():
        row.update(json.loads(stats_file.read_text()))
    print(f"[{time.strftime('%H:%M:%S')}] {stage}: {json.dumps(row)}", flush=True)
    return row


def print_table(results):
    cols = ("stage", "wall_s", "peak_rss_gib", "bins", "genes", "nnz", "in_tissue_bins", "kept_tiles")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for stage, r in results.items():
        cells = []
        for c in cols:
            v = stage if c == "stage" else r.get(c, "")
            if c == "wall_s" and v != "":
                v = f"{v:.0f}"
            elif c == "peak_rss_gib" and v != "":
                v = f"{v:.2f}"
            elif isinstance(v, int) and not isinstance(v, bool):
                v = f"{v:,}"
            if c == "stage" and (r.get("killed") or r.get("rc")):
                v += " (KILLED)" if r.get("killed") else f" (rc {r['rc']})"
            cells.append(str(v))
        print("| " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--work", default=str(Path(tempfile.gettempdir()) / "st_full"), help="work folder (outside the repository)"
    )
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--sample", default="P1")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--preset", default="full", help="simulation preset ('demo' for a quick smoke run)")
    ap.add_argument("--n-genes", type=int, default=50)
    ap.add_argument("--side", type=int, default=0, help="bins per side of the capture area (0: the preset's)")
    ap.add_argument("--bins", default="labels", choices=("labels", "squares", "circles"), help="ingest.bins")
    ap.add_argument("--mem-limit-gib", type=float, default=22.0, help="kill a stage above this machine memory")
    ap.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return run_child(a)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for stage in a.stages:
        row = run_stage(a, stage)
        key = f"{stage} ({a.bins})" if stage == "ingest" else stage
        results[key] = row
        results_file.write_text(json.dumps(results, indent=1))
        if row["rc"] != 0:
            print(f"{stage} failed (rc {row['rc']}, killed {row['killed']}); stopping", flush=True)
            break
    print_table(results)
    return 0 if all(r["rc"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
