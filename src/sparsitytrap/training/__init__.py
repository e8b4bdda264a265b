"""One (model, fold) training job: decoder on frozen-encoder tokens, validated on held-out blocks.

Files written by :func:`fit` in ``out_dir`` (all atomically):

``checkpoint.pt``
    Rewritten after every epoch (see :mod:`.checkpoint`). A job killed mid-training and started
    again continues from its last completed epoch and ends with the same numbers (on the CPU)
    as an uninterrupted run.
``log.csv``
    One row per epoch: epoch, train_loss, val_loss, val_pcc_2um, val_pcc_8um, lr_first,
    lr_last, best, seconds.
``best.safetensors``
    Weights of the epoch with the lowest validation loss, with the metadata needed to rebuild
    the decoder (see :func:`sparsitytrap.predict.load_model`).
``metrics_val.json``
    Best epoch and its validation metrics, epochs run, early stop, the training/validation
    tiles. Written last: its presence marks a finished training.

The test patient is never opened here: :func:`fit` receives only the training samples' paths;
the workflow's ``predict`` rule is the first job that reads it.

Modules: :mod:`.data` (tiles and the validation split), :mod:`.schedule` (learning rate, seeds,
determinism), :mod:`.loop` (epochs, steps, validation), :mod:`.checkpoint` (what is saved and
restored), :mod:`.job` (set-up, outputs, :func:`fit`).
"""

from .data import TileDataset, split_samples
from .job import LOG_COLUMNS, fit
from .schedule import lr_factor

__all__ = ["LOG_COLUMNS", "TileDataset", "fit", "lr_factor", "split_samples"]
