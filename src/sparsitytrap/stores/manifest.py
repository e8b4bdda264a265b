"""Every store the workflow writes records what it holds; every stage that opens one checks it.

``manifest.json`` at the store's root lists, per array (every folder holding a ``zarr.json`` with
``"node_type": "array"``), its chunk files with their size and CRC-32. Snakemake cannot see a
chunk deleted or truncated inside a finished store (its mtime does not change), and zarr reads a
missing chunk as its fill value: without this check a damaged store gives wrong numbers silently.
:func:`verify` refuses such a store with one line naming the store and the array.
"""

import json
import os
import zlib
from pathlib import Path

from ..errors import InputError

NAME = "manifest.json"
VERSION = 1
_BLOCK = 1 << 22


def _crc(path):
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def _arrays(root):
    """Array folders of a zarr v3 hierarchy, relative to its root."""
    for meta in sorted(root.rglob("zarr.json")):
        if json.loads(meta.read_text()).get("node_type") == "array":
            yield meta.parent


def _chunks(array_dir):
    """Chunk files of one array (everything but its metadata), relative to the array, sorted."""
    for dirpath, _, files in os.walk(array_dir):
        for name in files:
            path = Path(dirpath) / name
            if path.parent == array_dir and name == "zarr.json":
                continue
            yield path.relative_to(array_dir).as_posix()


def describe(store):
    """``{array: {chunk: [size, crc32]}}`` of a store as it is on disk."""
    root = Path(store)
    out = {}
    for array in _arrays(root):
        chunks = sorted(_chunks(array))
        out[array.relative_to(root).as_posix()] = {c: [(array / c).stat().st_size, _crc(array / c)] for c in chunks}
    return out


def write(store):
    """Record what ``store`` holds (call it last, on the temporary path, before the rename)."""
    root = Path(store)
    (root / NAME).write_text(json.dumps({"version": VERSION, "arrays": describe(root)}) + "\n")


_VERIFIED = set()


def verify(store, arrays=None):
    """Refuse a store whose chunks differ from its manifest: missing, extra, truncated or altered.

    Parameters
    ----------
    store
        The store's root folder.
    arrays
        Only these arrays (names relative to the root); default every array of the manifest.
    """
    root = Path(store)
    path = root / NAME
    if not path.is_file():
        raise InputError(root, f"no {NAME}: not written by this workflow, or written before stores were checked")
    stat = path.stat()
    key = (str(root.resolve()), stat.st_mtime_ns, stat.st_size, tuple(arrays or ()))
    if key in _VERIFIED:  # once per process: a stage may open the same store many times
        return
    recorded = json.loads(path.read_text())["arrays"]
    for name in arrays if arrays is not None else recorded:
        chunks = recorded.get(name)
        where = f"{root} (array {name!r})"
        if chunks is None:
            raise InputError(where, f"the manifest lists no array {name!r}")
        present = set(_chunks(root / name)) if (root / name).is_dir() else set()
        missing, extra = sorted(set(chunks) - present), sorted(present - set(chunks))
        if missing:
            raise InputError(where, f"{len(missing)} chunk(s) missing, e.g. {missing[0]}: the store is damaged")
        if extra:
            raise InputError(
                where, f"{len(extra)} chunk(s) not in the manifest, e.g. {extra[0]}: the store was altered"
            )
        for chunk, (size, crc) in chunks.items():
            file = root / name / chunk
            if file.stat().st_size != size or _crc(file) != crc:
                raise InputError(where, f"chunk {chunk} differs from the manifest (truncated or altered)")
    _VERIFIED.add(key)
