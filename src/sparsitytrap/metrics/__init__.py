"""Per-gene evaluation metrics over batches of tiles and genes, streamed, by compiled passes.

Evaluation never holds all predictions of a patient: it feeds batches
``pred [T, G, H, W]`` (predicted rates, float), ``target [T, G, H, W]`` (counts) and
``mask [T, H, W]`` (bool, tissue bins) to accumulators, which keep per-gene sums (float64)
or, for the exact pooled Spearman, the tissue values of each gene (float32).

Definitions (those of the seed benchmark, with the faults of its code fixed):

- PCC "pooled": per gene, Pearson over all tissue bins of all tiles pooled.
  PCC "pertile": per (tile, gene) Pearson over the tile's tissue bins (NaN when either side is
  constant there), then the mean over tiles per gene ignoring NaN.
- Coarser scales: counts and predictions are multiplied by the mask, sum-pooled over k x k
  bins (count-conserving, so a pooled bin sums only its tissue bins) and the mask is max-pooled.
- SCC: Spearman, i.e. Pearson of average ranks (ties share the mean rank; zero counts are
  heavily tied), pooled and per tile.
- SSIM at 2 um per (tile, gene), the seeds' definition: tiles with tissue fraction > 0.05;
  prediction and target set to 0 off tissue; both min-max scaled with one shared min/max;
  pairs whose range is < 1e-6 skipped; 7 x 7 uniform window, data range 1, K1 0.01, K2 0.03,
  sample covariance, mean over the valid region: identical to
  ``skimage.metrics.structural_similarity(a, b, win_size=7, data_range=1.0)``.
- ratio: masked mean predicted rate / masked mean target count.
- deviance: mean Poisson deviance per tissue bin, ``2 (y log(y / mu) - (y - mu))``,
  with ``y log y = 0`` at ``y = 0`` and ``mu`` clamped at 1e-8.
- sparsity: fraction of tissue bins with a zero count.

Controls: :func:`shuffle_pairs` (label-shuffle null) and :func:`split_half_thinning`
(noise ceiling on real counts, corrected by :func:`correct_split_half`).

Modules: :mod:`.kernels` (the compiled passes: pooling, tissue values, moments, ranks, SSIM;
called through :mod:`.compiled`, which loads them compiled ahead of time where built),
:mod:`.correlation` (Pearson, Spearman, ranks), :mod:`.ssim`, :mod:`.stream` (the accumulators
and :class:`GeneMetrics`), :mod:`.controls`; :data:`METRICS` is the registry.
"""

from dataclasses import dataclass

#: Where each public name lives. They are imported on first use (PEP 562), so that the registry
#: below (needed when a run is planned, and by stats and figures) costs no torch import.
_HOME = {
    "controls": ["correct_split_half", "noise_ceiling", "shuffle_pairs", "spearman_brown", "split_half_thinning"],
    "correlation": ["DEVIANCE_EPS", "average_ranks", "pearson_per_tile", "spearman_per_tile"],
    "sums": ["pearson_from_sums"],
    "ssim": ["SSIM_K1", "SSIM_K2", "SSIM_MIN_RANGE", "SSIM_MIN_TISSUE", "SSIM_WIN", "ssim_images", "ssim_per_tile"],
    "stream": [
        "CountAccumulator",
        "GeneMetrics",
        "PearsonAccumulator",
        "SpearmanAccumulator",
        "TileMetricAccumulator",
        "check_batch",
        "evaluate_stream",
    ],
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)


@dataclass(frozen=True)
class MetricSpec:
    """What the workflow needs to know of a per-gene score.

    ``relative_ok``: defined for a ranking model's relative scores (correlations are; SSIM on
    min-max scaled maps, the rate ratio and the deviance need rates on the count scale).
    ``similarity``: higher is better and 0 is chance, so a fraction of the ceiling means something.
    """

    relative_ok: bool
    similarity: bool


_CORRELATION = MetricSpec(relative_ok=True, similarity=True)
#: Every score of an evaluation (columns of ``per_gene.csv``, each with its null and ceiling).
METRICS = {
    **{
        f"{m}_{um}_{p}": _CORRELATION
        for m in ("pcc", "scc")
        for um in ("2um", "4um", "8um", "16um")
        for p in ("pooled", "pertile")
    },  # fmt: skip
    "ssim_2um_pertile": MetricSpec(relative_ok=False, similarity=True),
    "ratio_pooled": MetricSpec(relative_ok=False, similarity=False),
    "deviance_pooled": MetricSpec(relative_ok=False, similarity=False),
}


__all__ = [
    "DEVIANCE_EPS",
    "METRICS",
    "SSIM_K1",
    "SSIM_K2",
    "SSIM_MIN_RANGE",
    "SSIM_MIN_TISSUE",
    "SSIM_WIN",
    "CountAccumulator",
    "GeneMetrics",
    "MetricSpec",
    "PearsonAccumulator",
    "SpearmanAccumulator",
    "TileMetricAccumulator",
    "average_ranks",
    "check_batch",
    "correct_split_half",
    "evaluate_stream",
    "noise_ceiling",
    "pearson_from_sums",
    "pearson_per_tile",
    "shuffle_pairs",
    "spearman_brown",
    "spearman_per_tile",
    "split_half_thinning",
    "ssim_images",
    "ssim_per_tile",
]
