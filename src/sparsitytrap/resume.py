"""Run or resume the workflow with one command, whatever stopped the last run.

After ``kill -9`` (or a power cut) Snakemake leaves two things behind: its lock on the working
directory and the outputs of the jobs it was running, marked incomplete. A plain rerun then stops
on ``IncompleteFilesException``, ``--rerun-incomplete`` on ``LockException``, and Snakemake's own
advice is ``--unlock``. This command does both, but removes the lock only when no Snakemake
process is running in that directory, so it never breaks into a live run.
"""

import argparse
import os
import sys
from pathlib import Path


def _workdir(argv):
    """The working directory Snakemake will use (``--directory``/``-d`` if given)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--directory", "-d", default=".")
    known, _ = parser.parse_known_args(argv)
    return Path(known.directory).resolve()


def _is_snakemake(cmdline):
    return any(Path(part).name == "snakemake" for part in cmdline[:3]) or "snakemake" in cmdline[1:3]


def live_snakemake(workdir):
    """Pids of Snakemake processes whose working directory is `workdir` (ours excluded)."""
    import psutil

    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        info = proc.info
        if info["pid"] in mine or not info["cmdline"] or not info["cwd"]:
            continue
        if _is_snakemake(info["cmdline"]) and Path(info["cwd"]).resolve() == workdir:
            pids.append(info["pid"])
    return pids


def clear_stale_lock(workdir):
    """Remove Snakemake's lock files in `workdir` if no Snakemake runs there; True if one was removed.

    Raises RuntimeError naming the process when a live run holds the directory.
    """
    locks = sorted((workdir / ".snakemake" / "locks").glob("*.lock"))
    if not locks:
        return False
    live = live_snakemake(workdir)
    if live:
        raise RuntimeError(
            f"{workdir}: Snakemake is running there (pid {', '.join(map(str, live))}); wait for it or stop it"
        )
    for lock in locks:
        lock.unlink(missing_ok=True)
    return True


def main(argv=None):
    """``python -m sparsitytrap.resume [snakemake options]``: clear a stale lock, then run Snakemake."""
    argv = list(sys.argv[1:] if argv is None else argv)
    workdir = _workdir(argv)
    try:
        if clear_stale_lock(workdir):
            print(f"sparsitytrap: removed the stale lock of an interrupted run in {workdir}", file=sys.stderr)
    except RuntimeError as err:
        sys.exit(f"sparsitytrap: {err}")
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    os.execv(snakemake, [snakemake, "--rerun-incomplete", *argv])


if __name__ == "__main__":
    main()
