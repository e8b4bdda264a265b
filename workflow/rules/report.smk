# The HTML view of every CSV table of the report (`table()` in common.smk registers them): the
# report shows HTML in the page, while a CSV could only be downloaded. One small rule per table,
# so a rerun of one table's producer redoes only its view.


def _table_rule_name(csv):
    """report_table_<path under results, without wildcards>, e.g. report_table_stats_S1_per_gene."""
    stem = re.sub(r"\{[^}]*\}/?", "", csv.removeprefix(f"{R}/").removesuffix(".csv"))
    name = re.sub(r"\W+", "_", stem).strip("_")
    return f"report_table_{name}"


for _csv, _entry in TABLES.items():

    rule:
        name:
            _table_rule_name(_csv)
        input:
            _csv,
        output:
            report(re.sub(r"\.csv$", ".html", _csv), **_entry),
        log:
            re.sub(
                r"\.csv$", ".log", _csv.replace(f"{R}/", f"{R}/logs/report_table/", 1)
            ),
        localrule: True
        conda:
            "../../envs/sparsitytrap.yaml"
        script:
            "../scripts/report_table.py"
