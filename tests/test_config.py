"""The config schema and the cross-reference checks reject malformed configs with a readable line."""

import copy
from pathlib import Path

import pytest
import yaml

from sparsitytrap import config as stconfig
from sparsitytrap.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cfg():
    return yaml.safe_load((ROOT / "config.yaml").read_text())


@pytest.fixture(autouse=True)
def _in_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def check(cfg):
    return stconfig.validate(copy.deepcopy(cfg), source="config.yaml")


def test_default_config_is_valid(cfg):
    out = check(cfg)
    assert stconfig.fold_names(out) == ["test-P1", "test-P2", "test-P3"]
    assert out["evaluation"]["bootstrap"] == 1000


@pytest.mark.parametrize(
    "mutate, key, words",
    [
        (lambda c: c.update(unknown_key=1), "<top level>", "unknown_key"),
        (lambda c: c["tiles"].update(min_tissue_fraction="half"), "tiles.min_tissue_fraction", "not of type"),
        (lambda c: c["tiles"].update(min_tissue_fraction=1.5), "tiles.min_tissue_fraction", "maximum"),
        (lambda c: c["genes"].update(n_genes=2.5), "genes.n_genes", "not of type"),
        (lambda c: c["samples"].update(P9={"path": "/no/such/spaceranger/outs"}), "samples.P9.path", "does not exist"),
        (
            lambda c: c["models"]["E_hist2st_poisson"]["loss"].update(name="l1"),
            "models.E_hist2st_poisson.loss.name",
            "is not one of",
        ),
        (lambda c: c.update(encoder="uni"), "encoder", "not one of encoders"),
        (lambda c: c["comparisons"][0].update(b="missing_model"), "comparisons[0].b", "not declared"),
        (lambda c: c.update(folds=["P7"]), "folds", "not declared"),
        (lambda c: c["figures"].update(folds=["test-P9"]), "figures.folds", "not a fold"),
        # settings are checked against the registries when the DAG is planned, not inside a job
        (
            lambda c: c["models"]["V7_multiscale"]["loss"].update(scals=[1, 2]),
            "models.V7_multiscale.loss.scals",
            "unknown setting",
        ),
        (
            lambda c: c["models"]["D_hist2st_mse"].update(decoder_kwargs={"hiddn": 8}),
            "models.D_hist2st_mse.decoder_kwargs.hiddn",
            "unknown setting",
        ),
        (
            lambda c: c["models"]["D_hist2st_mse"].update(decoder="unet"),
            "models.D_hist2st_mse.decoder",
            "unknown decoder",
        ),
        (lambda c: c["decoders"]["img2st"].update(widht=8), "decoders.img2st.widht", "unknown setting"),
        (lambda c: c["decoders"].update(vit={}), "decoders.vit", "unknown decoder"),
        (
            lambda c: c["models"]["S_hist2st_liststrank"]["loss"].update(list_scope="patient"),
            "list_scope",
            "is not one of",
        ),
        (lambda c: c["stats"].update(metrics=["pcc_32um_pooled"]), "stats.metrics[0]", "unknown metric"),
        (lambda c: c["factorial"]["cells"][0].update(loss="poisson"), "factorial.cells[0].loss", "has loss 'mse'"),
        (lambda c: c["factorial"]["reference"].update(decoder="unet"), "factorial.reference.decoder", "two decoders"),
        (
            lambda c: c["factorial"]["cells"][3].update(model="S_hist2st_liststrank"),
            "factorial.cells[3].decoder",
            "has decoder",
        ),
        (lambda c: c.update(resources={"mem_mb": {"train": "lots"}}), "resources.mem_mb.train", "not of type"),
    ],
)
def test_malformed_config_gets_one_readable_line(cfg, mutate, key, words):
    mutate(cfg)
    with pytest.raises(InputError) as err:
        check(cfg)
    msg = str(err.value)
    assert "\n" not in msg
    assert key in msg and words in msg


