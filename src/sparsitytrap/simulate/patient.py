"""The patient writer: one simulated patient as a Space Ranger folder, its truth and its parameters.

Each output (`outs/`, `truth.zarr`, `params.json`) is written atomically, so a killed job never
leaves one that looks finished. The steps log their time and peak memory for the rule's log.
"""

import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ..io import atomic_path, write_json
from ..stores.truth import write_truth
from . import morphology
from .counts import sample_counts
from .diffusion import diffuse, diffusion_kernel
from .expression import PROGRAMMES, gene_loadings, programme_fields
from .image import pixel_frame, write_he
from .params import resolve_params

log = logging.getLogger(__name__)


def _progress(sample_id, what, t0):
    """Log a step with the time since t0 and the peak memory so far (the rule's log shows both)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    log.info("%s: %s at %.1f s, peak RSS %.0f MB", sample_id, what, time.perf_counter() - t0, peak)


def simulate_patient(out_root, sample_id, params=None):
    """Simulate one patient: Space Ranger outs/, truth.zarr and params.json under out_root.

    Parameters
    ----------
    out_root
        Patient folder; `outs/` (Visium HD layout), `truth.zarr` and `params.json` are written in
        it, each atomically.
    sample_id
        Dataset id (file prefixes in outs/).
    params
        Overrides of `DEFAULT_PARAMS` (may name a `preset`), see `resolve_params`.
    """
    t0 = time.perf_counter()
    p = resolve_params(params)
    out_root = Path(out_root)
    tissue, labels, in_tissue, und = _geometry(p)
    kernel = diffusion_kernel(p["bin_um"], **p["diffusion"])
    dif = diffuse(und, kernel)
    _progress(sample_id, "geometry and programmes", t0)
    names, cats, loadings = gene_loadings(p)
    _progress(sample_id, f"{len(names)} gene loadings", t0)
    counts = sample_counts(dif, loadings, p["capture_efficiency"], p["seed"], p["counts_block_rows"])
    _progress(sample_id, f"{counts.sum()} UMIs drawn", t0)
    A, shape = _write_outs(out_root, sample_id, p, tissue, counts, names, in_tissue, t0)
    _progress(sample_id, "Space Ranger folder written", t0)
    write_truth(
        out_root / "truth.zarr",
        undiffused=und,
        diffused=dif,
        loadings=loadings,
        gene_names=names,
        categories=cats,
        capture_efficiency=p["capture_efficiency"],
        kernel=kernel,
        in_tissue=in_tissue,
        compartments=labels,
        programme_names=PROGRAMMES,
        compartment_names=morphology.LABELS,
        dense_max=p["dense_truth_max"],
    )
    _progress(sample_id, "truth written", t0)
    derived = {"bin_to_pixel": A.tolist(), "fullres_shape": list(shape)}
    derived.update(_summary(p, tissue, kernel, names, counts, in_tissue))
    write_json({"sample_id": sample_id, "params": p, "derived": derived}, out_root / "params.json")
    _progress(sample_id, "done", t0)


def _geometry(p):
    """Tissue, its half-bin label map, the in-tissue bins (flat) and the undiffused programmes.

    The compartment fractions die here: at full scale they are the largest arrays of the run.
    """
    n_rows, n_cols, b = p["n_rows"], p["n_cols"], p["bin_um"]
    tissue, labels, frac = morphology.generate_tissue(n_rows, n_cols, b, p["seed"], p["morphology"])
    in_tissue = (frac["background"] <= 0.5).ravel()
    und = programme_fields(frac, tissue.cell_counts(n_rows, n_cols, b), b)
    return tissue, labels, in_tissue, und


def _write_outs(out_root, sample_id, p, tissue, counts, names, in_tissue, t0):
    """Write outs/ (counts, positions, H&E); return the bin-to-pixel affine and the image shape."""
    from ..spaceranger import write_sample

    A, rot, offset, shape = pixel_frame(p)
    out_root.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_root / "outs") as outs, tempfile.TemporaryDirectory(dir=out_root, prefix=".image-") as stage:
        tif, hires, lowres = write_he(stage, sample_id, tissue, p, rot, offset, shape)
        _progress(sample_id, f"H&E {shape} rendered", t0)
        write_sample(
            outs,
            sample_id,
            counts=counts,
            gene_ids=names,
            gene_names=names,
            n_rows=p["n_rows"],
            n_cols=p["n_cols"],
            in_tissue=in_tissue,
            bin_to_pixel=A,
            microns_per_pixel=p["microns_per_pixel"],
            fullres_shape=shape,
            hires_image=hires,
            lowres_image=lowres,
        )
        shutil.move(tif, Path(outs) / tif.name)
    return A, shape


def _summary(p, tissue, kernel, names, counts, in_tissue):
    """What params.json records beside the parameters: sizes, totals and sparsity of the patient."""
    umis = np.asarray(counts.sum(axis=1)).ravel()[in_tissue]
    nnz = np.diff(counts.indptr)[in_tissue]
    return {
        "pixels_per_bin": p["bin_um"] / p["microns_per_pixel"],
        "n_genes": len(names),
        "programmes": list(PROGRAMMES),
        "kernel_shape": list(kernel.shape),
        "n_glands": int(len(tissue.glands["x"])),
        "n_cells": int(len(tissue.cells["x"])),
        "n_in_tissue_bins": int(in_tissue.sum()),
        "total_umis": int(counts.sum()),
        "umis_per_in_tissue_bin": float(umis.mean()) if umis.size else 0.0,
        "zero_fraction_in_tissue": float(1 - nnz.sum() / max(1, nnz.size * len(names))),
    }
