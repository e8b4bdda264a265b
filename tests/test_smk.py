"""A failing workflow job keeps its traceback in the rule's log and says so in one line."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = """
import types
from sparsitytrap.errors import InputError
from sparsitytrap.smk import job

snakemake = types.SimpleNamespace(log=[{log!r}])
with job(snakemake):
    print("started")
    def deep():
        raise {error}
    deep()
"""


@pytest.mark.parametrize(
    "error, line, traceback",
    [
        ("RuntimeError('Zstd decompression error: invalid input data')", "RuntimeError: Zstd decompression", True),
        ("InputError('results/tiles/P1.zarr', 'tile store has no array counts')", "results/tiles/P1.zarr: tile", False),
    ],
)
def test_a_crash_keeps_its_traceback_in_the_log_and_names_it(tmp_path, error, line, traceback):
    log = tmp_path / "job.log"
    script = textwrap.dedent(SCRIPT.format(log=str(log), error=error))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and line in err[0], done.stderr
    text = log.read_text()
    assert text.startswith("started")
    assert ("Traceback (most recent call last)" in text and "in deep" in text) is traceback
    if traceback:
        assert str(log) in err[0]  # the one line says which log to read


def test_a_job_writes_the_html_view_of_each_reported_table(tmp_path):
    """A `.html` output beside a `.csv` output is the table's report view, written by the same job."""
    import types

    import pandas as pd

    from sparsitytrap.smk import job

    csv, html, other = tmp_path / "S1.csv", tmp_path / "S1.html", tmp_path / "raw.csv"
    snakemake = types.SimpleNamespace(log=[str(tmp_path / "job.log")], output=[str(csv), str(html), str(other)])
    with job(snakemake):
        pd.DataFrame({"gene": ["PIGR", "CD74"], "delta": [0.0123456, -0.5]}).to_csv(csv, index=False)
        pd.DataFrame({"x": [1]}).to_csv(other, index=False)
    page = html.read_text()
    assert "<table" in page and "PIGR" in page and "0.01235" in page
    assert not (tmp_path / "raw.html").exists()  # a CSV without an .html output gets no view
