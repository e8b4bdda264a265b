"""Statistics on constructed per-gene tables with known answers."""

import numpy as np
import pandas as pd
import pytest
import scipy.stats as ss

from sparsitytrap import stats as S
from sparsitytrap.errors import InputError


def per_gene(values, sparsity, folds=("test-P1",), genes=None):
    """A per-gene table: one row per (fold, gene); `values` is [folds, genes] or [genes]."""
    values = np.atleast_2d(np.asarray(values, dtype=float))
    genes = genes or [f"g{i}" for i in range(values.shape[1])]
    rows = [
        {"fold": f, "gene": g, "pcc": values[i, j], "sparsity": sparsity[j]}
        for i, f in enumerate(folds)
        for j, g in enumerate(genes)
    ]
    return pd.DataFrame(rows)


def test_bh_against_hand_computed_example():
    # classic example: p * n / rank = .008 .032 .104 .082 .0672 .08 .0846 .205, then step-up minimum
    p = [0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205]
    q = [0.008, 0.032, 0.0672, 0.0672, 0.0672, 0.08, 0.074 * 8 / 7, 0.205]
    np.testing.assert_allclose(S.bh_adjust(p), q)
    # unsorted input with NaN: NaN stays NaN and does not count in n (n = 4)
    got = S.bh_adjust([0.04, np.nan, 0.01, 0.03, 0.005])
    np.testing.assert_allclose(got, [0.04, np.nan, 0.02, 0.04, 0.02])
    rng = np.random.default_rng(0)
    p = rng.random(30) ** 3
    np.testing.assert_allclose(S.bh_adjust(p), ss.false_discovery_control(p))
    assert (S.bh_adjust([0.9, 0.95]) <= 1).all()


def test_known_wins_rho_and_win_rate_with_nans():
    n = 12
    sparsity = np.linspace(0.5, 0.99, n)
    a = np.full(n, 0.2)
    b = a + np.linspace(-0.05, 0.2, n) ** 3 + 0.01  # delta strictly increasing with sparsity
    a[3] = np.nan  # excluded: NaN in A
    b[7] = np.nan  # excluded: NaN in B
    res = S.compare(per_gene(a, sparsity), per_gene(b, sparsity), "pcc", names=("mse", "poisson"))
    s1, summary = res["s1"], res["summary"].iloc[0]
    delta = b - a
    compared = np.isfinite(delta)
    wins = int((delta[compared] > 0).sum())
    assert summary["n_genes"] == 10 and summary["n_excluded"] == 2
    assert summary["wins"] == f"{wins}/10"
    assert summary["win_rate"] == pytest.approx(wins / 10) and summary["win_rate"] <= 1
    assert summary["spearman_rho"] == pytest.approx(1.0)  # monotone construction
    assert s1["win"].isna().sum() == 2 and s1.loc[3, "win"] is pd.NA
    assert list(s1.columns[:5]) == ["gene", "category", "sparsity_pct", "pcc_mse", "pcc_poisson"]
    np.testing.assert_allclose(s1["sparsity_pct"], 100 * sparsity)
    assert summary["p_wilcoxon"] == pytest.approx(ss.wilcoxon(delta[compared]).pvalue)


def test_all_nan_model_never_exceeds_full_win_rate():
    sparsity = np.linspace(0.1, 0.9, 8)
    a = per_gene([np.full(8, np.nan), np.full(8, 0.1)], sparsity, folds=("f1", "f2"))
    b = per_gene([np.full(8, 0.5), np.full(8, 0.3)], sparsity, folds=("f1", "f2"))
    res = S.compare(a, b, "pcc")
    assert res["summary"].iloc[0]["win_rate"] == 1.0
    assert (res["s2"]["win_rate"] <= 1).all() and (res["s3"]["win_rate"] <= 1).all()
    # only fold f2 is compared for every gene: pooled delta is 0.2, not (0.5 + 0.3) / 2 - 0.1
    np.testing.assert_allclose(res["s1"]["delta"], 0.2)
    assert (res["s1"]["n_folds"] == 1).all()
    assert res["s1_folds"]["compared"].sum() == 8


