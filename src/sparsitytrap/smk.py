"""What every Snakemake script does first: log to the rule's log file, end a failed job with one clear line.

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
        except InputError as err:
            print(f"error: {err}", file=log)
            _fail(f"error: {err}")
        except Exception as err:  # noqa: BLE001 - any crash: its traceback into the log, then one line
            traceback.print_exc(file=log)
            log.flush()
            _fail(f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} (traceback in {path})")
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__


def _fail(line):
    print(line, file=sys.__stderr__)
    sys.exit(1)
