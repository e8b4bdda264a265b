"""The figure registry (sparsitytrap.figures.FIGURES) against the workflow that uses it.

One `rule figure_<name>` per entry and back, each rule's params exactly the entry's (settings read
from the config keys the entry declares), its output the entry's name pattern, and the figure jobs
that `snakemake -n` plans exactly the registry's names expanded over the config.
"""

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_workflow
from test_figures import fixture_job, run  # noqa: F401 (the evaluated two-fold fixture)

from sparsitytrap import config as stconfig
from sparsitytrap.figures import FIGURES, setting

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


def figure_rules():
    """Name -> text of every `rule figure_<name>` block of evaluate.smk."""
    text = (REPO / "workflow" / "rules" / "evaluate.smk").read_text()
    blocks = re.split(r"^(?=\S)", text, flags=re.M)
    return {m[1]: block for block in blocks if (m := re.match(r"rule figure_(\w+):", block))}


def section(block, name):
    """Body of one section of a rule (`params:`, `output:` ...); empty when the rule has none."""
    m = re.search(rf"^    {name}:\n((?:        .*\n|\s*\n)*)", block, re.M)
    return m[1] if m else ""


def rule_params(block):
    """Param name -> its expression, as written."""
    found = re.finditer(r"^        (\w+)=(.*(?:\n {9,}.*)*)", section(block, "params"), re.M)
    return {m[1]: m[2].strip().removesuffix(",") for m in found}


def config_key(expression):
    """`config["a"]["b"][0]` -> `a.b[0]`, `config["a"].get("b", [])` -> `a.b`; None if not a config read."""
    m = re.fullmatch(r'config((?:\["\w+"\]|\[\d+\]|\.get\("\w+"(?:, [^)]*)?\))+)', expression)
    if not m:
        return None
    return re.sub(r'\["(\w+)"\]|\.get\("(\w+)"[^)]*\)', lambda g: "." + (g[1] or g[2]), m[1]).lstrip(".")


def test_every_figure_rule_has_an_entry_and_back():
    assert set(figure_rules()) == set(FIGURES)


@pytest.mark.parametrize("name", FIGURES)
def test_rule_params_are_the_entrys_and_read_its_config_keys(name):
    params = rule_params(figure_rules()[name])
    assert set(params) == FIGURES[name].params
    for option, key in FIGURES[name].options.items():
        assert config_key(params[option]) == key, (option, params[option])


@pytest.mark.parametrize("name", FIGURES)
def test_rule_output_is_the_entrys_name_pattern(name):
    output = section(figure_rules()[name], "output")
    assert re.search(r'figure\(\s*"([^"]+)"', output)[1] == FIGURES[name].output


@pytest.mark.parametrize("name", FIGURES)
def test_entry_fits_its_drawing_function(name):
    entry = FIGURES[name]
    signature = inspect.signature(entry.load())
    given = {*entry.args, *entry.options, "out_prefix", "formats"}
    required = {p.name for p in signature.parameters.values() if p.default is inspect.Parameter.empty}
    assert given <= set(signature.parameters) and required <= given
    assert set(entry.per) <= {"comparison", "fold", "gene"}


def test_setting_reads_nested_keys_and_indices():
    config = {"figures": {"rescue_top_k": 4}, "stats": {"metrics": ["pcc_2um_pooled"]}}
    assert setting(config, "figures.rescue_top_k") == 4
    assert setting(config, "stats.metrics[0]") == "pcc_2um_pooled"
    assert setting(config, "figures.multiscale_model") is None


@pytest.mark.parametrize("name", FIGURES)
def test_entry_draws_from_a_job(run, tmp_path, name):  # noqa: F811
    FIGURES[name].draw(fixture_job(FIGURES[name], run), tmp_path / name, ["png"])
    assert (tmp_path / f"{name}.png").stat().st_size > 1000


def planned_figures(root):
    """(figure name, output name) of every figure job of a dry run in `root`."""
    cmd = [str(SNAKEMAKE), "-n", "--cores", "1"]
    run = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = re.findall(r"rule figure_(\w+):\n(?:\s+\w+:.*\n)*?\s+output: ([^,\n]+)", run.stdout + run.stderr)
    return {(name, re.sub(r"^.*?/figures/|\.\w+$", "", path)) for name, path in jobs}


@pytest.mark.parametrize("config_file", [None, "tests/configs/tiny.yaml"])
def test_planned_figures_are_the_registrys_names(tmp_path, monkeypatch, config_file):
    root = copy_workflow(tmp_path, config=config_file)
    monkeypatch.chdir(root)  # the config's paths are relative to the workflow
    config = stconfig.load(root / "config.yaml")
    drawn = config["figures"]["folds"]
    over = {
        "comparison": [c["name"] for c in config.get("comparisons", [])],
        "fold": stconfig.fold_names(config) if drawn == "all" else drawn,
        "gene": config["figures"].get("mosaic_genes", []),
    }
    expected = {(name, n) for name, entry in FIGURES.items() if entry.drawn(config) for n in entry.names(over)}
    assert planned_figures(root) == expected
    if config_file is None:  # the default config draws every kind of figure but the sweep's
        assert {name for name, _ in expected} == set(FIGURES) - {"resolution_sweep"}
