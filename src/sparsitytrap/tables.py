"""HTML views of the workflow's CSV tables, for `snakemake --report`.

The report shows an HTML result in the page but offers a CSV only as a download, so every CSV of
the report is also written as an HTML table (numbers to 4 significant digits, header kept in view),
with the exact CSV embedded as a download link.
"""

import base64
import html
from pathlib import Path

import pandas as pd

from .errors import InputError
from .io import atomic_path

STYLE = """
body { font-family: sans-serif; font-size: 13px; margin: 0.5em; }
table { border-collapse: collapse; }
th, td { padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
th { position: sticky; top: 0; background: #f4f4f4; }
td:first-child, th:first-child { text-align: left; }
tr:hover td { background: #eef4ff; }
"""


def html_table(csv_path, out_html, max_rows=5000):
    """Write the CSV at `csv_path` as a standalone HTML page (the first `max_rows` rows are shown)."""
    csv_path = Path(csv_path)
    try:
        raw = csv_path.read_bytes()
        df = pd.read_csv(csv_path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(csv_path, f"cannot be read as a CSV table ({err})") from None
    shown = df.head(max_rows)
    note = f"first {max_rows} of {len(df)} rows shown; " if len(df) > max_rows else f"{len(df)} rows; "
    link = (
        f'<a download="{html.escape(csv_path.name)}" '
        f'href="data:text/csv;base64,{base64.b64encode(raw).decode()}">download {html.escape(csv_path.name)}</a>'
    )
    body = shown.to_html(index=False, border=0, na_rep="", float_format=lambda x: f"{x:.4g}")
    page = (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(csv_path.name)}</title>'
        f"<style>{STYLE}</style></head><body>\n<p>{html.escape(csv_path.name)}: {note}{link}</p>\n{body}\n"
        "</body></html>\n"
    )
    with atomic_path(out_html) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
