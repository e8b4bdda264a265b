"""The `diffusion:` config section: every key, its default and its check, in one place."""

import copy
import numbers

from ..errors import InputError

#: Defaults of every key of the `diffusion:` section. Lengths are in um, windows in 2 um bins.
DEFAULTS = {
    "diffusion_length_um": None,  # None: estimated from the tissue edge (estimate.py); a number: used as is
    "truncate": 4.0,  # transport kernel support, in diffusion lengths
    "halo": 6.0,  # window halo, in diffusion lengths (chunked = un-chunked within the stated tolerance)
    "window_bins": 256,  # core edge of the windows the whole sample is corrected in
    "sinkhorn_iterations": 20,  # L1 change of p from 20 to 200 iterations: < 1e-4 relative for eps >= 0.3
    "rho": 1.0,  # KL strength pulling the plan's target marginal towards the soft-thresholded sources
    "beta": 50.0,  # sigmoid sharpness of the soft threshold (seed 003)
    "source_floor": 1.0,  # background prior of each bin's source mass, x the gene's mean count per tissue bin
    "quantile_init": "moran",  # "moran": per gene, the cutoff maximising Moran's I (seed 003); or one q in (0, 1)
    "quantile_bandwidth": 0.5,  # smooth-CDF bandwidth of the differentiable quantile, in counts
    "tissue_cost": 1.0,  # initial lam: cost of moving mass onto a bin outside the tissue
    "eps": 1.0,  # initial per-gene entropic regularisation
    "loss_weights": {"image": 1.0, "outside": 1.0, "moran": 1.0},
    "image_channel": "haematoxylin",  # H&E channel the expression is aligned with: haematoxylin or darkness
    "fit_windows": 4,  # windows the learnable parameters are fitted on
    "fit_window_bins": 40,
    "fit_steps": 10,
    "learning_rate": 0.1,
    "rl_iterations": 20,  # Richardson-Lucy baseline (validation only)
    "seed": 0,
    "threads": 1,  # torch CPU threads
}

CHANNELS = ("haematoxylin", "darkness")
LOSS_TERMS = ("image", "outside", "moran")
_POSITIVE = ("truncate", "halo", "rho", "beta", "quantile_bandwidth", "eps", "learning_rate")
_NON_NEGATIVE = ("tissue_cost", "source_floor")
_COUNTS = {"window_bins": 16, "sinkhorn_iterations": 1, "fit_windows": 1, "fit_window_bins": 8, "threads": 1}
_NON_NEGATIVE_INT = ("fit_steps", "rl_iterations", "seed")


def _number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _integer(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_settings(settings=None, where="diffusion"):
    """The `diffusion:` section merged over `DEFAULTS`, every value checked.

    Parameters
    ----------
    settings
        Mapping of overrides (None: all defaults). `loss_weights` may give some terms only.
    where
        Config key prefix named in errors.

    Returns
    -------
    dict
        Every key, explicit.

    Raises
    ------
    InputError
        Naming the first unknown key or bad value, e.g. ``diffusion.rho: must be a positive number``.
    """
    settings = dict(settings or {})
    out = copy.deepcopy(DEFAULTS)
    for key, value in settings.items():
        if key not in DEFAULTS:
            raise InputError(f"{where}.{key}", f"unknown key (known: {', '.join(sorted(DEFAULTS))})")
        if key == "loss_weights":
            out[key] = _loss_weights(value, f"{where}.{key}")
        else:
            out[key] = value
    for key in _POSITIVE:
        if not _number(out[key]) or not out[key] > 0:
            raise InputError(f"{where}.{key}", f"must be a positive number, got {out[key]!r}")
    for key, low in _COUNTS.items():
        if not _integer(out[key]) or out[key] < low:
            raise InputError(f"{where}.{key}", f"must be an integer >= {low}, got {out[key]!r}")
    for key in _NON_NEGATIVE_INT:
        if not _integer(out[key]) or out[key] < 0:
            raise InputError(f"{where}.{key}", f"must be an integer >= 0, got {out[key]!r}")
    for key in _NON_NEGATIVE:
        if not _number(out[key]) or out[key] < 0:
            raise InputError(f"{where}.{key}", f"must be a number >= 0, got {out[key]!r}")
    length = out["diffusion_length_um"]
    if length is not None and (not _number(length) or not length > 0):
        raise InputError(
            f"{where}.diffusion_length_um", f"must be null (estimate) or a positive number, got {length!r}"
        )
    qi = out["quantile_init"]
    if qi != "moran" and (not _number(qi) or not 0 < qi < 1):
        raise InputError(f"{where}.quantile_init", f"must be 'moran' or a number in (0, 1), got {qi!r}")
    if out["image_channel"] not in CHANNELS:
        raise InputError(
            f"{where}.image_channel", f"must be one of {', '.join(CHANNELS)}, got {out['image_channel']!r}"
        )
    if out["halo"] < out["truncate"]:
        raise InputError(f"{where}.halo", f"must be at least truncate ({out['truncate']}), got {out['halo']!r}")
    return out


def _loss_weights(value, where):
    if not isinstance(value, dict):
        raise InputError(where, f"must be a mapping of {', '.join(LOSS_TERMS)} to weights, got {value!r}")
    out = dict(DEFAULTS["loss_weights"])
    for term, weight in value.items():
        if term not in LOSS_TERMS:
            raise InputError(f"{where}.{term}", f"unknown loss term (known: {', '.join(LOSS_TERMS)})")
        if not _number(weight) or weight < 0:
            raise InputError(f"{where}.{term}", f"must be a number >= 0, got {weight!r}")
        out[term] = float(weight)
    return out