def test_pooling_over_folds_and_per_fold_rows():
    sparsity = [0.5, 0.9]
    a = per_gene([[0.1, 0.2], [0.3, 0.4]], sparsity, folds=("f1", "f2"))
    b = per_gene([[0.2, 0.1], [0.5, 0.3]], sparsity, folds=("f1", "f2"))
    res = S.compare(a, b, "pcc")
    np.testing.assert_allclose(res["s1"]["pcc_A"], [0.2, 0.3])
    np.testing.assert_allclose(res["s1"]["delta"], [0.15, -0.1])
    assert res["s1"]["win"].tolist() == [True, False]
    folds = res["s1_folds"]
    assert len(folds) == 4
    np.testing.assert_allclose(folds["delta"], [0.1, -0.1, 0.2, -0.1])


def test_category_and_quartile_tables():
    genes = [f"g{i}" for i in range(16)]
    sparsity = np.arange(16) / 20  # quartiles: g0-g3, g4-g7, ...
    cats = {g: ("Immune" if i < 10 else "Stromal") for i, g in enumerate(genes)}
    a = np.zeros(16)
    b = np.where(np.arange(16) < 10, 0.1, -0.1) + np.arange(16) * 1e-3
    res = S.compare(per_gene(a, sparsity), per_gene(b, sparsity), "pcc", categories=cats)
    s2 = res["s2"].set_index("category")
    assert s2.loc["Immune", "wins"] == "10/10" and s2.loc["Stromal", "wins"] == "0/6"
    assert s2.loc["Immune", "n_genes"] == 10 and s2.loc["Stromal", "n_excluded"] == 0
    assert s2.loc["Immune", "delta_sd"] == pytest.approx(np.std(b[:10], ddof=1))
    assert s2.loc["Immune", "p_wilcoxon"] == pytest.approx(ss.wilcoxon(b[:10]).pvalue)
    np.testing.assert_allclose(res["s2"]["q_bh"], S.bh_adjust(res["s2"]["p_wilcoxon"]))
    s3 = res["s3"]
    assert s3["quartile"].tolist() == ["Q1", "Q2", "Q3", "Q4"]
    assert s3["n_genes"].tolist() == [4, 4, 4, 4]
    assert s3["wins"].tolist() == ["4/4", "4/4", "2/4", "0/4"]
    assert s3["win_rate"].tolist() == [1.0, 1.0, 0.5, 0.0]
    assert s3.loc[0, "sparsity_min_pct"] == 0 and s3.loc[3, "sparsity_max_pct"] == pytest.approx(75)
    assert s3["p_wilcoxon"].isna().all()  # n = 4 < 5


def test_small_categories_get_nan_p_and_unassigned_genes():
    res = S.compare(
        per_gene([0, 0, 0], [0.1, 0.2, 0.3]), per_gene([1, 1, 2], [0.1, 0.2, 0.3]), "pcc", categories={"g0": "Immune"}
    )
    s2 = res["s2"].set_index("category")
    assert set(s2.index) == {"Immune", S.UNASSIGNED}
    assert s2["p_wilcoxon"].isna().all()


def test_compare_rejects_bad_tables():
    good = per_gene([0.1, 0.2], [0.5, 0.6])
    with pytest.raises(InputError, match="per_gene_b: missing column"):
        S.compare(good, good.drop(columns="pcc"), "pcc")
    with pytest.raises(InputError, match="more than one row"):
        S.compare(pd.concat([good, good]), good, "pcc")


def test_2x2_decomposition_known_effects():
    base, loss, decoder, inter = 0.2, 0.1, 0.05, 0.04
    rows = []
    for k, fold in enumerate(["f1", "f2", "f3"]):
        for d in ("img2st", "hist2st"):
            for l in ("mse", "poisson"):  # noqa: E741
                value = (
                    base
                    + loss * (l == "poisson")
                    + decoder * (d == "hist2st")
                    + inter * (l == "poisson") * (d == "hist2st")
                )
                for gene, offset in [("g0", -0.01), ("g1", 0.01)]:
                    rows.append({"fold": fold, "decoder": d, "loss": l, "gene": gene, "pcc": value + offset + 0.01 * k})
    table = pd.DataFrame(rows)
    table.loc[
        (table["fold"] == "f1") & (table["gene"] == "g1") & (table["loss"] == "mse") & (table["decoder"] == "img2st"),
        "pcc",
    ] = np.nan
    out = S.decompose_2x2(table, "pcc").set_index("fold")
    for fold in ("f1", "f2", "f3"):
        assert out.loc[fold, "loss_effect"] == pytest.approx(loss + inter / 2)
        assert out.loc[fold, "decoder_effect"] == pytest.approx(decoder + inter / 2)
        assert out.loc[fold, "interaction"] == pytest.approx(inter)
    assert out.loc["f1", "n_genes"] == 1 and out.loc["f2", "n_genes"] == 2  # g1 dropped from all f1 cells
    assert out.loc["f1", "img2st_mse"] == pytest.approx(base - 0.01)
    assert out.loc["mean", "interaction"] == pytest.approx(inter)
    assert out.loc["sd", "interaction"] == pytest.approx(0, abs=1e-12)
    # fold offsets 0, .01, .02; f1 keeps only g0 (offset -.01)
    assert out.loc["sd", "hist2st_poisson"] == pytest.approx(np.std([-0.01, 0.01, 0.02], ddof=1))
    with pytest.raises(InputError, match="no rows for decoder 'hist2st'"):
        S.decompose_2x2(table[table["decoder"] != "hist2st"], "pcc")