def test_registries_are_what_the_schema_defers_to(cfg):
    """The schema names no loss, decoder or metric itself: the registries are the one list of each."""
    from sparsitytrap.decoders import DECODERS
    from sparsitytrap.losses import LOSSES
    from sparsitytrap.metrics import METRICS

    schema = (ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text()
    for name in [*LOSSES, *DECODERS]:
        assert f" {name}," not in schema and f"[{name}" not in schema
    defaults = yaml.safe_load(schema)["properties"]["stats"]["properties"]["metrics"]["default"]
    assert set(defaults) <= set(METRICS)
    out = check(cfg)
    for model in out["models"].values():  # every default model's loss and decoder is in the registry
        assert model["loss"]["name"] in LOSSES and model["decoder"] in DECODERS


def test_model_config_merges_training_defaults(cfg):
    cfg["models"]["E_hist2st_poisson"]["training"] = {"epochs": 3, "augment": {"color_jitter": True}}
    out = check(cfg)
    m = stconfig.model_config(out, "E_hist2st_poisson")
    assert m["training"]["epochs"] == 3
    assert m["training"]["augment"] == {"dihedral": True, "color_jitter": True}
    assert m["training"]["lr"] == cfg["training"]["lr"]
    assert m["decoder_kwargs"] == cfg["decoders"]["hist2st"]


def test_fold_samples(cfg):
    out = check(cfg)
    assert stconfig.fold_samples(out, "test-P2") == (["P1", "P3"], "P2")
    with pytest.raises(InputError):
        stconfig.fold_samples(out, "test-P9")


def test_a_key_given_twice_is_refused_with_file_and_line(tmp_path):
    text = (
        (ROOT / "config.yaml")
        .read_text()
        .replace("  P2: {simulate:", "  P1: {simulate: {seed: 9, n_rows: 576, n_cols: 576}}\n  P2: {simulate:", 1)
    )
    path = tmp_path / "config.yaml"
    path.write_text(text)
    line = text.splitlines().index("  P1: {simulate: {seed: 9, n_rows: 576, n_cols: 576}}") + 1
    with pytest.raises(InputError, match=rf"config.yaml:{line}: key 'P1' is given twice"):
        stconfig.load(path)
    path.write_text("samples: [P1\nmodels: {}\n")
    with pytest.raises(InputError, match=r"config.yaml:2: not valid YAML"):
        stconfig.load(path)


def test_snakemake_refuses_a_duplicated_sample_at_plan_time(tmp_path):
    import subprocess

    from conftest import copy_workflow

    root = copy_workflow(tmp_path)
    text = (root / "config.yaml").read_text()
    (root / "config.yaml").write_text(
        text.replace("  P2: {simulate:", "  P1: {simulate: {seed: 9}}\n  P2: {simulate:", 1)
    )
    snakemake = ROOT / ".venv" / "bin" / "snakemake"
    result = subprocess.run([str(snakemake), "-n", "--cores", "1"], cwd=root, capture_output=True, text=True)
    assert result.returncode != 0 and "key 'P1' is given twice" in result.stdout + result.stderr


def test_nested_cli_values_are_typed_and_merged_into_the_section():
    """`--config training='{epochs: 3, augment: {dihedral: false}}'`, parsed and merged as Snakemake does."""
    from snakemake.cli import parse_config
    from snakemake.utils import update_config

    cfg = yaml.safe_load((ROOT / "tests" / "configs" / "tiny.yaml").read_text())
    cli = parse_config(["training={epochs: 3, augment: {dihedral: false}}", "genes={samples: [T1], n_genes: 4}"])
    assert cli["training"]["epochs"] == "3"  # what Snakemake hands over
    update_config(cfg, cli)
    out = check(stconfig.retype_cli_config(cfg, cli))
    assert out["training"]["epochs"] == 3 and out["training"]["augment"] == {"dihedral": False, "color_jitter": False}
    assert out["training"]["batch_size"] == 2 and out["training"]["lr"] == 1.0e-3  # the rest of the section kept
    assert out["genes"]["samples"] == ["T1"] and out["genes"]["n_genes"] == 4  # a string list stays strings


def test_snakemake_accepts_a_nested_config_value(tmp_path):
    import subprocess

    from conftest import copy_workflow

    root = copy_workflow(tmp_path, config="tests/configs/tiny.yaml")
    snakemake = [str(ROOT / ".venv" / "bin" / "snakemake"), "-n", "--cores", "1", "--config"]
    done = subprocess.run([*snakemake, "training={epochs: 2}"], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    bad = subprocess.run([*snakemake, "training={epochs: two}"], cwd=root, capture_output=True, text=True)
    assert bad.returncode != 0 and "training.epochs" in bad.stdout + bad.stderr
