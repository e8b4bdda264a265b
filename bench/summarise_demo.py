"""Markdown summary of a finished `snakemake --cores N` run, for the README: per-model means of
the per-gene metrics with nulls and ceilings, validation metrics, and time per rule.

    .venv/bin/python bench/summarise_demo.py [results]
"""

import argparse
import glob
import json
import sys
from pathlib import Path

import pandas as pd

METRICS = ["pcc_2um_pooled", "pcc_8um_pooled", "scc_2um_pooled", "ssim_2um_pertile", "ratio_pooled"]
COUNT_SCALE = {"ssim_2um_pertile", "ratio_pooled"}  # undefined for a ranking model's relative scores


def evaluation_table(results):
    rows = []
    for path in sorted(results.glob("eval/*/*/summary.json")):
        s = json.loads(path.read_text())
        g = pd.read_csv(path.parent / "per_gene.csv")
        row = {"model": s["model"], "fold": s["fold"], "relative": s.get("relative_scores", False)}
        for m in METRICS:
            row[m] = g[m].mean()
            if m != "ratio_pooled":
                row[f"{m} null"] = g[f"{m}_null"].mean()
                row[f"{m} ceiling"] = g[f"{m}_ceiling"].mean()
        rows.append(row)
    frame = pd.DataFrame(rows)
    relative = set(frame.loc[frame["relative"], "model"])
    df = frame.drop(columns="relative").groupby("model", sort=False)
    mean, sd = df.mean(numeric_only=True), df.std(numeric_only=True)
    out = ["| model | " + " | ".join(METRICS) + " | PCC 8 µm / ceiling |", "|---" * (len(METRICS) + 2) + "|"]
    for model in mean.index:
        cells = []
        for m in METRICS:
            if m in COUNT_SCALE and model in relative:
                cells.append("n/a (relative scores)")
                continue
            cell = f"{mean.loc[model, m]:.3f} ± {sd.loc[model, m]:.3f}"
            if m != "ratio_pooled":
                cell += f" (null {mean.loc[model, m + ' null']:.3f}, ceiling {mean.loc[model, m + ' ceiling']:.3f})"
            cells.append(cell)
        share = mean.loc[model, "pcc_8um_pooled"] / mean.loc[model, "pcc_8um_pooled ceiling"]
        out.append(f"| {model} | " + " | ".join(cells) + f" | {share:.0%} |")
    return "\n".join(out)


def validation_table(results):
    rows = []
    for path in sorted(results.glob("models/*/*/metrics_val.json")):
        v = json.loads(path.read_text())
        rows.append(
            {
                "model": path.parts[-3],
                "fold": path.parts[-2],
                **{k: v[k] for k in v if isinstance(v[k], (int, float)) and not isinstance(v[k], bool)},
                "stop": v.get("stop") or "n/a",  # what ended the job (older runs do not say)
            }
        )
    df = pd.DataFrame(rows)
    table = df.groupby("model", sort=False).mean(numeric_only=True).round(4)
    stops = df.groupby("model", sort=False)["stop"].agg(
        lambda s: ", ".join(f"{k} {n}" for k, n in s.value_counts().items())
    )
    return table.assign(stops=stops).to_markdown()


def time_table(results):
    rows = []
    for path in glob.glob(str(results / "benchmarks" / "**" / "*.tsv"), recursive=True):
        rule = Path(path).relative_to(results / "benchmarks").parts[0]
        b = pd.read_csv(path, sep="\t")
        rows.append({"rule": rule, "s": b["s"].iloc[-1], "max_rss_mb": b["max_rss"].iloc[-1]})
    df = (
        pd.DataFrame(rows)
        .groupby("rule")
        .agg(jobs=("s", "size"), total_s=("s", "sum"), mean_s=("s", "mean"), peak_rss_mb=("max_rss_mb", "max"))
    )
    return df.round(1).to_markdown()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="?", default="results", help="the run's results folder (default: results)")
    results = Path(p.parse_args(argv).results)
    if not any(results.glob("eval/*/*/summary.json")):
        sys.exit(f"summarise_demo: error: {results}: no eval/*/*/summary.json (run the workflow first)")
    print("## Held-out evaluation (mean over genes; mean ± SD over folds)\n")
    print(evaluation_table(results))
    print("\n## Validation metrics (metrics_val.json, mean over folds)\n")
    print(validation_table(results))
    print("\n## Time per rule (snakemake benchmark files)\n")
    print(time_table(results))


if __name__ == "__main__":
    main()
