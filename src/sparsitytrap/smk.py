"""What every Snakemake script does first: log to the rule's log file, end a failed job with one clear line.

On success it also writes the HTML view of each CSV table the rule reports (``.html`` beside ``.csv``).

Bad input (:class:`InputError`) ends the job with its one line, in the log and on Snakemake's
output. Any other exception keeps its full traceback in the log (written before the log file is
closed) and prints one line on Snakemake's output saying which log to read.
"""

import contextlib
import logging
import sys
import traceback

from .errors import InputError


@contextlib.contextmanager
def job(snakemake):
    """Send stdout, stderr and logging to the rule's log; report a failure in the log and in one line."""
    path = snakemake.log[0]
    with open(path, "w") as log:
        sys.stdout = sys.stderr = log
        logging.basicConfig(stream=log, level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
        try:
            yield
            _write_views(getattr(snakemake, "output", ()))
        except InputError as err:
            print(f"error: {err}", file=log)
            _fail(f"error: {err}")
        except Exception as err:  # noqa: BLE001 - any crash: its traceback into the log, then one line
            traceback.print_exc(file=log)
            log.flush()
            _fail(f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} (traceback in {path})")
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__


def _write_views(outputs):
    """The HTML view of every CSV table output whose ``.html`` twin is an output too (the report's item).

    Written by the job that wrote the CSV, so a table costs no job of its own.
    """
    paths = {str(o) for o in outputs}
    for html in sorted(p for p in paths if p.endswith(".html")):
        csv = html.removesuffix(".html") + ".csv"
        if csv in paths:
            from .tables import html_table

            html_table(csv, html)


def _fail(line):
    print(line, file=sys.__stderr__)
    sys.exit(1)
