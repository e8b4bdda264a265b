"""Gene selection on an ingested sample: statistics over in-tissue bins, methods, errors."""

import numpy as np
import pandas as pd
import pytest

from sparsitytrap.errors import InputError
from sparsitytrap.genes import select_genes


def direct_stats(sample):
    """Mean, variance and zero fraction per gene over the in-tissue bins, computed densely."""
    x = sample.counts[sample.in_tissue].toarray().astype(float)
    return pd.DataFrame(
        {"mean": x.mean(0), "variance": x.var(0), "zero_fraction": (x == 0).mean(0)}, index=sample.gene_names
    )


def test_variance_picks_the_most_variable_genes_in_order(hd_sample, sdata_zarr, tmp_path):
    table = select_genes([sdata_zarr], tmp_path / "genes.csv", method="variance", n_genes=4)
    expected = direct_stats(hd_sample).sort_values("variance", ascending=False, kind="stable")
    assert list(table["gene"]) == list(expected.index[:4])
    written = pd.read_csv(tmp_path / "genes.csv")
    assert list(written["gene"]) == list(table["gene"]) and list(written["rank"]) == [1, 2, 3, 4]
    for col in ("mean", "variance", "zero_fraction"):
        np.testing.assert_allclose(written[col], expected[col].iloc[:4], rtol=1e-9)
    assert set(written["category"]) == {"Unassigned"}  # no categories file given


def test_panel_keeps_the_file_order_and_categories(hd_sample, sdata_zarr, tmp_path):
    panel = tmp_path / "panel.txt"
    chosen = [hd_sample.gene_names[i] for i in (5, 0, 9)]
    panel.write_text("# my panel\n" + "\n".join(chosen) + "\n\n")
    cats = tmp_path / "cats.tsv"
    cats.write_text(f"gene\tcategory\n{chosen[0]}\tImmune\n")
    table = select_genes([sdata_zarr], tmp_path / "g.csv", method="panel", n_genes=50, panel=panel, categories=cats)
    assert list(table["gene"]) == chosen
    assert list(table["category"]) == ["Immune", "Unassigned", "Unassigned"]


def test_hvg_returns_the_asked_number_of_known_genes(tmp_path):
    """scanpy's seurat_v3 fits a loess over genes: a simulated patient (296 genes) is needed."""
    from sparsitytrap.ingest import ingest
    from sparsitytrap.simulate import simulate_patient

    simulate_patient(tmp_path / "PX", "PX", {"seed": 3, "n_rows": 160, "n_cols": 160})
    sdata = ingest(tmp_path / "PX" / "outs", "PX", tmp_path / "PX.zarr")
    table = select_genes([sdata], tmp_path / "g.csv", method="hvg", n_genes=20)
    variance = select_genes([sdata], tmp_path / "v.csv", method="variance", n_genes=20)
    assert len(table) == 20 and table["gene"].is_unique
    assert list(table["gene"]) != list(variance["gene"])  # a different criterion, a different choice


@pytest.mark.parametrize(
    "kwargs, where",
    [
        ({"method": "panel", "panel": "PANEL"}, "panel.txt"),
        ({"method": "variance", "n_genes": 10_000}, "genes.n_genes"),
        ({"method": "pca"}, "genes.method"),
    ],
)
def test_bad_choices_fail_with_one_line_and_no_output(sdata_zarr, tmp_path, kwargs, where):
    panel = tmp_path / "panel.txt"
    panel.write_text("NOT_A_GENE\n")
    kwargs = {k: (panel if v == "PANEL" else v) for k, v in kwargs.items()}
    with pytest.raises(InputError) as err:
        select_genes([sdata_zarr], tmp_path / "g.csv", **kwargs)
    assert where in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "g.csv").exists()


def test_a_mosaic_gene_the_selection_did_not_keep_is_refused_before_any_output(hd_sample, sdata_zarr, tmp_path):
    out = tmp_path / "genes.csv"
    with pytest.raises(InputError, match=r"figures.mosaic_genes: 'NOPE' not among the 3 genes"):
        select_genes([sdata_zarr], out, n_genes=3, required=["NOPE"])
    assert not out.exists()


@pytest.fixture(scope="module")
def second_sdata(tmp_path_factory):
    from conftest import make_sample

    from sparsitytrap.ingest import ingest

    rates = np.geomspace(0.6, 0.01, 12)  # the first sample's genes in reverse: another top six
    sample = make_sample(tmp_path_factory.mktemp("second") / "outs", sample_id="T2", seed=5, rates=rates)
    return ingest(sample.outs, "T2", tmp_path_factory.mktemp("sdata2") / "T2.zarr")


def test_leak_free_selection_chooses_each_folds_genes_on_its_training_samples_only(sdata_zarr, second_sdata, tmp_path):
    from sparsitytrap.genes import fold_genes

    zarrs, n = [sdata_zarr, second_sdata], 6
    table = select_genes(zarrs, tmp_path / "g.csv", n_genes=n, folds={"test-T2": [0], "test-T1": [1]})
    alone = [select_genes([z], tmp_path / f"{i}.csv", n_genes=n)["gene"].tolist() for i, z in enumerate(zarrs)]
    assert set(alone[0]) != set(alone[1])
    assert fold_genes(tmp_path / "g.csv", "test-T2") == alone[0]  # chosen without the test sample T2
    assert fold_genes(tmp_path / "g.csv", "test-T1") == alone[1]
    assert table["gene"].tolist() == list(dict.fromkeys(alone[0] + alone[1]))  # the tile stores hold the union
    # one selection for all folds: the fold has the whole list
    assert fold_genes(tmp_path / "0.csv", "test-T2") == alone[0]
