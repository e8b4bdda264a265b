"""Every figure of the workflow, one function per figure, each its own Snakemake target.

Every number, label and gene name drawn is read or computed from the run's own outputs
(``per_gene.csv``, ``per_tile.parquet``, ``summary.json`` of :mod:`sparsitytrap.evaluate`, the
tile and prediction stores, ``log.csv``); nothing is typed in. Each function writes
``{out_prefix}.{fmt}`` for every format (config ``figures.format``) atomically and returns the
:class:`matplotlib.figure.Figure` (already saved, for inspection). Figures are built with the
object-oriented API (no pyplot state): safe in long-lived processes and independent of the
display backend.

The functions live by kind of figure: :mod:`.overview` (results table, bar chart, noise ceiling),
:mod:`.comparisons` (sparsity scatter, heatmap), :mod:`.maps` (mosaic, rescue and multi-scale
panels), :mod:`.curves` (training curves), :mod:`.sweep` (the resolution sweep); what they share
is in :mod:`._common`.

:data:`FIGURES` declares each figure once: rule ``figure_<name>`` draws ``FIGURES[name]``
(``workflow/scripts/figures.py``) and ``figure_targets()`` (``workflow/rules/common.smk``)
expands its output names. This module imports no plotting library, so that planning a run does
not pay for matplotlib; the drawing functions (``figures.bar_chart`` ...) are imported on first use.
"""

import importlib
import itertools
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field

MODULES = ("_common", "overview", "comparisons", "maps", "curves", "sweep")


def setting(config, key):
    """Value of a config key written ``figures.rescue_top_k`` or ``stats.metrics[0]``; None when absent."""
    value = config
    for part in re.findall(r"[^.\[\]]+", key):
        try:
            value = value[int(part)] if part.isdigit() else value[part]
        except (KeyError, IndexError, TypeError):
            return None
    return value


def _place(job, where):
    """``input`` (every input file), ``input.<name>``, ``params.<name>`` or ``wildcards.<name>`` of a job."""
    part, _, name = where.partition(".")
    value = getattr(job, part)
    return getattr(value, name) if name else list(value)


@dataclass(frozen=True)
class Figure:
    """One figure rule: its drawing function, the job data and settings it takes, and its output name.

    Attributes
    ----------
    function
        ``"module.function"`` in this package, imported only when the figure is drawn.
    output
        Name under ``results/figures`` without extension; its wildcards are what one figure is
        drawn per (:attr:`per`).
    args
        Data arguments of the function -> their place in the job (see :func:`_place`); folders
        and model names are params because they are not files.
    options
        The figure's settings: a rule param, passed to the function under its own name -> the
        config key it is read from (a change reruns this figure only).
    requires
        Config keys that must be set and non-empty for the figure to be drawn at all.
    """

    function: str
    output: str
    args: Mapping[str, str]
    options: Mapping[str, str] = field(default_factory=dict)
    requires: tuple[str, ...] = ()

    @property
    def per(self):
        """Wildcards of the output name: nothing, a comparison, a fold, (comparison, fold), (fold, gene)."""
        return tuple(name for _, name, _, _ in string.Formatter().parse(self.output) if name)

    @property
    def params(self):
        """Names of the rule's params: the settings and the job data that are not input files."""
        return set(self.options) | {w.split(".", 1)[1] for w in self.args.values() if w.startswith("params.")}

    def drawn(self, config):
        """Whether the config asks for this figure at all."""
        return all(setting(config, key) for key in self.requires)

    def names(self, values):
        """Output names, each wildcard ranging over ``values[wildcard]``, in the order of :attr:`per`."""
        combos = itertools.product(*(values[w] for w in self.per))
        return [self.output.format(**dict(zip(self.per, combo))) for combo in combos]

    def load(self):
        """The drawing function (imports its module, and so matplotlib)."""
        module, name = self.function.rsplit(".", 1)
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)

    def draw(self, job, out_prefix, formats):
        """Draw from a Snakemake job: data from its input, params and wildcards, settings from its params."""
        data = {arg: _place(job, where) for arg, where in self.args.items()}
        settings = {name: getattr(job.params, name) for name in self.options}
        return self.load()(**data, **settings, out_prefix=out_prefix, formats=formats)


EVAL_DIRS = {"eval_dirs": "params.dirs"}
PAIR_DIRS = {"eval_dirs_a": "params.a", "eval_dirs_b": "params.b"}
METRIC = {"metric": "stats.metrics[0]"}  # the first compared metric ranks and plots the genes

FIGURES = {
    "results_table": Figure("overview.results_table", "results_table", EVAL_DIRS),
    "bar_chart": Figure(
        "overview.bar_chart",
        "bar_chart",
        EVAL_DIRS,
        {"bootstrap": "evaluation.bootstrap", "bootstrap_seed": "evaluation.bootstrap_seed"},
    ),
    "noise_ceiling": Figure("overview.noise_ceiling_chart", "noise_ceiling", EVAL_DIRS),
    "training_curves": Figure("curves.training_curves", "training_curves", {"log_csvs": "input"}),
    "sparsity_scatter": Figure("comparisons.sparsity_scatter", "sparsity_scatter/{comparison}", PAIR_DIRS, METRIC),
    "heatmap": Figure("comparisons.heatmap", "heatmap/{comparison}", PAIR_DIRS),
    "rescue": Figure(
        "maps.rescue_panels",
        "rescue/{comparison}/{fold}",
        {
            "tiles_zarr": "input.tiles",
            "eval_dir_a": "params.a",
            "eval_dir_b": "params.b",
            "pred_a": "input.pred_a",
            "pred_b": "input.pred_b",
        },
        {"top_k": "figures.rescue_top_k", **METRIC, "shared_scale": "figures.shared_scale"},
    ),
    "mosaic": Figure(
        "maps.mosaic",
        "mosaic/{fold}/{gene}",
        {"tiles_zarr": "input.tiles", "predictions": "params.predictions", "gene": "wildcards.gene"},
        {"shared_scale": "figures.shared_scale"},
    ),
    "multiscale": Figure(
        "maps.multiscale_panels",
        "multiscale/{fold}",
        {"tiles_zarr": "input.tiles", "pred_zarr": "input.pred"},
        {"model": "figures.multiscale_model", "genes": "figures.mosaic_genes"},
        requires=("figures.multiscale_model", "figures.mosaic_genes"),
    ),
    # config/resolution_sweep.yaml: Poisson - MSE against the bin size the loss is computed at
    "resolution_sweep": Figure(
        "sweep.resolution_sweep",
        "resolution_sweep",
        {
            "eval_dirs": "params.dirs",
            "tiles_zarrs": "input.tiles",
            "train_um": "params.train_um",
            "losses": "params.losses",
        },
        {"bootstrap_seed": "evaluation.bootstrap_seed"},
        requires=("figures.resolution_sweep",),
    ),
}


def __getattr__(name):
    """Drawing functions and helpers (``figures.mosaic``, ``figures.TABLE_METRICS``) from their modules."""
    if name.startswith("__"):  # probes such as __wrapped__ must not import matplotlib
        raise AttributeError(name)
    for module in MODULES:
        found = importlib.import_module(f"{__name__}.{module}")
        if hasattr(found, name):
            return getattr(found, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
