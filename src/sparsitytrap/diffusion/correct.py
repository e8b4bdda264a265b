"""The whole-sample driver: diffusion length, fitting on a sample of windows, chunked correction.

1. The diffusion length: `diffusion.diffusion_length_um`, or estimated from the tissue edge.
2. Fitting: `fit_windows` windows of `fit_window_bins` bins (seeded choice among those with at
   least 25 % tissue), each with a halo of one kernel radius; the learnable parameters are
   fitted there (`model.fit`).
3. Correction: the grid is cut into `window_bins` x `window_bins` cores, each solved with a halo
   of `halo` diffusion lengths and only its core kept. Mass the plan puts on bins outside the
   tissue is removed (and reported per gene); the corrected field is zero there. Memory is one
   window of all genes (plus the sparse non-zeros of the input), time linear in the bins.
"""

import contextlib
import math
import time

import numpy as np
import torch

from .estimate import estimate_diffusion_length
from .inputs import arrays_input, crop, sample_input
from .model import DiffusionModel, Window, fit, initial_quantiles
from .settings import check_settings
from .store import REPORT_ATTRS, create_corrected, row_major

MIN_FIT_TISSUE = 0.25  # fitting windows hold at least this fraction of tissue bins
EDGE_TISSUE = 0.9  # ... and below this fraction they count as edge windows


@contextlib.contextmanager
def _torch_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def diffusion_length(inp, settings):
    """(length in um, how it was obtained): the configured value, or the edge-profile estimate."""
    if settings["diffusion_length_um"] is not None:
        value = float(settings["diffusion_length_um"])
        return value, {"method": "configured (diffusion.diffusion_length_um)", "diffusion_length_um": value}
    info = estimate_diffusion_length(inp.totals, inp.tissue, inp.observed, bin_um=inp.bin_um, where=inp.name)
    return info["diffusion_length_um"], info


