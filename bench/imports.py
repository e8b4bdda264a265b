"""Import time of every stage module, and the heavy libraries each one pulls in.

Every workflow job starts a fresh Python that imports one stage module, so this cost is paid per job.
Each import runs in a new interpreter (best of --repeat); with --baseline REF, the same modules of git
revision REF are measured side by side in the same run (from a temporary worktree).

    python bench/imports.py                      # this checkout
    python bench/imports.py --baseline 17491c7   # and a baseline revision beside it
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = [
    "sparsitytrap.config",
    "sparsitytrap.ingest",
    "sparsitytrap.genes",
    "sparsitytrap.tile",
    "sparsitytrap.features",
    "sparsitytrap.training",
    "sparsitytrap.predict",
    "sparsitytrap.evaluate",
    "sparsitytrap.stats",
    "sparsitytrap.figures",
    "sparsitytrap.diffusion",
    "sparsitytrap.simulate",
    "sparsitytrap.cli",
]
HEAVY = ["torch", "timm", "matplotlib", "spatialdata", "spatialdata_io", "scanpy", "anndata", "dask", "ot", "skimage"]
PROBE = """
import json, sys, time
t = time.perf_counter()
import {module}
dt = time.perf_counter() - t
print(json.dumps([dt, [m for m in {heavy!r} if m in sys.modules]]))
"""


def measure(module, src, repeat):
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    best, heavy = None, []
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, "-c", PROBE.format(module=module, heavy=HEAVY)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        dt, heavy = json.loads(out.stdout.strip().splitlines()[-1])
        best = dt if best is None else min(best, dt)
    return best, heavy


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="git revision to measure beside this checkout")
    parser.add_argument("--repeat", type=int, default=3, help="fresh interpreters per module (best is kept)")
    args = parser.parse_args()
    trees = {"now": REPO / "src"}
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            wt = Path(tmp) / "baseline"
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(wt), args.baseline], check=True
            )
            trees = {args.baseline: wt / "src", **trees}
        try:
            rows = {m: {name: measure(m, src, args.repeat) for name, src in trees.items()} for m in STAGES}
        finally:
            if args.baseline:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(wt)], check=False)
    names = list(trees)
    print(
        "| module | "
        + " | ".join(f"{n} s | {n} heavy imports" for n in names)
        + (" | ratio |" if len(names) > 1 else " |")
    )
    print("|---" * (2 * len(names) + 1 + (len(names) > 1)) + "|")
    for m, res in rows.items():
        cells = " | ".join(f"{res[n][0]:.2f} | {', '.join(res[n][1]) or '-'}" for n in names)
        ratio = f" | {res[names[0]][0] / res[names[-1]][0]:.1f}x |" if len(names) > 1 else " |"
        print(f"| {m} | {cells}{ratio}")


if __name__ == "__main__":
    main()
