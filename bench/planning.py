"""Planning time: `snakemake -n` for a real-data-sized design, before anything has run.

The design of a study on real data: 3 patients of full capture areas (~570 tiles each), 6 models
(the 2x2 factorial, multi-scale, ListSTRank), leave-one-patient-out (3 folds), 50 genes. Planning
never opens the data, so the full-size simulated preset stands in for real Space Ranger folders.

    python bench/planning.py [--repeat 3]
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SIX = ["D_hist2st_mse", "E_hist2st_poisson", "F_img2st_poisson", "G_img2st_mse", "V7_multiscale"]


def design():
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    strank = next(m for m in cfg["models"] if m.startswith("S_"))
    cfg["models"] = {m: cfg["models"][m] for m in [*SIX, strank]}
    cfg["comparisons"] = [c for c in cfg["comparisons"] if {c["a"], c["b"]} <= set(cfg["models"])]
    cfg["simulation"]["preset"] = "full"
    cfg["genes"]["n_genes"] = 50
    return cfg


def plan(root):
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    t = time.perf_counter()
    out = subprocess.run([snakemake, "-n", "--cores", "2"], cwd=root, capture_output=True, text=True, check=True)
    dt = time.perf_counter() - t
    jobs = out.stdout.split("Job stats:", 1)[1].split("total", 1)[1].split()[0]
    return dt, int(jobs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="dry runs (best is kept)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in ["Snakefile", "workflow", "resources", "envs"]:
            src = REPO / name
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, root / name)
        (root / "config.yaml").write_text(yaml.safe_dump(design(), sort_keys=False))
        runs = [plan(root) for _ in range(args.repeat)]
    best = min(dt for dt, _ in runs)
    print(f"snakemake -n, 3 patients x 6 models x 3 folds ({runs[0][1]} jobs): best {best:.1f} s of {args.repeat}")


if __name__ == "__main__":
    main()
