"""The spatially contiguous validation split of a fold's training patients.

Folds themselves (named by their test sample, ``test-P1``) are
:func:`sparsitytrap.config.fold_names` and :func:`~sparsitytrap.config.fold_samples`. Model
selection and early stopping use validation tiles drawn from the *training* patients only, as
contiguous blocks of the 256 um tile grid, so that validation tiles are not the spatial
neighbours of training tiles on every side (the seeds drew them at random from adjacent tiles).
"""

import numpy as np

from .errors import InputError


def validation_split(grid, val_fraction=0.2, block_tiles=2, seed=0):
    """Hold out contiguous blocks of one patient's tiles for validation.

    The tile grid is cut into ``block_tiles x block_tiles`` blocks; blocks are drawn in a seeded
    random order and assigned to validation until about ``val_fraction`` of the tiles are. A
    patient with at least two tiles always keeps at least one validation and one training tile
    (if no whole block fits, single tiles are used instead of blocks).

    Parameters
    ----------
    grid
        ``[T, 2]`` integer (row, col) tile positions on the 256 um grid (tile store ``grid``).
    val_fraction
        Target share of tiles in validation, in (0, 1).
    block_tiles
        Side of a validation block, in tiles.
    seed
        Seed of the block order.

    Returns
    -------
    numpy.ndarray
        ``[T]`` bool, True for validation tiles.
    """
    grid = np.asarray(grid)
    if grid.ndim != 2 or grid.shape[1] != 2:
        raise InputError("grid", f"tile positions must have shape [T, 2], got {list(grid.shape)}")
    if not 0 < val_fraction < 1:
        raise InputError("training.val_fraction", f"must be in (0, 1), got {val_fraction}")
    if int(block_tiles) < 1:
        raise InputError("training.val_block_tiles", f"must be >= 1, got {block_tiles}")
    n = len(grid)
    is_val = np.zeros(n, dtype=bool)
    if n < 2:
        return is_val
    target = max(1, int(round(val_fraction * n)))
    for side in (int(block_tiles), 1):
        is_val = _take_blocks(grid, side, target, seed)
        if 0 < is_val.sum() < n:
            return is_val
    raise AssertionError("single-tile blocks always give a split")  # pragma: no cover


def _take_blocks(grid, side, target, seed):
    """Blocks in seeded order until `target` tiles, never leaving a patient without training tiles.

    A first pass takes only blocks that fit under `target` (partial edge blocks fill the rest);
    a second pass may overshoot to reach it.
    """
    _, block = np.unique(grid // side, axis=0, return_inverse=True)
    block = block.ravel()
    order = np.random.default_rng(seed).permutation(block.max() + 1)
    is_val = np.zeros(len(grid), dtype=bool)
    for may_overshoot in (False, True):
        for b in order:
            members = block == b
            if is_val.sum() >= target or (is_val & members).any():
                continue
            grown = is_val | members
            if grown.all() or (grown.sum() > target and not may_overshoot):
                continue
            is_val = grown
    return is_val
