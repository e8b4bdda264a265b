"""Training curves, read from each (model, fold)'s ``log.csv`` (and ``metrics_val.json``: what ended the job)."""

import json
from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from ..errors import InputError
from ._common import FORMATS, require, save, suptitle


def training_curves(log_csvs, out_prefix, formats=FORMATS):
    """Training and validation loss per epoch (and the other ``val_*`` columns), one column per model.

    Parameters
    ----------
    log_csvs
        ``results/models/{model}/{fold}/log.csv`` files; model and fold are read from the path.
        ``metrics_val.json`` files among them (the same jobs') add what ended each job, written
        in the model's bottom panel.
    out_prefix
        Output path without extension.
    formats
        File formats.

    Returns
    -------
    matplotlib.figure.Figure
    """
    logs, records, dirs = [], {}, {}
    for path in map(Path, log_csvs):
        if path.name == "metrics_val.json":
            records[path.parent] = _job_record(path)
            continue
        df = pd.read_csv(path)
        require(df, ["epoch", "train_loss", "val_loss"], path)
        logs.append((path.parent.parent.name, path.parent.name, df))
        dirs[(path.parent.parent.name, path.parent.name)] = path.parent
    if not logs:
        raise InputError("log_csvs", "no log.csv files given")
    models = list(dict.fromkeys(mo for mo, _, _ in logs))
    folds = sorted({f for _, f, _ in logs})
    extra = sorted({c for _, _, df in logs for c in df.columns if c.startswith("val_") and c != "val_loss"})
    colours = dict(zip(folds, sns.color_palette("tab10", len(folds))))
    fig = Figure(figsize=(3.2 * len(models), 2.6 * (1 + len(extra))), layout="constrained")
    axes = fig.subplots(1 + len(extra), len(models), squeeze=False)
    for j, mo in enumerate(models):
        for m2, fold, df in logs:
            if m2 != mo:
                continue
            ax = axes[0, j]
            ax.plot(df["epoch"], df["train_loss"], color=colours[fold], label=f"{fold} train")
            ax.plot(df["epoch"], df["val_loss"], color=colours[fold], ls="--", label=f"{fold} validation")
            for i, col in enumerate(extra, start=1):
                if col in df:
                    axes[i, j].plot(df["epoch"], df[col], color=colours[fold], ls="--", label=fold)
        _off_scale(axes[0, j], [df for m2, _, df in logs if m2 == mo])
        _endings(axes[-1, j], {f: records[d] for (m2, f), d in dirs.items() if m2 == mo and d in records}, colours)
        axes[0, j].set_title(mo, fontsize=8)
        axes[0, j].set_ylabel("loss (model's own)")
        for i, col in enumerate(extra, start=1):
            axes[i, j].set_ylabel(col)
        axes[-1, j].set_xlabel("epoch")
    axes[0, 0].legend(fontsize=6)
    suptitle(
        fig, "Training (solid) and validation (dashed: held-out blocks of the training patients) per fold", fontsize=9
    )
    save(fig, out_prefix, formats)
    return fig


def _job_record(path):
    """A training job's ``metrics_val.json``, with the keys the panel writes."""
    try:
        v = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise InputError(path, f"unreadable training record ({err})") from None
    missing = [k for k in ("epochs_run", "best_epoch") if k not in v]
    if missing:
        raise InputError(path, f"missing {missing}: not a training job's metrics_val.json")
    return v


def _endings(ax, records, colours):
    """Write what ended each fold's job (``metrics_val.json``: stop, epochs run, best epoch), in its colour."""
    for i, (fold, v) in enumerate(sorted(records.items(), reverse=True)):
        stop = v.get("stop") or ("patience" if v.get("stopped_early") else "cap")
        text = f"{fold}: {stop}, {v['epochs_run']} epochs, best {v['best_epoch']}"
        ax.text(0.98, 0.03 + 0.09 * i, text, transform=ax.transAxes, ha="right", va="bottom", fontsize=5,
                color=colours.get(fold, "black"))  # fmt: skip


#: A loss this many times the spread of the values below it is drawn off scale.
OFF_SCALE = 10.0


def _spikes(logs):
    """Loss values (train or validation, any epoch) far above the rest: ``(kept, spikes)``.

    The largest value is a spike while it exceeds the next largest by more than :data:`OFF_SCALE`
    times the spread of the values below it; peeled off one at a time. Each point is
    ``(value, "train" | "validation", epoch)``.
    """
    points = sorted(
        (float(v), name, int(e))
        for df in logs
        for col, name in (("train_loss", "train"), ("val_loss", "validation"))
        for e, v in zip(df["epoch"], df[col])
        if pd.notna(v)
    )
    spikes = []
    while len(points) > 2:
        low, high = points[0][0], points[-2][0]
        if points[-1][0] <= high + OFF_SCALE * max(high - low, 1e-12 * abs(high)):
            break
        spikes.append(points.pop())
    return points, spikes


def _off_scale(ax, logs):
    """Keep a loss panel on the plateau: a spike (one exploding batch, seen in warm-up) would
    flatten every other curve, so the axis stops above the rest and the largest spike is written."""
    kept, spikes = _spikes(logs)
    if not spikes:
        return
    low, high = kept[0][0], kept[-1][0]
    pad = 0.05 * (high - low)
    ax.set_ylim(low - pad, high + pad)
    value, name, epoch = spikes[0]
    more = f" (+{len(spikes) - 1} more)" if len(spikes) > 1 else ""
    ax.text(
        0.98,
        0.98,
        f"epoch {epoch} {name} loss off scale: {value:.3g}{more}",
        transform=ax.transAxes,
        ha="right",
        va="top",
        fontsize=6,
    )