# --- the workflow's stats stage on real evaluation folders ---------------------------------


@pytest.fixture
def two_models(tmp_path):
    """Evaluations of a good model (true rates) and a poor one (rates with noise) on two folds."""
    from test_evaluate import smooth_rates, write_pred, write_tiles

    from sparsitytrap.evaluate import evaluate

    rng = np.random.default_rng(3)
    grid = np.array([(r, c) for r in range(3) for c in range(3)])
    dirs = {"good": [], "poor": []}
    for fold in ("test-A", "test-B"):
        rates = smooth_rates(rng, len(grid))
        tiles = write_tiles(tmp_path / f"{fold}.zarr", rng.poisson(rates), np.ones((9, 32, 32), bool), grid)
        noisy = rates * rng.gamma(1.0, 1.0, size=rates.shape)
        for name, pred in (("good", rates), ("poor", noisy)):
            out = tmp_path / "eval" / name / fold
            evaluate(write_pred(tmp_path / f"{name}_{fold}.zarr", pred), tiles, out, model=name, fold=fold, bootstrap=0)
            dirs[name].append(out)
    return dirs


def test_run_comparison_writes_consistent_tables(two_models, tmp_path):
    out = S.run_comparison(
        two_models["poor"],
        two_models["good"],
        tmp_path / "cmp",
        metrics=("pcc_2um_pooled", "ssim_2um_pertile"),
        names=("poor", "good"),
        bootstrap=200,
    )
    for name in S.STATS_TABLES.values():
        assert (tmp_path / "cmp" / name).stat().st_size > 0
    s1, summary = out["s1"], out["summary"].set_index("metric")
    for metric in ("pcc_2um_pooled", "ssim_2um_pertile"):
        rows = s1[s1["metric"] == metric]
        assert len(rows) == 3  # genes
        assert summary.loc[metric, "delta_mean"] == pytest.approx(rows["delta"].mean())
        assert summary.loc[metric, "wins"] == f"{int(rows['win'].sum())}/3"
    # the true rates beat noisy rates on pooled PCC, and the paired tile bootstrap says so
    pcc = summary.loc["pcc_2um_pooled"]
    assert pcc["delta_mean"] > 0 and 0 < pcc["delta_ci_low"] <= pcc["delta_mean"] <= pcc["delta_ci_high"]


def test_run_comparison_refuses_mismatched_folds(two_models, tmp_path):
    with pytest.raises(InputError, match="folds"):
        S.run_comparison(two_models["poor"], two_models["good"][::-1], tmp_path / "cmp")


def test_pooled_statistics_use_the_genes_every_fold_scored():
    """Leak-free selection gives each fold its own genes: pooled, only the shared ones are compared."""
    from sparsitytrap.stats import compare

    def table(model_shift):
        rows = []
        for fold, genes in (("test-P1", ["A", "B", "C"]), ("test-P2", ["A", "B", "D"])):
            rows += [
                {"fold": fold, "gene": g, "m": 0.1 * i + model_shift, "sparsity": 0.9} for i, g in enumerate(genes)
            ]
        return pd.DataFrame(rows)

    out = compare(table(0.0), table(0.05), "m")
    s1 = out["s1"].set_index("gene")
    assert s1["shared"].to_dict() == {"A": True, "B": True, "C": False, "D": False}
    assert s1["compared"].tolist() == [True, True, False, False]
    summary = out["summary"].iloc[0]
    assert summary["n_fold_specific"] == 2 and summary["n_excluded"] == 2
    assert summary["n_genes"] == 2
