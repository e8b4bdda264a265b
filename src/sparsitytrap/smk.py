"""What every Snakemake script does first: log to the rule's log file, report bad input on one line."""

import contextlib
import logging
import sys

from .errors import InputError


@contextlib.contextmanager
def job(snakemake):
    """Send stdout, stderr and logging to the rule's log; an InputError ends the job with one line."""
    with open(snakemake.log[0], "w") as log:
        sys.stdout = sys.stderr = log
        logging.basicConfig(stream=log, level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
        try:
            yield
        except InputError as err:
            print(f"error: {err}", file=log)
            print(f"error: {err}", file=sys.__stderr__)
            sys.exit(1)
