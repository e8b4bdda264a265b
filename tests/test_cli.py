"""The CLI and the workflow do not drift: every rule's params are options of its sub-command."""

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from test_evaluate import smooth_rates, write_pred, write_tiles
from test_figures import run  # noqa: F401  (the module-scoped fixture: two folds, two models)

from sparsitytrap import cli
from sparsitytrap import config as stconfig

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
#: Params that carry a whole config section expand to its keys.
SECTIONS = {'**config["evaluation"]': "evaluation", '**config["tiles"]': "tiles"}


def rule_params():
    """{rule: [param names]} from the rule files' text (a param is `name=` at the params' indent)."""
    out = {}
    for path in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        for block in re.split(r"^rule ", path.read_text(), flags=re.M)[1:]:
            name = block.split(":", 1)[0]
            params = re.search(r"^    params:\n((?:        .*\n|\n)+)", block, flags=re.M)
            lines = params[1].splitlines() if params else []
            names = [m[1] for m in (re.match(r"        (\w+)=", ln) for ln in lines) if m]
            for ln in lines:
                section = SECTIONS.get(ln.strip().rstrip(","))
                names += list(SCHEMA["properties"][section]["properties"]) if section else []
            out[name] = names
    return out


def options(command):
    sub = cli.parser()._subparsers._group_actions[0].choices[command]
    return {a.dest for a in sub._actions}


def test_every_rule_is_a_command_and_its_params_are_options():
    rules = rule_params()
    scripted = {r for r in rules if r not in ("all",) and not r.startswith("figure_")}
    assert scripted == set(cli.RULE_COMMANDS)
    expand = {
        "sim": list(SCHEMA["properties"]["samples"]["additionalProperties"]["properties"]["simulate"]["properties"])
    }
    for rule, command in cli.RULE_COMMANDS.items():
        wanted = [k for p in rules[rule] for k in expand.get(p, [p])]
        missing = sorted(set(wanted) - options(command))
        assert not missing, f"rule {rule}: params {missing} are not options of `sparsitytrap {command}`"


def test_version_and_help_of_every_command():
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "sparsitytrap"), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("sparsitytrap ")
    for command in cli.parser()._subparsers._group_actions[0].choices:
        with pytest.raises(SystemExit) as done:
            cli.main([command, "--help"])
        assert done.value.code == 0


def test_ceiling_evaluate_stats_from_the_command_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    grid = np.array([(r, c) for r in range(2) for c in range(3)])
    rates = smooth_rates(rng, len(grid))
    tiles = write_tiles(tmp_path / "tiles.zarr", rng.poisson(rates), np.ones((len(grid), 32, 32), bool), grid)
    good, poor = write_pred(tmp_path / "good.zarr", rates), write_pred(tmp_path / "poor.zarr", rates[::-1].copy())
    assert cli.main(["ceiling", str(tiles), "--out", str(tmp_path / "ceiling.csv")]) == 0
    for name, pred in (("good", good), ("poor", poor)):
        argv = ["evaluate", str(pred), str(tiles), "--ceiling", str(tmp_path / "ceiling.csv"), "--model", name,
                "--fold", "test-PX", "--bootstrap", "50", "--out", str(tmp_path / name)]  # fmt: skip
        assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "good" / "summary.json").read_text())
    assert summary["model"] == "good" and "seed 7" in summary["protocol"]["bootstrap"]
    argv = [
        "stats",
        "--dirs-a",
        str(tmp_path / "poor"),
        "--dirs-b",
        str(tmp_path / "good"),
        "--name-a",
        "poor",
        "--name-b",
        "good",
        "--metrics",
        "pcc_2um_pooled",
        "--bootstrap",
        "50",
        "--out",
        str(tmp_path / "cmp"),
    ]
    assert cli.main(argv) == 0
    row = pd.read_csv(tmp_path / "cmp" / "summary.csv").iloc[0]
    assert row["delta_mean"] > 0 and row["delta_ci_low"] <= row["delta_mean"] <= row["delta_ci_high"]
    # bad input: one line on stderr, exit status 2
    assert cli.main(["evaluate", str(tmp_path / "nowhere.zarr"), str(tiles), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nowhere.zarr" in err


def test_a_figure_from_the_command_line(run, tmp_path, capsys):
    dirs = [str(d) for d in run["eval"]["A"] + run["eval"]["B"]]
    argv = ["figure", "results_table", "--set", f"eval_dirs=[{', '.join(dirs)}]", "--out", str(tmp_path / "table")]
    assert cli.main(argv) == 0 and (tmp_path / "table.png").is_file()
    assert cli.main(["figure", "rescue", "--out", str(tmp_path / "x")]) == 2
    assert "needs --set for" in capsys.readouterr().err


def test_every_option_of_every_command_has_a_help_text():
    commands = cli.parser()._subparsers._group_actions[0]
    undocumented = [
        f"{name} {a.option_strings[0] if a.option_strings else a.dest}"
        for name, sub in commands.choices.items()
        for a in sub._actions
        if not a.help
    ]
    assert not undocumented, f"options without help: {undocumented}"
    assert {c.dest for c in commands._choices_actions if not c.help} == set()  # every command says what it does


def test_help_shows_defaults_from_the_schema():
    text = cli.parser()._subparsers._group_actions[0].choices["tile"].format_help()
    tiles = stconfig.defaults("tiles")
    assert f"(default: {tiles['min_tissue_fraction']})" in text and "(default: None)" not in text


def test_report_table_command_writes_a_readable_table(tmp_path):
    csv = tmp_path / "S1_per_gene.csv"
    pd.DataFrame({"gene": ["PIGR", "CD74"], "delta": [0.123456789, -0.5]}).to_csv(csv, index=False)
    assert cli.main(["report-table", str(csv), "--out", str(tmp_path / "t.html")]) == 0
    page = (tmp_path / "t.html").read_text()
    assert "<td>PIGR</td>" in page and "0.1235" in page and 'download="S1_per_gene.csv"' in page
    assert cli.main(["report-table", str(tmp_path / "none.csv"), "--out", str(tmp_path / "x.html")]) == 2


def test_the_demo_summary_script_has_a_help():
    script = ROOT / "bench" / "summarise_demo.py"
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), str(script), "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "results" in done.stdout
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), str(script), "/nowhere"], capture_output=True, text=True
    )
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "/nowhere" in done.stderr
