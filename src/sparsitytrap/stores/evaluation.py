"""The evaluation folder of one (model, fold): ``results/eval/{model}/{fold}/``.

``per_gene.csv``
    One row per gene: every score, its ``_null``, ``_ceiling`` and ``_frac_ceiling``.
``per_tile.parquet``
    One row per (tile, gene): per-tile scores, and per scale the sufficient statistics of the
    pooled Pearson (``sum_{n,x,y,xx,yy,xy}_{um}``) and the tissue range of both sides
    (``{min,max}_{x,y}_{um}``), so that pooled PCC can be recomputed over any multiset of tiles
    (the bootstrap) with the same rule for a constant side as the full evaluation.
``summary.json``
    Names, protocol, means over genes and 95 % intervals.
"""

import json
from pathlib import Path

import pandas as pd

from ..errors import InputError
from ..io import atomic_path, write_csv

PER_GENE = "per_gene.csv"
PER_TILE = "per_tile.parquet"
SUMMARY = "summary.json"
FILES = (PER_GENE, PER_TILE, SUMMARY)
#: Sufficient statistics of a Pearson correlation, in this order.
SUMS = ("n", "x", "y", "xx", "yy", "xy")
#: Tissue range of prediction (x) and target (y): a side is constant where min == max.
RANGES = ("min_x", "max_x", "min_y", "max_y")


def sum_columns(um):
    """The ``per_tile.parquet`` columns of the pooled-Pearson sums at bin size ``um`` (e.g. ``"8um"``)."""
    return [f"sum_{part}_{um}" for part in SUMS]


def range_columns(um):
    """The ``per_tile.parquet`` columns of the tissue ranges at bin size ``um``."""
    return [f"{part}_{um}" for part in RANGES]


def check_folder(eval_dir, files=FILES):
    d = Path(eval_dir)
    for name in files:
        if not (d / name).is_file():
            raise InputError(d, f"no {name}: not an evaluation folder")
    return d


def read_summary(eval_dir):
    return json.loads((check_folder(eval_dir, (SUMMARY,)) / SUMMARY).read_text())


def read_per_gene(eval_dir):
    """``per_gene.csv`` with the ``model`` and ``fold`` of its summary."""
    d = check_folder(eval_dir, (PER_GENE, SUMMARY))
    summary = read_summary(d)
    return pd.read_csv(d / PER_GENE).assign(model=summary["model"], fold=summary["fold"])


def read_per_tile(eval_dir):
    return pd.read_parquet(check_folder(eval_dir, (PER_TILE,)) / PER_TILE)


def write(out_dir, per_gene, per_tile, summary):
    """Write the three files, each atomically; ``summary.json`` last (it marks a finished evaluation)."""
    out_dir = Path(out_dir)
    write_csv(per_gene, out_dir / PER_GENE)
    with atomic_path(out_dir / PER_TILE) as tmp:
        per_tile.to_parquet(tmp, index=False)
    with atomic_path(out_dir / SUMMARY) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
