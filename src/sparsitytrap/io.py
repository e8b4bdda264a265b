"""Atomic outputs: write to a temporary sibling, rename on success, remove on failure.

A killed or failing job never leaves a half-written file or store where Snakemake (or a user)
would take it for a finished output.
"""

import contextlib
import glob
import json
import os
import shutil
from pathlib import Path


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _remove_stale(path):
    """Remove temporaries of `path` left by a killed writer (``kill -9`` skips the cleanup below).

    Snakemake never runs two jobs with the same output at once, so any sibling temporary belongs
    to an earlier attempt that is dead.
    """
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        _remove(stale)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success move it to `path`, else delete it.

    Works for files and directories (zarr stores); an existing `path` is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    _remove(path)
    os.replace(tmp, path)


def write_json(obj, path):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_csv(df, path, **kwargs):
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, **kwargs)
