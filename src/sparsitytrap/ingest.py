"""Validate a Space Ranger Visium HD folder, read it with spatialdata-io, write SpatialData zarr.

The reader (``spatialdata_io.visium_hd``) fails on bad folders with bare assertions or
KeyErrors deep inside; :func:`validate_spaceranger` checks every requirement first and names
the file and the fault. It reads only what it needs (parquet schema and columns, HDF5 barcodes,
JSON, image headers), so it stays cheap on 10 million bins.

:func:`ingest` reads the 2 um bins only and lets arrow return what the reader's parquet read
frees (`_arrow_returns_memory`): a full capture area then peaks at about 6.5 GiB, not 9.1.
"""

import contextlib
import json
import re
import warnings
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import InputError
from .io import atomic_path
from .spaceranger import MATRIX_FILE, POSITION_COLUMNS, POSITIONS_FILE, SCALEFACTORS_FILE, bin_folder
from .stores import manifest

TILE_UM = 256.0  # the smallest usable image holds one tile
IMAGE_SUFFIXES = (".tif", ".tiff", ".btf", ".png", ".jpg", ".jpeg")


def validate_spaceranger(path, dataset_id, fullres_image=None):
    """Check a Space Ranger Visium HD ``outs`` folder before reading it.

    Parameters
    ----------
    path
        The ``outs`` folder.
    dataset_id
        Sample id: the feature slice file is ``{dataset_id}_feature_slice.h5`` (or unprefixed);
        None: the prefix of the folder's single ``*_feature_slice.h5``.
    fullres_image
        The full-resolution image when it is not in the folder.

    Returns
    -------
    pathlib.Path
        The full-resolution image file.

    Raises
    ------
    InputError
        Naming the first bad file and its fault.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(path, "not a folder (expected a Space Ranger 'outs' folder)")
    dataset_id = dataset_id or infer_dataset_id(path)
    _check_feature_slice(path, dataset_id)
    binned = path / "binned_outputs"
    if not binned.is_dir():
        archive = path / "binned_outputs.tar.gz"
        if archive.exists():
            raise InputError(archive, f"binned outputs are still archived: run 'tar -xzf {archive.name}' in {path}")
        raise InputError(binned, "missing folder")
    folders = sorted(p for p in binned.iterdir() if p.is_dir() and p.name.startswith("square_"))
    if bin_folder(2) not in [p.name for p in folders]:
        raise InputError(binned / bin_folder(2), "missing folder (the 2 um bins are required)")
    mpp = {folder.name: _check_bins(folder) for folder in folders}[bin_folder(2)]
    image = Path(fullres_image) if fullres_image else find_fullres_image(path, dataset_id)
    if not image.is_file():
        raise InputError(image, "full-resolution image (samples.*.fullres_image) does not exist")
    _check_image(image, mpp)
    return image


def _check_feature_slice(path, dataset_id):
    candidates = [path / f"{dataset_id}_feature_slice.h5", path / "feature_slice.h5"]
    found = [p for p in candidates if p.is_file()]
    if not found:
        raise InputError(candidates[0], "missing (neither it nor feature_slice.h5 is in the folder)")
    try:
        with h5py.File(found[0], "r") as f:
            metadata = json.loads(f.attrs["metadata_json"])
        layout = json.loads(metadata["hd_layout_json"])
        layout["file_format"]
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise InputError(found[0], f"no readable metadata_json/hd_layout_json/file_format ({err})") from None


def _check_bins(folder):
    """Check one ``square_XXXum`` folder; returns its microns per pixel."""
    matrix, spatial = folder / MATRIX_FILE, folder / "spatial"
    positions, factors_file = spatial / POSITIONS_FILE, spatial / SCALEFACTORS_FILE
    for needed in (matrix, positions, factors_file):
        if not needed.is_file():
            raise InputError(needed, "missing file")
    mpp = _check_scalefactors(factors_file, int(re.search(r"\d{3}", folder.name).group()))
    try:
        columns = pq.read_schema(positions).names
    except (OSError, pa.ArrowException) as err:
        raise InputError(positions, f"not a readable parquet file ({err})") from None
    if columns != POSITION_COLUMNS:
        raise InputError(positions, f"columns {columns}; expected exactly, in this order: {POSITION_COLUMNS}")
    table = pq.read_table(positions, columns=["barcode", "in_tissue"])
    if not pc.any(pc.greater(table["in_tissue"], 0)).as_py():
        raise InputError(positions, "no bin is in tissue (in_tissue is 0 everywhere)")
    _check_unique(table["barcode"], positions)
    codes = _matrix_barcodes(matrix)
    if len(codes) == 0:
        raise InputError(matrix, "no barcodes (no tissue bins)")
    _check_unique(codes, matrix)
    _check_counts(matrix, len(codes))
    missing = pc.invert(pc.is_in(codes, value_set=table["barcode"].combine_chunks()))
    n_missing = pc.sum(missing).as_py()
    if n_missing:
        example = pc.filter(codes, missing)[0].as_py()
        raise InputError(matrix, f"{n_missing} barcodes are not in {positions.name}, e.g. {example!r}")
    return mpp


def _check_unique(barcodes, path):
    """A barcode listed twice would give two rows for one bin (ingest then fails on the table's shape)."""
    counts = pc.value_counts(barcodes)
    twice = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(twice):
        raise InputError(path, f"{len(twice)} barcodes are listed more than once, e.g. {twice[0]['values'].as_py()!r}")


def _check_counts(path, n_barcodes, block=1 << 24):
    """The matrix holds counts: some, none negative, all whole numbers; its shape matches its barcodes.

    Streams ``matrix/data`` in blocks (143 M non-zeros of a full capture area: about 1 s).
    """
    with h5py.File(path, "r") as f:
        shape, data = tuple(int(s) for s in f["matrix/shape"][:]), f["matrix/data"]
        if shape[1] != n_barcodes:
            raise InputError(path, f"matrix/shape says {shape[1]} barcodes, matrix/barcodes lists {n_barcodes}")
        if data.shape[0] == 0:
            raise InputError(path, "the matrix holds no counts (0 non-zero entries)")
        whole = data.dtype.kind in "iu"
        for start in range(0, data.shape[0], block):
            values = data[start : start + block]
            if values.min() < 0:
                raise InputError(path, f"negative counts in matrix/data (minimum {values.min()})")
            if not whole and not np.array_equal(values, np.round(values)):
                raise InputError(path, "matrix/data holds non-integer values: not UMI counts")


def infer_dataset_id(path):
    """The prefix of the folder's single ``*_feature_slice.h5`` (None when the file is unprefixed)."""
    found = sorted(Path(path).glob("*_feature_slice.h5"))
    if len(found) > 1:
        names = [p.name for p in found]
        raise InputError(path, f"several feature slices {names}: give the dataset id (samples.<id>.dataset_id)")
    return found[0].name.removesuffix("_feature_slice.h5") if found else None


def _check_scalefactors(path, bin_um):
    try:
        factors = json.loads(path.read_text())
        size, diameter, mpp = (float(factors[k]) for k in ("bin_size_um", "spot_diameter_fullres", "microns_per_pixel"))
        float(factors["tissue_hires_scalef"]), float(factors["tissue_lowres_scalef"])
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(path, f"unreadable or incomplete scale factors ({err!r})") from None
    if size != bin_um:
        raise InputError(path, f"bin_size_um is {size} but the folder is for {bin_um} um bins")
    if diameter <= 0 or not np.isclose(size / diameter, mpp):
        raise InputError(path, f"microns_per_pixel {mpp} != bin_size_um / spot_diameter_fullres = {size}/{diameter}")
    return mpp


def _matrix_barcodes(path):
    try:
        with h5py.File(path, "r") as f:
            codes = f["matrix/barcodes"][:]
    except (OSError, KeyError) as err:
        raise InputError(path, f"not a 10x HDF5 v3 matrix with /matrix/barcodes ({err})") from None
    return pa.array(codes.astype(object) if codes.dtype.kind != "S" else codes, type=pa.binary()).cast(pa.string())


def find_fullres_image(path, dataset_id):
    """The full-resolution image of a Space Ranger folder, as the reader would look for it.

    Searched in order: ``microscope_image/*``, ``{dataset_id}_tissue_image.*``, ``tissue_image.*``.
    """
    path = Path(path)
    candidates = sorted((path / "microscope_image").glob("*")) if (path / "microscope_image").is_dir() else []
    for prefix in (f"{dataset_id}_", ""):
        candidates += sorted(path.glob(f"{prefix}tissue_image.*"))
    candidates = [p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not candidates:
        raise InputError(path / f"{dataset_id}_tissue_image.tif", "missing full-resolution image")
    return candidates[0]


def image_shape(path):
    """(height, width, channels) of an image file, decoding enough of it to prove it is readable (`_decode_edges`)."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff", ".btf"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tif.series[0].shape
                for level in tif.series[0].levels:
                    _decode_edges(level)
        else:
            from PIL import Image

            with Image.open(path) as img:
                img.load()
                shape = (img.height, img.width, len(img.getbands()))
    except Exception as err:  # any decoder failure means the same to the user: unreadable
        raise InputError(path, f"cannot decode the image ({type(err).__name__}: {err})") from None
    return tuple(int(s) for s in shape)


def _decode_edges(level, whole_px=1 << 26):
    """Decode a whole small image, else the first and the last row of tiles or strips of one level.

    A truncated file loses its last tiles: the last row is where a copy that stopped early fails,
    and two rows per level cost a fraction of a second even on a 40,000 px wide image.
    """
    import zarr

    array = zarr.open(level.aszarr(), mode="r")
    height, width = array.shape[:2]
    if height * width <= whole_px:
        np.asarray(array[:])
        return
    page = level.keyframe
    rows = int(page.tilelength or page.rowsperstrip or 1)
    np.asarray(array[:rows])
    np.asarray(array[max(0, height - rows) :])


def _check_image(path, microns_per_pixel):
    shape = image_shape(path)
    if len(shape) != 3 or shape[-1] != 3:
        raise InputError(path, f"expected an RGB image (height, width, 3), found shape {shape}")
    min_px = int(np.ceil(TILE_UM / microns_per_pixel))
    if min(shape[:2]) < min_px:
        raise InputError(path, f"image {shape[0]}x{shape[1]} px is smaller than one {TILE_UM:g} um tile ({min_px} px)")


@contextlib.contextmanager
def _image_errors(image):
    """A decoder failure deep inside the reader (damage `validate` could not see) names the image."""
    try:
        yield
    except Exception as err:
        if type(err).__module__.split(".")[0] in ("imagecodecs", "tifffile", "PIL"):
            raise InputError(image, f"cannot decode the image ({type(err).__name__}: {err})") from err
        raise


@contextlib.contextmanager
def _arrow_returns_memory():
    """Arrow allocates from jemalloc, returning freed pages at once, instead of its default pool.

    The reader's parquet read of the bin positions frees about 1.5 GiB on a full capture area;
    arrow's default pool (mimalloc) keeps those pages while the reader goes on to build its
    shapes, and that retention is what took ingestion past 8 GiB.
    """
    previous = pa.default_memory_pool()
    try:
        pool = pa.jemalloc_memory_pool()
        pa.jemalloc_set_decay_ms(0)
    except NotImplementedError:  # pyarrow built without jemalloc: the system allocator
        pool = pa.system_memory_pool()
    pa.set_memory_pool(pool)
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


#: How spatialdata-io represents the bins the table annotates: a labels raster, or one polygon
#: (square) or point with a radius (circle) per bin.
BIN_SHAPES = ("labels", "squares", "circles")
#: The one bin size read (um). Every stage reads the 2 um table and pools coarser bins itself;
#: Space Ranger's 8 and 16 um tables would add 1.3 times its non-zeros to the reader's memory.
BIN_UM = 2


def ingest(path, dataset_id, out_zarr, *, fullres_image=None, bins="labels"):
    """Validate a Space Ranger folder, read its 2 um bins with spatialdata-io and write SpatialData zarr.

    Parameters
    ----------
    path
        Space Ranger ``outs`` folder.
    dataset_id
        Sample id (names the SpatialData elements).
    fullres_image
        The full-resolution H&E given to Space Ranger, when it is not inside the folder
        (config ``samples.<id>.fullres_image``); default: looked up in the folder.
    out_zarr
        Output store (written atomically): table ``square_002um`` (:data:`BIN_UM`) and the images.
    bins
        How the bins are stored (:data:`BIN_SHAPES`): ``labels`` (default) a labels raster that the
        table annotates (spatialdata-io's ``annotate_table_by_labels``; its reader still builds a
        circle per bin first, which is dropped before writing), so napari and spatialdata-plot
        draw them as an image; ``squares`` or ``circles`` keep one shape per bin, which costs
        more memory, time and disk on a full capture area (measured in the README).
    """
    if bins not in BIN_SHAPES:
        raise InputError("config ingest.bins", f"{bins!r}: use one of {BIN_SHAPES}")
    image = validate_spaceranger(path, dataset_id, fullres_image)
    from spatialdata_io import visium_hd  # slow import: only once the folder is known to be good

    with warnings.catch_warnings():
        # Optional CytAssist image absent, and zarr's notice about future sharding defaults: noise.
        warnings.filterwarnings("ignore", message=".*cytassist.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
        with atomic_path(out_zarr) as tmp, _image_errors(image), _arrow_returns_memory():
            sdata = visium_hd(
                path,
                dataset_id=dataset_id,
                load_segmentations_only=False,
                bin_size=BIN_UM,
                fullres_image_file=image,
                bins_as_squares=bins == "squares",
                annotate_table_by_labels=bins == "labels",
            )
            if bins == "labels":  # the table now annotates the raster: the per-bin shapes only cost
                for name in list(sdata.shapes):
                    del sdata.shapes[name]
            sdata.write(tmp)
            manifest.write(tmp)
    return Path(out_zarr)