# ---------------------------------------------------------------- fitting windows
def fit_positions(tissue, size, n, seed):
    """Top-left corners of `n` windows of `size` bins, seeded, among those with enough tissue."""
    H, W = tissue.shape
    cs = np.pad(tissue.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    r = np.arange(0, H - size + 1, size)
    c = np.arange(0, W - size + 1, size)
    rr, cc = np.meshgrid(r, c, indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    frac = (cs[rr + size, cc + size] - cs[rr, cc + size] - cs[rr + size, cc] + cs[rr, cc]) / size**2
    ok = np.flatnonzero(frac >= MIN_FIT_TISSUE)
    if ok.size == 0:
        ok = np.array([int(np.argmax(frac))])
    # Half the windows on the tissue edge (where the out-of-tissue term and lam are informative),
    # half anywhere else with tissue.
    edge = ok[frac[ok] < EDGE_TISSUE]
    rng = np.random.default_rng(seed)
    n_edge = min(edge.size, -(-n // 2))
    pick = rng.choice(edge, size=n_edge, replace=False) if n_edge else np.zeros(0, int)
    rest = np.setdiff1d(ok, pick)
    pick = np.sort(np.concatenate([pick, rng.choice(rest, size=min(n - n_edge, rest.size), replace=False)]))
    return [(int(rr[k]), int(cc[k])) for k in pick]


def fit_windows(inp, active, radius, settings):
    """The fitting windows as tensors; the image channel scaled to [0, 1] by its 1-99 % range on tissue."""
    size = min(settings["fit_window_bins"], *inp.shape)
    support = np.ones(inp.shape, np.float32)
    use_image = inp.image is not None and settings["loss_weights"]["image"] > 0
    windows, images = [], []
    for r0, c0 in fit_positions(inp.tissue, size, settings["fit_windows"], settings["seed"]):
        R0, C0, n = r0 - radius, c0 - radius, size + 2 * radius
        x = torch.from_numpy(inp.window(R0, C0, n, n)[active])
        tissue = torch.from_numpy(crop(inp.tissue, R0, C0, n, n).astype(np.float32))
        windows.append(Window(x, tissue, torch.from_numpy(crop(support, R0, C0, n, n)), None, radius))
        images.append(inp.image(R0, C0, n) if use_image else None)
    if use_image:
        on_tissue = np.concatenate([w.core(img)[w.core(w.tissue.numpy()) > 0] for w, img in zip(windows, images)])
        lo, hi = np.percentile(on_tissue, [1, 99]) if on_tissue.size else (0.0, 1.0)
        for w, img in zip(windows, images):
            w.image = torch.from_numpy(np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32))
    return windows


# ---------------------------------------------------------------- chunked correction
def apply_windows(model, inp, active, settings, length_um, emit):
    """Correct the whole grid window by window; `emit(r0, c0, field [G, h, w])` receives each core.

    Returns the mass per gene the plan put on bins outside the tissue (removed), float64 [G].
    """
    T = settings["window_bins"]
    halo = max(model.radius if model else 1, math.ceil(settings["halo"] * length_um / inp.bin_um))
    H, W = inp.shape
    G = len(inp.genes)
    removed = np.zeros(G)
    support = np.ones(inp.shape, np.float32)
    for r0 in range(0, H, T):
        for c0 in range(0, W, T):
            h, w = min(T, H - r0), min(T, W - c0)
            out = np.zeros((G, h, w), np.float32)
            R0, C0, hh, ww = r0 - halo, c0 - halo, h + 2 * halo, w + 2 * halo
            x = inp.window(R0, C0, hh, ww)[active]
            if model is not None and x.any():
                tissue = torch.from_numpy(crop(inp.tissue, R0, C0, hh, ww).astype(np.float32))
                with torch.no_grad():
                    p = model(torch.from_numpy(x), tissue, torch.from_numpy(crop(support, R0, C0, hh, ww)))
                p = p[:, halo : halo + h, halo : halo + w].double()
                t = tissue[halo : halo + h, halo : halo + w].double()
                removed[active] += (p * (1 - t)).sum((1, 2)).numpy()
                out[active] = (p * t).float().numpy()
            emit(r0, c0, out)
    return removed


def correct_input(inp, settings, emit, length=None):
    """Fit and apply the correction to a GridInput; returns the report (see `correct_sample`).

    `length`: (um, info) from `diffusion_length` when already known.
    """
    t0 = time.perf_counter()
    settings = check_settings(settings)
    torch.manual_seed(settings["seed"])
    length_um, length_info = length or diffusion_length(inp, settings)
    observed = inp.stats.total
    active = np.flatnonzero(observed > 0)
    empty = [inp.genes[g] for g in np.flatnonzero(observed <= 0)]
    model, history = None, []
    with _torch_threads(settings["threads"]):
        if active.size:
            model, history = _fit(inp, active, length_um, settings)
        corrected = np.zeros(len(inp.genes))

        def collect(r0, c0, field):
            corrected[:] += field.sum(axis=(1, 2), dtype=np.float64)
            emit(r0, c0, field)

        removed = apply_windows(model, inp, active, settings, length_um, collect)
    return _report(
        inp, settings, model, active, empty, history, length_um, length_info, observed, corrected, removed, t0
    )


def _fit(inp, active, length_um, settings):
    radius = max(1, math.ceil(settings["truncate"] * length_um / inp.bin_um))
    windows = fit_windows(inp, active, radius, settings)
    stats = inp.stats.subset(active)
    if settings["quantile_init"] == "moran":
        q_init, _ = initial_quantiles(windows, stats, settings["beta"], settings["quantile_bandwidth"])
    else:
        q_init = np.full(len(active), float(settings["quantile_init"]))
    model = DiffusionModel(stats, q_init, length_um, settings, n_tissue_bins=int((inp.tissue & inp.observed).sum()))
    return model, fit(model, windows, settings)


def _report(inp, settings, model, active, empty, history, length_um, length_info, observed, corrected, removed, t0):
    genes = inp.genes
    per_gene = {g: {} for g in genes}
    fitted_global = {}
    if model is not None:
        fitted_global, fitted = model.fitted()
        for k, g in enumerate(active):
            per_gene[genes[g]] = {key: float(v[k]) for key, v in fitted.items()}
    return {
        "sample": inp.name,
        "genes": list(genes),
        "diffusion_length_um": float(length_um),
        "diffusion_length": length_info,
        "observed_mass": dict(zip(genes, observed.astype(float).tolist())),
        "corrected_mass": dict(zip(genes, corrected.tolist())),
        "removed_mass": dict(zip(genes, removed.tolist())),
        "removed_fraction": {g: float(r / o) if o > 0 else 0.0 for g, r, o in zip(genes, removed, observed)},
        "conservation_error": dict(zip(genes, (observed - corrected - removed).tolist())),
        "fitted": {"global": fitted_global, "genes": per_gene},
        "empty_genes": empty,
        "fit_history": history,
        "radius_bins": int(model.radius) if model is not None else 0,
        "settings": settings,
        "seconds": round(time.perf_counter() - t0, 3),
    }


# ---------------------------------------------------------------- public drivers
def correct_arrays(counts, tissue, image=None, *, observed=None, settings=None, genes=None):
    """Correct dense in-memory arrays (tests, benchmark): counts [G, H, W] -> (corrected [G, H, W], report).

    `image` is an H&E channel already on the bin grid [H, W] (None: no image term).
    """
    inp = arrays_input(counts, tissue, image, observed=observed, genes=genes)
    out = np.zeros((len(inp.genes), *inp.shape), np.float32)

    def emit(r0, c0, field):
        out[:, r0 : r0 + field.shape[1], c0 : c0 + field.shape[2]] = field

    return out, correct_input(inp, settings, emit)


def correct_sample(sdata_zarr, genes, out_zarr, *, dataset_id=None, settings=None):
    """Correct the listed genes of an ingested sample and write the corrected store atomically.

    Parameters
    ----------
    sdata_zarr
        SpatialData store written by `sparsitytrap.ingest.ingest` (table ``square_002um`` and
        the image ``{dataset_id}_full_image``).
    genes
        Gene names (their order is the store's column order).
    out_zarr
        Corrected store to write (`store.py` layout).
    dataset_id
        Sample id; inferred from the table when None.
    settings
        The `diffusion:` config section (see `DEFAULTS`).

    Returns
    -------
    dict
        Report: per-gene observed, corrected and removed mass (and conservation error), fitted
        parameters, diffusion length (and how it was obtained), empty genes, fit history,
        seconds.

    Raises
    ------
    InputError
        Before anything is written: a bad setting, no tissue bin, a gene not in the table, an
        image missing or not covering the tissue, a diffusion length that cannot be estimated.
        A gene with no counts is not an error: it stays all zero and is listed in `empty_genes`.
    """
    settings = check_settings(settings)
    t0 = time.perf_counter()
    inp, bins, sample = sample_input(
        sdata_zarr, genes, dataset_id=dataset_id, window_bins=settings["window_bins"], channel=settings["image_channel"]
    )
    length = diffusion_length(inp, settings)  # fails before the store is created
    order = row_major(bins["array_row"], bins["array_col"], inp.shape[1])
    rows, cols = bins["array_row"][order], bins["array_col"][order]
    sink = _BandSink(rows, cols, inp.shape, settings["window_bins"], len(inp.genes))
    with create_corrected(
        out_zarr,
        sample=sample,
        genes=inp.genes,
        grid_shape=inp.shape,
        array_row=rows,
        array_col=cols,
        in_tissue=bins["in_tissue"][order] > 0,
        obs_index=order,
    ) as writer:
        sink.writer = writer
        report = correct_input(inp, settings, sink.emit, length)
        sink.flush()
        report["seconds"] = round(time.perf_counter() - t0, 3)
        writer.finish({k: report[k] for k in REPORT_ATTRS})
    return report


class _BandSink:
    """Collects window cores into a band of grid rows; writes the band's bins as CSR rows when full."""

    def __init__(self, rows, cols, shape, window_bins, n_genes):
        self.rows, self.cols, self.shape, self.T, self.G = rows, cols, shape, window_bins, n_genes
        self.writer, self.band, self.r0, self.filled = None, None, None, 0

    def emit(self, r0, c0, field):
        if self.band is None:
            self.band = np.zeros((self.G, field.shape[1], self.shape[1]), np.float32)
            self.r0, self.filled = r0, 0
        self.band[:, :, c0 : c0 + field.shape[2]] = field
        self.filled += field.shape[2]
        if self.filled == self.shape[1]:
            self.flush()

    def flush(self):
        if self.band is None:
            return
        lo, hi = np.searchsorted(self.rows, [self.r0, self.r0 + self.band.shape[1]])
        values = self.band[:, self.rows[lo:hi] - self.r0, self.cols[lo:hi]].T  # [bins, genes]
        nz = values != 0
        self.writer.append(nz.sum(axis=1), np.nonzero(nz)[1], values[nz])
        self.band = None
