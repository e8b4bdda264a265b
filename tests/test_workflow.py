"""The Snakemake workflow itself: the plan on the default config, an end-to-end run on the tiny
config, no-op reruns, and reruns limited to what a config change touches."""

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import copy_workflow

SNAKEMAKE = Path(sys.executable).parent / "snakemake"
DATA_RULES = {"simulate", "ingest", "select_genes"}


def snakemake(workdir, *args, timeout=1500):
    cmd = [str(SNAKEMAKE), "--cores", "2", *map(str, args)]
    result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout + result.stderr


def planned(workdir, *args):
    """Rule -> number of jobs of a dry run (empty when there is nothing to do)."""
    out = snakemake(workdir, "-n", *args)
    if "Job stats:" not in out:
        assert "Nothing to be done" in out, out[-3000:]
        return {}
    table = out.split("Job stats:", 1)[1].split("total", 1)[0]
    return {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_default_config_plans_every_stage(tmp_path):
    root = copy_workflow(tmp_path)
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    n_samples, n_models = len(cfg["samples"]), len(cfg["models"])
    plan = planned(root)
    for rule in ("simulate", "ingest", "tile", "features", "ceiling"):
        assert plan[rule] == n_samples, (rule, plan)
    assert plan["select_genes"] == 1
    for rule in ("train", "predict", "evaluate"):
        assert plan[rule] == n_models * n_samples, (rule, plan)  # leave one patient out
    corrected = any(m.get("counts") == "corrected" for m in cfg["models"].values())
    for rule in ("correct_diffusion", "corrected_tiles"):
        assert plan.get(rule, 0) == (n_samples if corrected else 0), (rule, plan)
    validated = cfg["diffusion"].get("validate", True)
    n_validated = n_samples if validated is True else len(validated or [])
    assert plan.get("validate_diffusion", 0) == (n_validated if corrected else 0), plan
    assert plan["stats"] == len(cfg["comparisons"]) and plan["factorial"] == 1
    assert {"figure_results_table", "figure_bar_chart", "figure_mosaic", "figure_rescue"} <= set(plan)


def test_comparisons_config_adds_its_models_and_the_diffusion_stage(tmp_path):
    root = copy_workflow(tmp_path)
    base = yaml.safe_load((root / "config.yaml").read_text())
    extra = yaml.safe_load((root / "config" / "comparisons.yaml").read_text())
    plan = planned(root, "--configfile", "config.yaml", "config/comparisons.yaml")
    n_samples = len(base["samples"])
    n_models = len(base["models"]) + len(extra["models"])  # merged, not replaced
    assert plan["train"] == plan["evaluate"] == n_models * n_samples, plan
    assert plan["correct_diffusion"] == n_samples and plan["validate_diffusion"] == len(base["diffusion"]["validate"])
    assert plan["stats"] == len(extra["comparisons"]), plan


def test_converged_config_trains_every_model_in_its_own_results(tmp_path):
    """config/converged.yaml: the default models with a longer cap, never writing into `results`."""
    root = copy_workflow(tmp_path)
    base = yaml.safe_load((root / "config.yaml").read_text())
    extra = yaml.safe_load((root / "config" / "converged.yaml").read_text())
    out = snakemake(root, "-n", "--configfile", "config.yaml", "config/converged.yaml")
    trained = set(re.findall(r"(\S+)/models/(\w+)/(test-\w+)/best\.safetensors", out))
    expected = {(extra["results"], m, f"test-{s}") for m in base["models"] for s in base["samples"]}
    assert trained == expected, trained ^ expected
    assert extra["training"]["epochs"] > base["training"]["epochs"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tests/configs/tiny.yaml run end to end (the module's tests share this one run)."""
    root = copy_workflow(tmp_path_factory.mktemp("tiny"), config="tests/configs/tiny.yaml")
    snakemake(root)
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    return root, cfg, root / cfg["results"]


@pytest.mark.slow
def test_tiny_run_writes_every_table_and_figure(tiny):
    root, cfg, results = tiny
    from sparsitytrap.genes import fold_genes

    union = pd.read_csv(results / "genes" / "genes.csv")["gene"].tolist()
    for model in cfg["models"]:
        for sample in cfg["samples"]:
            genes = fold_genes(results / "genes" / "genes.csv", f"test-{sample}")  # leak-free: the fold's own
            assert len(genes) == cfg["genes"]["n_genes"] and set(genes) <= set(union)
            per_gene = pd.read_csv(results / "eval" / model / f"test-{sample}" / "per_gene.csv")
            assert per_gene["gene"].tolist() == genes
            assert per_gene["pcc_2um_pooled_ceiling"].notna().all()
    for comp in cfg["comparisons"]:
        summary = pd.read_csv(results / "stats" / comp["name"] / "summary.csv")
        assert set(summary["metric"]) >= {"pcc_2um_pooled", "ssim_2um_pertile"}
        assert (summary["win_rate"].dropna() <= 1).all()
    for name in ("results_table", "bar_chart", "noise_ceiling", "training_curves"):
        assert (results / "figures" / f"{name}.png").stat().st_size > 1000


@pytest.mark.slow
def test_second_run_has_nothing_to_do(tiny):
    assert planned(tiny[0]) == {}


@pytest.mark.slow
def test_report_collects_the_outputs(tiny):
    """Every table reads in the page (an HTML view, not a CSV download) and docutils warns of nothing."""
    root = tiny[0]
    out = snakemake(root, "--report", "report.html")
    html = (root / "report.html").read_text(errors="replace")
    assert "results_table.png" in html and "S1_per_gene.html" in html and "per_gene.html" in html
    for text in (out, html):  # docutils' warnings: in the page ("System Message: WARNING/2") and on stderr
        assert not re.search(r"System Message|WARNING/\d", text), re.findall(r".{200}WARNING.{200}", text)
    mimes = re.findall(r'"mime_type":\s*"([^"]+)"', html)
    assert mimes and "text/csv" not in mimes, sorted(set(mimes))


def _changed(root, tmp_path, edit):
    """Dry-run plan with an edited copy of the config passed by --configfile (which replaces it)."""
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    edit(cfg)
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return planned(root, "--configfile", path)


@pytest.mark.slow
def test_tile_threshold_reruns_tiling_and_downstream_only(tiny, tmp_path):
    plan = _changed(tiny[0], tmp_path, lambda c: c["tiles"].update(min_tissue_fraction=0.25))
    assert plan.get("tile") == len(tiny[1]["samples"]), plan
    assert not DATA_RULES & set(plan), plan
    assert {"features", "train", "evaluate"} <= set(plan)


@pytest.mark.slow
def test_figure_option_reruns_that_figure_only(tiny, tmp_path):
    plan = _changed(tiny[0], tmp_path, lambda c: c["figures"].update(rescue_top_k=1))
    assert set(plan) == {"figure_rescue", "all"}, plan


@pytest.mark.slow
def test_batch_serving_settings_rerun_nothing(tiny, tmp_path):
    # training.resident and num_workers change how batches are read, never a weight (SERVING_KEYS)
    plan = _changed(tiny[0], tmp_path, lambda c: c["training"].update(resident=False, num_workers=1))
    assert plan == {}, plan
    plan = _changed(tiny[0], tmp_path, lambda c: c["training"].update(seed=7))
    assert "train" in plan, plan  # a setting that changes the weights still reruns training


@pytest.mark.slow
def test_a_diffusion_setting_reruns_the_correction_and_its_models_only(tiny, tmp_path):
    root, cfg, _ = tiny
    plan = _changed(root, tmp_path, lambda c: c["diffusion"].update(rho=2.0))
    n = len(cfg["samples"])
    corrected = [m for m, spec in cfg["models"].items() if spec.get("counts") == "corrected"]
    assert plan["correct_diffusion"] == n and plan["corrected_tiles"] == n and plan["validate_diffusion"] == n
    assert plan["train"] == len(corrected) * n, plan  # only the models trained on corrected counts
    assert not (DATA_RULES | {"tile", "features", "ceiling"}) & set(plan), plan


@pytest.mark.slow
def test_the_diffusion_stage_reports_against_truth(tiny):
    _, cfg, results = tiny
    for sample in cfg["samples"]:
        table = pd.read_csv(results / "diffusion" / sample / "validation.csv")
        assert set(table["method"]) >= {"raw", "rl_estimated", "rl_true", "ot"}
        assert (results / "diffusion" / sample / "methods.png").stat().st_size > 1000
    tiles = results / "tiles_corrected" / f"{next(iter(cfg['samples']))}.zarr"
    from sparsitytrap.stores.tiles import open_tiles

    assert open_tiles(tiles).attrs["counts_kind"] == "corrected"


@pytest.mark.slow
def test_one_fold_reruns_alone(tiny):
    root, cfg, results = tiny
    model, fold = next(iter(cfg["models"])), f"test-{next(iter(cfg['samples']))}"
    target = results / "models" / model / fold / "best.safetensors"
    plan = planned(root, "--forcerun", target.relative_to(root))
    assert plan["train"] == 1 and plan["predict"] == 1 and plan["evaluate"] == 1, plan
    assert not (DATA_RULES | {"tile", "features"}) & set(plan), plan


def test_bad_config_fails_with_one_line(tmp_path):
    root = copy_workflow(tmp_path, config="tests/configs/tiny.yaml")
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    cfg["tiles"]["min_tissue_fraction"] = "half"
    text = yaml.safe_dump(cfg, sort_keys=False)
    (root / "config.yaml").write_text(text)
    line = text.splitlines().index("  min_tissue_fraction: half") + 1
    result = subprocess.run([str(SNAKEMAKE), "-n", "--cores", "1"], cwd=root, capture_output=True, text=True)
    assert result.returncode != 0
    assert f"config.yaml:{line}: tiles.min_tissue_fraction: 'half' is not of type" in result.stdout + result.stderr
    (root / "other.yaml").write_text(text)  # --configfile replaces config.yaml: the refusal names it
    result = subprocess.run(
        [str(SNAKEMAKE), "-n", "--cores", "1", "--configfile", "other.yaml"], cwd=root, capture_output=True, text=True
    )
    assert f"other.yaml:{line}: tiles.min_tissue_fraction" in result.stdout + result.stderr
    cfg["tiles"]["min_tissue_fraction"] = 0.3
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    result = subprocess.run(
        [str(SNAKEMAKE), "-n", "--cores", "1", "--config", "encoder=nope"], cwd=root, capture_output=True, text=True
    )
    assert "--config: encoder: 'nope' is not one of encoders" in result.stdout + result.stderr


def test_workflow_passes_lint_and_snakefmt():
    repo = Path(__file__).resolve().parents[1]
    lint = subprocess.run([str(SNAKEMAKE), "--lint"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert lint.returncode == 0 and "Lints for" not in lint.stdout + lint.stderr, lint.stdout[-3000:]
    fmt = subprocess.run([str(SNAKEMAKE.parent / "snakefmt"), "--check", "Snakefile", "workflow"], cwd=repo,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert fmt.returncode == 0, fmt.stderr[-3000:]


def test_python_passes_ruff_lint_and_format():
    repo = Path(__file__).resolve().parents[1]
    ruff = str(SNAKEMAKE.parent / "ruff")
    paths = ["src", "workflow/scripts", "tests", "bench"]
    lint = subprocess.run([ruff, "check", *paths], cwd=repo, capture_output=True, text=True, timeout=120)
    assert lint.returncode == 0, lint.stdout[-3000:]
    fmt = subprocess.run([ruff, "format", "--check", *paths], cwd=repo, capture_output=True, text=True, timeout=120)
    assert fmt.returncode == 0, fmt.stdout[-3000:]


def test_a_misspelt_loss_or_decoder_setting_is_refused_at_plan_time(tmp_path):
    root = copy_workflow(tmp_path)
    for mutate, key in [
        (lambda c: c["models"]["V7_multiscale"]["loss"].update(scals=[1, 2]), "models.V7_multiscale.loss.scals"),
        (lambda c: c["models"]["D_hist2st_mse"].update(decoder_kwargs={"hiddn": 8}), "decoder_kwargs.hiddn"),
    ]:
        cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
        mutate(cfg)
        (root / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        result = subprocess.run([str(SNAKEMAKE), "-n", "--cores", "1"], cwd=root, capture_output=True, text=True)
        assert result.returncode != 0 and key in result.stdout + result.stderr
        assert "unknown setting" in result.stdout + result.stderr


def _temporaries(results):
    return [p for p in results.rglob(".*.tmp-*")]


@pytest.mark.slow
def test_kill_9_recovers_with_the_one_documented_command(tiny, tmp_path):
    """kill -9 of Snakemake and its jobs mid-write; `python -m sparsitytrap.resume` finishes the run
    with the same metrics as an uninterrupted one and removes the killed job's temporary output."""
    import os
    import signal
    import time

    ref_root, cfg, ref_results = tiny
    root = copy_workflow(tmp_path, config="tests/configs/tiny.yaml")
    results = root / cfg["results"]
    resume = [sys.executable, "-m", "sparsitytrap.resume", "--cores", "2"]
    run = subprocess.Popen(
        resume, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 600
    while not (results / "sdata").is_dir() or not _temporaries(results / "sdata"):  # an ingest job writing
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.1)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert list((root / ".snakemake" / "locks").glob("*.lock")), "kill -9 should leave Snakemake's lock"
    killed = _temporaries(results)
    assert killed
    out = subprocess.run(resume, cwd=root, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "removed the stale lock" in out.stderr
    assert not _temporaries(results), _temporaries(results)
    for model in cfg["models"]:
        for sample in cfg["samples"]:
            part = Path("eval") / model / f"test-{sample}" / "per_gene.csv"
            pd.testing.assert_frame_equal(pd.read_csv(results / part), pd.read_csv(ref_results / part))


def test_resume_refuses_to_break_into_a_live_run(tmp_path):
    """The lock of a running Snakemake is never removed; once it has stopped, the stale lock is."""
    import time

    from sparsitytrap.resume import clear_stale_lock, live_snakemake

    locks = tmp_path / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    (locks / "0.input.lock").write_text("x")
    live = subprocess.Popen(["bash", "-c", "exec -a snakemake sleep 60"], cwd=tmp_path)
    try:
        for _ in range(50):  # until the exec has renamed the process
            if live_snakemake(tmp_path.resolve()):
                break
            time.sleep(0.1)
        with pytest.raises(RuntimeError, match="Snakemake is running there"):
            clear_stale_lock(tmp_path.resolve())
    finally:
        live.kill()
        live.wait()
    assert clear_stale_lock(tmp_path.resolve())
    assert not list(locks.iterdir())


@pytest.mark.slow
def test_an_unselected_mosaic_gene_is_refused_at_plan_time(tiny):
    root, cfg, _ = tiny
    other = {**cfg, "figures": {**cfg["figures"], "mosaic_genes": ["NOT_SELECTED"]}}
    (root / "mosaic.yaml").write_text(yaml.safe_dump(other))
    cmd = [str(SNAKEMAKE), "-n", "--cores", "1", "--configfile", "mosaic.yaml"]
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    assert result.returncode != 0
    assert re.search(r"figures.mosaic_genes: 'NOT_SELECTED' not among the \d+ genes of", result.stdout + result.stderr)
