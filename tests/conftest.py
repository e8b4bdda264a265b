"""Shared fixtures: one tiny Visium HD sample in the Space Ranger layout, and its SpatialData store.

The sample is written with the project's own writer (`sparsitytrap.spaceranger`) and read with
the real spatialdata-io reader. Its full-resolution image is NOT aligned with the bin grid
(0.4583 um/px, rotated by 2 degrees, offset), and holds pure-blue disc markers centred on known
bins so that tests can check image/count alignment.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sparsitytrap import spaceranger

MARKER_RGB = (0, 0, 255)
BACKGROUND_RGB = (236, 190, 214)  # eosin-pink


@dataclass(frozen=True)
class HDSample:
    outs: object
    sample_id: str
    counts: sp.csr_matrix  # [n_rows * n_cols, G], row-major over the 2 um grid
    in_tissue: np.ndarray  # bool [n_rows * n_cols]
    n_rows: int
    n_cols: int
    gene_names: list
    bin_to_pixel: np.ndarray  # (x, y) = A @ (row, col, 1)
    microns_per_pixel: float
    fullres_shape: tuple
    markers: list  # (array_row, array_col) of the blue discs


def tissue_grid(n_rows, n_cols):
    """A rectangle of tissue with a round hole: tiles get varied tissue fractions."""
    r, c = np.divmod(np.arange(n_rows * n_cols), n_cols)
    rect = (r >= 20) & (r < 280) & (c >= 10) & (c < 250)
    hole = (r - 128) ** 2 + (c - 200) ** 2 < 60**2
    return rect & ~hole


def rotated_affine(microns_per_pixel, degrees, x0, y0):
    """(x, y) = A @ (row, col, 1): bin columns run along x, rows along y, rotated."""
    s, t = 2.0 / microns_per_pixel, np.deg2rad(degrees)
    return np.array([[-s * np.sin(t), s * np.cos(t), x0], [s * np.cos(t), s * np.sin(t), y0]])


def draw_image(shape, A, markers, radius_px=4.0):
    """Pink image with a blue disc centred on each marker bin (pixel centres at index + 0.5)."""
    image = np.empty((*shape, 3), dtype=np.uint8)
    image[:] = BACKGROUND_RGB
    ii, jj = np.mgrid[: shape[0], : shape[1]]
    for row, col in markers:
        x, y = A @ np.array([row, col, 1.0])
        image[(jj + 0.5 - x) ** 2 + (ii + 0.5 - y) ** 2 <= radius_px**2] = MARKER_RGB
    return image


def image_tiles(image, tile=512):
    for i in range(0, image.shape[0], tile):
        for j in range(0, image.shape[1], tile):
            yield image[i : i + tile, j : j + tile]


def make_sample(outs, sample_id="T1", n_rows=300, n_cols=260, n_genes=12, seed=0, rates=None):
    """Write a tiny Space Ranger Visium HD sample (2/8/16 um bins, tiled TIFF) into `outs`.

    rates: Poisson rate per gene (default rising from 0.01 to 0.6 with the gene index)."""
    rng = np.random.default_rng(seed)
    rates = np.geomspace(0.01, 0.6, n_genes) if rates is None else np.asarray(rates)
    counts = sp.csr_matrix(rng.poisson(rates, size=(n_rows * n_cols, n_genes)).astype(np.int32))
    in_tissue = tissue_grid(n_rows, n_cols)
    mpp = 0.4583
    A = rotated_affine(mpp, 2.0, x0=80.0, y0=40.0)
    corners = A @ np.array(
        [[-0.5, -0.5, n_rows - 0.5, n_rows - 0.5], [-0.5, n_cols - 0.5, -0.5, n_cols - 0.5], [1, 1, 1, 1]]
    )
    shape = (int(corners[1].max()) + 40, int(corners[0].max()) + 40)
    markers = [(70, 90), (200, 180)]
    image = draw_image(shape, A, markers)
    genes = [f"GENE{g:02d}" for g in range(n_genes)]
    spaceranger.write_sample(
        outs,
        sample_id,
        counts=counts,
        gene_ids=[f"ENSG{g:011d}" for g in range(n_genes)],
        gene_names=genes,
        n_rows=n_rows,
        n_cols=n_cols,
        in_tissue=in_tissue,
        bin_to_pixel=A,
        microns_per_pixel=mpp,
        fullres_shape=shape,
        hires_image=image[::8, ::8],
        lowres_image=image[::32, ::32],
    )
    spaceranger.write_fullres_image(outs, sample_id, image_tiles(image), shape)
    return HDSample(outs, sample_id, counts, in_tissue, n_rows, n_cols, genes, A, mpp, shape, markers)


@pytest.fixture(scope="session")
def hd_sample(tmp_path_factory):
    return make_sample(tmp_path_factory.mktemp("spaceranger") / "outs")


@pytest.fixture(scope="session")
def sdata_zarr(hd_sample, tmp_path_factory):
    from sparsitytrap.ingest import ingest

    return ingest(hd_sample.outs, hd_sample.sample_id, tmp_path_factory.mktemp("sdata") / "T1.zarr")


@pytest.fixture(scope="session")
def genes_csv(hd_sample, tmp_path_factory):
    """Five genes in an order different from the matrix order."""
    path = tmp_path_factory.mktemp("genes") / "genes.csv"
    pd.DataFrame({"gene": [hd_sample.gene_names[g] for g in (7, 0, 11, 3, 5)]}).to_csv(path, index=False)
    return path


# --- a copy of the workflow, for runs that must not touch the repository's results ----------

WORKFLOW_FILES = ["Snakefile", "config.yaml", "workflow", "resources", "envs", "slurm", "tests/configs", "config"]


def copy_workflow(root, config=None):
    """The workflow's files in folder `root` (its .snakemake/, logs and results stay there).

    `config`: a file that replaces config.yaml there (for example tests/configs/tiny.yaml).
    """
    import shutil
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    for name in WORKFLOW_FILES:
        if (repo / name).is_dir():
            shutil.copytree(repo / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, root / name)
    if config is not None:
        shutil.copy2(repo / config, root / "config.yaml")
    return root
