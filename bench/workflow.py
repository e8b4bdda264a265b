"""The whole workflow, timed three ways in one run: from nothing, a no-op second run, and the rerun
after one figure option changes (only that figure's job may run).

    python bench/workflow.py [--cores 2] [--configfile config.yaml] [--reuse]

Runs in the repository root on the `results` folder of the config. `--reuse` skips the run from
nothing when that folder already holds a finished run (its time is then not measured here).
Prints each wall time, the jobs each run executed, and the ratios to the run from nothing.
"""

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def snakemake(cores, configfile, *extra):
    cmd = [sys.executable, "-m", "sparsitytrap.resume", "--cores", str(cores), "--configfile", configfile, *extra]
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    log = out.stdout + out.stderr
    steps = re.findall(r"(\d+) of (\d+) steps", log)  # "N of M steps (100%) done", last one
    jobs = int(steps[-1][1]) - 1 if steps else 0  # the target rule `all` is one step
    rules = sorted(set(re.findall(r"Job stats:\n(?:.*\n){2}((?:\w+ +\d+\n)+)", log)[0].split()[::2])) if steps else []
    return dt, jobs, [r for r in rules if r not in ("all", "total")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cores", type=int, default=2, help="snakemake --cores")
    parser.add_argument("--configfile", default="config.yaml", help="the workflow's config")
    parser.add_argument("--reuse", action="store_true", help="skip the run from nothing (results already built)")
    args = parser.parse_args()
    rows = []
    if not args.reuse:
        rows.append(("from nothing", *snakemake(args.cores, args.configfile)))
    rows.append(("no-op second run", *snakemake(args.cores, args.configfile)))
    # one figure option (figures.rescue_top_k) changes: Snakemake's params trigger reruns that figure only
    rows.append(
        (
            "figures.rescue_top_k 4 -> 2",
            *snakemake(args.cores, args.configfile, "--config", "figures={rescue_top_k: 2}"),
        )
    )
    rows.append(("back to the config", *snakemake(args.cores, args.configfile)))
    base = rows[0][1] if not args.reuse else None
    print(f"| run ({args.cores} cores) | wall s | jobs run | rules | vs from nothing |")
    print("|---|---|---|---|---|")
    for name, dt, jobs, rules in rows:
        ratio = f"{dt / base:.3f}" if base else "n/a"
        print(f"| {name} | {dt:.1f} | {jobs} | {', '.join(rules) or '-'} | {ratio} |")


if __name__ == "__main__":
    main()
